"""A task's prompt format travels with it (issue 27): training records in the card whether the inputs
were wrapped in the chat template, and the server gives both OpenAI routes the text the task learned on.
A plain-prompt task asked through chat with one user message answers exactly as through completions
(it used to get the chat template around its input); a chat-template task asked through completions
gets its text wrapped as a user turn."""

import json

import pytest
from conftest import tiny_model
from starlette.testclient import TestClient
from tiny_tokenizer import tiny_tokenizer

from softprompt import methods
from softprompt.io.artifact import ArtifactError, read_card
from softprompt.io.card import model_card
from softprompt.io.card_schema import MAX_FORMAT_CHARS, CardError, check_card_fields
from softprompt.loops.data import DataConfig, Example
from softprompt.serve import Engine
from softprompt.serve.http import ServerConfig, create_app
from softprompt.serve.prompt_format import shown, shown_for
from softprompt.serve.tasks import TaskRegistry

# Each turn's content, then "ba" to open the assistant's turn: a conversation of one user message "ka ke"
# becomes "ka ke ba", 3 tokens where the plain prompt has 2 (the tiny tokenizer: one word, one token).
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}ba{% endif %}"
ROWS = [{"input": f"{a} {b}", "output": f"{b} {a}"} for a in ("ka", "ke", "ki") for b in ("mo", "mu")]


def _train(tmp, name, model, tok, **data):
    from softprompt.runs.config import RunConfig
    from softprompt.runs.train import run_train

    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_train(RunConfig.of(train_data=str(path), out=str(tmp / name), method="prefix_tuning", projection_dim=0,
                           num_virtual_tokens=2, steps=2, batch_size=2, checkpoint_every=0, lr=0.3, progress=False,
                           **data), model, tok)
    return tmp / name / "best"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama whose tokenizer has a chat template; one task trained on plain prompts, one with
    --chat-template, and one made in memory (no card: its format is unknown)."""
    tmp = tmp_path_factory.mktemp("formats")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.chat_template = TEMPLATE
    plain = _train(tmp, "plain", model, tok)
    chat = _train(tmp, "chat", model, tok, chat_template=True)
    mem = methods.create("prefix_tuning", model, num_virtual_tokens=2, seed=3, projection_dim=0)
    return model, tok, {"plain": plain, "chat": chat, "mem": mem}, tmp


def test_cards_record_how_training_formatted_the_inputs(trained):
    _, _, tasks, tmp = trained
    for run, chat_template in (("plain", False), ("chat", True)):
        for which in ("best", "last"):
            card = read_card(tmp / run / which)
            assert card["prompt_format"] == {"chat_template": chat_template, "template": None,
                                             "system_prompt": None}, (run, which)
    assert shown(read_card(tasks["plain"])) == {"chat_template": False, "template": None, "system_prompt": None}
    assert "- prompt format: plain prompts" in model_card(tasks["plain"])
    assert "- prompt format: the base's chat template, as a user turn" in model_card(tasks["chat"])


def test_the_format_of_chat_rows_and_of_a_row_template():
    from softprompt.runs.train import prompt_format

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE

    def chat(*msgs):
        return Example(("\x00chat", json.dumps([{"role": r, "content": c} for r, c in msgs])), "bo")

    system_rows = [chat(("system", "da de"), ("user", "ka")), chat(("system", "da de"), ("user", "ke"))]
    # chat rows are rendered with the template (loops/data.render_prompt), their common system turn kept
    assert prompt_format(system_rows, tok, DataConfig()) == {"chat_template": True, "template": None,
                                                            "system_prompt": "da de"}
    # system turns that differ between rows: none is the task's
    assert prompt_format([system_rows[0], chat(("user", "ko"))], tok, DataConfig())["system_prompt"] is None
    # a row-field template is recorded for readers; plain rows under it stay plain
    assert prompt_format([Example("ka ke ||", "bo")], tok, DataConfig(template="{mr} ||")) == {
        "chat_template": False, "template": "{mr} ||", "system_prompt": None}
    # formats no rule can reproduce are not recorded (unknown): chat rows as `role: content` lines on a
    # tokenizer without a template, and chat rows mixed with unwrapped plain rows
    assert prompt_format(system_rows, tiny_tokenizer(), DataConfig()) is None
    assert prompt_format([system_rows[0], Example("ka", "bo")], tok, DataConfig()) is None
    assert prompt_format([system_rows[0], Example("ka", "bo")], tok, DataConfig(chat_template=True))["chat_template"]


@pytest.mark.parametrize("bad", [
    "plain", {"template": None}, {"chat_template": "yes"}, {"chat_template": 1}, {"chat_template": True, "template": 3},
    {"chat_template": True, "system_prompt": "x" * (MAX_FORMAT_CHARS + 1)},
    {"chat_template": False, "system_prompt": "da"},  # a plain prompt has no system turn to put it in
])
def test_the_card_schema_refuses_a_bad_prompt_format(bad):
    card = {"num_virtual_tokens": 2, "prompt_format": bad}
    with pytest.raises(CardError, match="card field 'prompt_format' must be an object"):
        check_card_fields(card)


def test_a_hand_edited_prompt_format_is_refused_on_read(trained, tmp_path):
    import shutil

    _, _, tasks, _ = trained
    art = tmp_path / "edited"
    shutil.copytree(tasks["plain"], art)
    card = json.loads((art / "card.json").read_text())
    for ok in (None, {"chat_template": True, "template": "{mr} ||", "system_prompt": "da", "later": 1}):
        (art / "card.json").write_text(json.dumps(dict(card, prompt_format=ok)))
        assert read_card(art)["prompt_format"] == ok  # null (unknown) and unknown keys are accepted
    (art / "card.json").write_text(json.dumps(dict(card, prompt_format={"chat_template": "no"})))
    with pytest.raises(ArtifactError, match="prompt_format"):
        read_card(art)


def _client(model, tok, tasks):
    engine = Engine(model, tok, TaskRegistry(dict(tasks)), max_batch_size=8)
    return TestClient(create_app(engine, config=ServerConfig(base_model_id="base")))


def _complete(client, model, prompt):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.json()["usage"]["prompt_tokens"]


def _chat(client, model, messages):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 6,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]


def test_both_routes_give_a_task_the_text_it_was_trained_on(trained):
    model, tok, tasks, _ = trained
    user = [{"role": "user", "content": "ka mo"}]
    with _client(model, tok, tasks) as client:
        # plain prompts: chat with one user message is exactly completions with its text (2 tokens, no template)
        text, n = _complete(client, "plain", "ka mo")
        assert n == 2 and _chat(client, "plain", user) == (text, n)
        # the chat template: completions with a text is chat with that one user message ("ka mo ba": 3 tokens)
        text, n = _chat(client, "chat", user)
        assert n == 3 and _complete(client, "chat", "ka mo") == (text, n)
        assert _complete(client, "chat", tok("ka mo ba", add_special_tokens=False)["input_ids"]) == (text, n)
        # token ids are taken as given, also for a chat-template task
        assert _complete(client, "chat", tok("ka mo", add_special_tokens=False)["input_ids"])[1] == 2
        # unknown format (a prompt made in memory) and the base model: as before, chat goes through the template
        for name in ("mem", "base"):
            assert _chat(client, name, user)[1] == 3 and _complete(client, name, "ka mo")[1] == 2
        # echo shows the text the model saw
        r = client.post("/v1/completions", json={"model": "chat", "prompt": "ka mo", "max_tokens": 1, "echo": True,
                                                  "temperature": 0})
        assert r.json()["choices"][0]["text"].startswith("ka mo ba")


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "ka"}, {"role": "assistant", "content": "mo"}, {"role": "user", "content": "ke"}],
     "assistant turns"),
    ([{"role": "user", "content": "ka"}, {"role": "user", "content": "ke"}], "2 user messages"),
    ([{"role": "system", "content": "da"}, {"role": "user", "content": "ka"}], "system prompt"),
    ([{"role": "developer", "content": "da"}, {"role": "user", "content": "ka"}], "system prompt"),
])
def test_a_conversation_a_plain_prompt_task_cannot_take_is_a_400_saying_why(trained, messages, why):
    model, tok, tasks, _ = trained
    with _client(model, tok, tasks) as client:
        r = client.post("/v1/chat/completions", json={"model": "plain", "messages": messages, "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "unsupported_conversation" and err["param"] == "messages"
        assert "trained on plain prompts" in err["message"] and why in err["message"]
        assert "/v1/completions" in err["message"] and "one user message" in err["message"]
        # the chat-template task takes the same conversation through its template
        assert client.post("/v1/chat/completions", json={"model": "chat", "messages": messages,
                                                         "max_tokens": 2}).status_code == 200


def test_a_store_task_brings_its_format_and_models_show_it(trained, tmp_path):
    from softprompt.store.core import Store

    model, tok, tasks, _ = trained
    store = Store(tmp_path / "store")
    store.add("plain", tasks["plain"])
    store.add("chat", tasks["chat"])
    registry = TaskRegistry({"mem": tasks["mem"]}, fallback=store.entry)
    assert registry.task("plain").card["prompt_format"]["chat_template"] is False
    assert shown_for(registry, "chat") == {"chat_template": True, "template": None, "system_prompt": None}
    assert shown_for(registry, "mem") is None and shown_for(registry, "nope") is None
    engine = Engine(model, tok, registry, max_batch_size=8)
    with TestClient(create_app(engine, store=store, config=ServerConfig(base_model_id="base"))) as client:
        text, n = _complete(client, "plain", "ke mu")
        assert n == 2 and _chat(client, "plain", [{"role": "user", "content": "ke mu"}]) == (text, n)
        text, n = _complete(client, "chat@1", "ke mu")
        assert n == 3 and _chat(client, "chat@1", [{"role": "user", "content": "ke mu"}]) == (text, n)
        card = client.get("/v1/tasks/plain/card").json()["card"]  # the task rows carry the card, format included
        assert card["prompt_format"] == {"chat_template": False, "template": None, "system_prompt": None}


def test_a_chat_template_tasks_system_prompt_comes_before_a_completion_text():
    from softprompt.serve.errors import APIError
    from softprompt.serve.prompt_format import chat_prompt, completion_prompts
    from softprompt.serve.tasks import Task

    class Loader:  # a task source that loads itself, carrying its card
        def __init__(self, fmt):
            self.card = {"prompt_format": fmt}

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    task = Task("t", Loader({"chat_template": True, "template": None, "system_prompt": "da de"}))
    assert completion_prompts(task, ["ka", [5, 6]], tok) == ["da de ka ba", [5, 6]]
    assert chat_prompt(task, [{"role": "user", "content": "ka"}], tok, "base") == "ka ba"  # chat: as sent
    # a card nobody checked (in memory) whose format fails the schema is unknown: text as given
    assert completion_prompts(Task("t", Loader({"chat_template": "yes"})), ["ka"], tok) == ["ka"]
    # a chat-template task on a tokenizer with no template cannot be given its format: a 400, not a guess
    with pytest.raises(APIError) as e:
        completion_prompts(task, ["ka"], tiny_tokenizer())
    assert e.value.status == 400 and e.value.code == "no_chat_template" and "trained with" in e.value.message
    # a plain-prompt task needs no template at all (e.g. on a T5 base)
    plain = Task("p", Loader({"chat_template": False}))
    assert chat_prompt(plain, [{"role": "user", "content": "ka"}], tiny_tokenizer(), "base") == "ka"
