"""A task's prompt format on both OpenAI routes: a request reaches the model as the text the task
was trained on, whichever route it came by.

Training records in the card how it formatted inputs (`prompt_format`, written by runs/train.py,
checked by io/card_schema.py): `chat_template` (wrapped in the base's chat template as a user turn,
or chat rows rendered with it), `template` (the row-field template, for people reading the card;
clients send the rendered text) and `system_prompt` (the system turn every chat row began with).
A task trained on plain prompts and asked through the chat route used to get the chat template
around its input: text it never saw, so it answered as the bare model would. The rule:

    the task's card says          /v1/completions (text)         /v1/chat/completions
    chat_template false (plain)   the text as given              one user message -> its text, exactly;
                                                                 any other conversation: 400 saying why
    chat_template true            the chat template over a       the chat template over the messages
                                  user turn (after the task's
                                  system prompt, if it had one)
    nothing (unknown)             the text as given              the chat template over the messages

Token ids are taken as given on every route (the client chose every token). "Unknown" is the base
model, a card written before the format was recorded, and a prompt made in memory: for them the
server keeps its earlier behaviour, since guessing either way would change the answers of tasks
that work today (a task trained with --chat-template, served through chat).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from softprompt.io.card_schema import FIELDS
from softprompt.serve.errors import APIError


@dataclass(frozen=True)
class PromptFormat:
    chat_template: bool  # training wrapped every prompt in the base's chat template
    template: str | None = None  # the row-field template (e.g. "{mr} ||"); informative only
    system_prompt: str | None = None  # the system turn every chat row began with (chat template only)


def of_card(card) -> PromptFormat | None:
    """The format a card records; None where it records none (or one that fails the card schema: a
    prompt in memory carries a card nobody checked)."""
    value = card.get("prompt_format") if isinstance(card, dict) else None
    ok, _ = FIELDS["prompt_format"]
    if not isinstance(value, dict) or not ok(value):
        return None
    return PromptFormat(value["chat_template"], value.get("template"), value.get("system_prompt"))


def task_format(task) -> PromptFormat | None:
    """The format of a resolved serve.tasks.Task (None: the base model, or unknown)."""
    return None if task is None else of_card(task.card)


def shown(card) -> dict | None:
    """What clients are shown of a card's format (/v1/models entries, task rows):
    {"chat_template", "template", "system_prompt"}, or None for unknown."""
    fmt = of_card(card)
    return asdict(fmt) if fmt is not None else None


def shown_for(tasks, name: str) -> dict | None:
    """`shown` for the task `name` of a TaskRegistry (e.g. `svc.engine.tasks`), for a list of models:
    None for a name that does not resolve now (unknown, refused, its store away) rather than an error."""
    try:
        return shown(tasks.task(name).card)
    except Exception:  # noqa: BLE001  one task that cannot be read must not fail the whole list
        return None


def completion_prompts(task, prompts: list, tokenizer) -> list:
    """/v1/completions: each text prompt as the task's format has it (token ids as given)."""
    fmt = task_format(task)
    if fmt is None or not fmt.chat_template:
        return list(prompts)
    return [p if not isinstance(p, str) else _templated(task, [*_system(fmt), {"role": "user", "content": p}],
                                                        tokenizer, "prompt")
            for p in prompts]


def chat_prompt(task, messages: list[dict], tokenizer, base_model_id: str) -> str:
    """/v1/chat/completions: the conversation `messages` ([{"role", "content"}], OpenAI's developer
    role already named system) as the text the model gets, or a 400 APIError saying why not."""
    fmt = task_format(task)
    if fmt is not None and not fmt.chat_template:
        return _plain(task.name, messages)
    if not getattr(tokenizer, "chat_template", None) and fmt is None:  # e.g. T5/BART bases
        raise APIError(400, f"the base model {base_model_id!r} has no chat template, so chat messages cannot be "
                            "turned into its input: use /v1/completions with a prompt",
                       code="no_chat_template", param="messages")
    return _templated(task, messages, tokenizer, "messages")


def _system(fmt: PromptFormat) -> list[dict]:
    return [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt is not None else []


def _templated(task, messages: list[dict], tokenizer, param: str) -> str:
    if not getattr(tokenizer, "chat_template", None):  # only a task trained with one gets here without one
        raise APIError(400, f"task {task.name!r} was trained with the base model's chat template, but this "
                            "server's tokenizer has none: send token ids, or serve the task with its base's tokenizer",
                       code="no_chat_template", param=param)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001  a template that rejects the conversation (roles, order)
        raise APIError(400, f"the base model's chat template rejected these messages: {e}", param=param) from None


def _plain(name: str, messages: list[dict]) -> str:
    """The one user message's text, exactly the prompt a plain-prompt task was trained on."""
    roles = [m["role"] for m in messages]
    why = None
    if "assistant" in roles:
        why = "the conversation has assistant turns"
    elif "system" in roles:
        why = "the conversation has a system prompt, and the task was trained with none"
    elif len(roles) != 1:
        why = f"the conversation has {len(roles)} user messages"
    if why is not None:
        raise APIError(400, f"task {name!r} was trained on plain prompts (no chat template), so a conversation maps "
                            f"to its input only as one user message, and {why}: send one user message holding the "
                            "prompt, or use /v1/completions", code="unsupported_conversation", param="messages")
    return messages[0]["content"]
