"""The serving engine: mixed tasks in one batch equal each request run alone (tokens and logits),
rows that join mid-flight too; PEFT's generate agrees; errors stay with their request; limits,
cancellation, streaming and the prefix cache behave."""

import asyncio

import pytest
import torch
from conftest import ROWS, tiny_model
from test_peft_oracle import paired, peft_greedy

from softprompt import methods
from softprompt.hf.prefix import prefixed_forward
from softprompt.io.artifact import save_artifact
from softprompt.loops.generate import SamplingParams, generate_ids
from softprompt.serve import Engine, PrefixCache, QueueFull, Request


class WordTok:
    """Token ids written as words: '5 17 33' <-> [5, 17, 33]."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids if not (skip_special_tokens and i == 2))


def text(ids):
    return " ".join(map(str, ids))


def make_tasks(model):
    """Tasks of every method and several prefix lengths."""
    specs = [("prefix_tuning", 3, dict(projection_dim=0)), ("prompt_tuning", 7, {}), ("p_tuning", 5, {}),
             ("prefix_tuning", 10, dict(projection_dim=8))]
    tasks = {}
    for i, (method, P, opts) in enumerate(specs):
        prompt = methods.create(method, model, num_virtual_tokens=P, seed=i, **opts)
        with torch.no_grad():
            for p in prompt.parameters():
                p.normal_(0, 0.5)
        tasks[f"{method}-{P}"] = prompt
    return tasks


def alone(model, prompt, row, n):
    """Tokens and per-step logits of one request run by itself (no engine)."""
    kv = None if prompt is None else prompt.to_kv_prefix(model)
    ids = torch.tensor([row])
    toks = generate_ids(model, ids, torch.ones_like(ids), [kv], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    full = torch.tensor([row + toks[:-1]])
    with torch.no_grad():
        logits = prefixed_forward(model, full, torch.ones_like(full), [kv], use_cache=False).logits[0, len(row) - 1:]
    return toks, logits


@pytest.mark.parametrize("max_batch_size", [16, 3])  # 3: most rows join a running batch mid-flight
def test_mixed_batch_rows_equal_rows_alone(model, max_batch_size):
    tasks = make_tasks(model)
    names = [None, *tasks]
    engine = Engine(model, WordTok(), tasks, max_batch_size=max_batch_size, keep_logits=True)
    reqs = [Request(prompt=text(ROWS[j % 3] + [10 + j]), task=names[j % len(names)], max_new_tokens=3 + j % 5,
                    ignore_eos=True) for j in range(11)]
    for req, out in zip(reqs, engine.generate(reqs)):
        toks, logits = alone(model, tasks.get(req.task), [int(x) for x in req.prompt.split()], req.max_new_tokens)
        assert out.finish_reason == "length" and out.token_ids == toks
        assert (out.logits - logits).abs().max().item() < 1e-4
    assert engine.status()["running_rows"] == 0


def test_same_tokens_as_peft_generate(model):
    for case in ["prefix_mlp", "prompt", "ptuning_mlp"]:
        ours, peft = paired(model, case)
        engine = Engine(model, WordTok(), {"t": ours})
        for row in ROWS:
            out = engine.generate([Request(prompt=text(row), task="t", max_new_tokens=6)])[0]
            assert out.token_ids == peft_greedy(peft, row, 6), case


def test_compiled_prompt_task_equals_soft_prompt():
    model = tiny_model("qwen2")
    prompt = make_tasks(model)["prompt_tuning-7"]
    out = Engine(model, WordTok(), {"t": prompt}).generate(
        [Request(prompt=text(ROWS[0]), task="t", max_new_tokens=6, ignore_eos=True)])[0]
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, prompt(model, ids, torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.token_ids == ids[0, len(ROWS[0]):].tolist()


def test_errors_stay_with_their_request(tmp_path):
    model, other = tiny_model("llama"), tiny_model("llama", seed=5)
    tasks = make_tasks(model)
    foreign = methods.create("prefix_tuning", other, num_virtual_tokens=4, projection_dim=0)
    registry = dict(tasks, foreign=save_artifact(foreign, tmp_path / "foreign", other))
    engine = Engine(model, WordTok(), registry, max_batch_size=4)
    good = Request(prompt=text(ROWS[0]), task="prefix_tuning-3", max_new_tokens=5, ignore_eos=True)
    bad = [Request(prompt=text(ROWS[1]), task="nope"),
           Request(prompt=text(ROWS[1]), task="foreign"),
           Request(prompt=text(ROWS[1] * 30), task="prompt_tuning-7", max_new_tokens=200),
           Request(prompt="", task=None),
           Request(prompt=text(ROWS[1]), temperature=-1)]
    outs = engine.generate([bad[0], good, *bad[1:]])
    assert outs[1].token_ids == alone(model, tasks["prefix_tuning-3"], ROWS[0], 5)[0]
    errors = [outs[0], *outs[2:]]
    assert [o.finish_reason for o in errors] == ["error"] * 5
    assert [o.error_code for o in errors] == ["unknown_task", "task_refused", "prompt_too_long", "bad_request",
                                              "bad_request"]
    assert "unknown task 'nope'" in errors[0].error
    assert "was made for base model" in errors[1].error
    assert "exceeds the model's context of 256" in errors[2].error
    assert "temperature must be >= 0" in errors[4].error


def test_queue_limit_refuses_without_dropping(model):
    engine = Engine(model, WordTok(), max_batch_size=2, max_queue=3)
    handles = [engine.submit(Request(prompt=text(ROWS[0]), max_new_tokens=2)) for _ in range(3)]
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(Request(prompt=text(ROWS[0])))
    # every accepted request completes, with the tokens it gets alone (2 of them: this prompt meets no eos)
    assert [h.result().token_ids for h in handles] == [alone(model, None, ROWS[0], 2)[0]] * 3
    engine.submit(Request(prompt=text(ROWS[0]), max_new_tokens=1)).result()  # room again


def test_cancel_frees_the_row_and_others_go_on(model):
    engine = Engine(model, WordTok(), max_batch_size=4)
    keep = engine.submit(Request(prompt=text(ROWS[0]), max_new_tokens=8, ignore_eos=True))
    drop = engine.submit(Request(prompt=text(ROWS[1]), max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.status()["running_rows"] == 2
    drop.cancel()
    engine.step()
    assert engine.status()["running_rows"] == 1
    assert drop.result().finish_reason == "cancelled" and len(drop.result().token_ids) == 2
    assert keep.result().token_ids == alone(model, None, ROWS[0], 8)[0]


def test_streaming_sync_and_async(model):
    tasks = make_tasks(model)
    engine = Engine(model, WordTok(), tasks)
    req = dict(prompt=text(ROWS[2]), task="p_tuning-5", max_new_tokens=6, ignore_eos=True)
    events = list(engine.stream(Request(**req)))
    expected = alone(model, tasks["p_tuning-5"], ROWS[2], 6)[0]
    assert [e.token_id for e in events] == expected
    assert "".join(e.text for e in events) == WordTok().decode(expected)

    async def consume():
        handles = [engine.submit(Request(**req)) for _ in range(3)]
        return await asyncio.gather(*[collect(h) for h in handles])

    async def collect(h):
        return [e.token_id async for e in h.astream()]

    engine.start()
    try:
        assert asyncio.run(consume()) == [expected] * 3
    finally:
        engine.stop()


def test_stop_strings_and_eos(model):
    engine = Engine(model, WordTok())
    full = alone(model, None, ROWS[0], 6)[0]
    stop = f" {full[3]}"
    out = engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=6, stop=[stop], ignore_eos=True)])[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert out.text == WordTok().decode(full)[: WordTok().decode(full).index(stop)]
    streamed = "".join(e.text for e in engine.stream(Request(prompt=text(ROWS[0]), max_new_tokens=6, stop=[stop],
                                                             ignore_eos=True)))
    assert streamed == out.text  # nothing of the stop string leaks into the stream


def test_sampling_seed_is_reproducible_whatever_the_batch(model):
    engine = Engine(model, WordTok(), max_batch_size=8)
    req = dict(prompt=text(ROWS[0]), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    solo = engine.generate([Request(**req)])[0].token_ids
    crowd = engine.generate([Request(prompt=text(ROWS[1]), max_new_tokens=5, temperature=1.0), Request(**req),
                             Request(prompt=text(ROWS[2]), max_new_tokens=3)])[1].token_ids
    assert solo == crowd


def test_prefix_cache_is_lru_under_a_byte_budget(model):
    tasks = make_tasks(model)
    kv = {n: p.to_kv_prefix(model) for n, p in tasks.items()}
    size = kv["prompt_tuning-7"].numel() * 4
    cache = PrefixCache(budget_bytes=size + kv["prefix_tuning-3"].numel() * 4)
    cache.get("prefix_tuning-3", lambda: kv["prefix_tuning-3"])
    cache.get("prompt_tuning-7", lambda: kv["prompt_tuning-7"])
    cache.get("prefix_tuning-3", lambda: kv["prefix_tuning-3"])  # hit; prompt_tuning-7 is now least recent
    cache.get("p_tuning-5", lambda: kv["p_tuning-5"])
    assert "prompt_tuning-7" not in cache and "prefix_tuning-3" in cache and "p_tuning-5" in cache
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 3 and cache.bytes <= cache.budget_bytes
    engine = Engine(model, WordTok(), tasks)
    engine.generate([Request(prompt=text(ROWS[0]), task=n, max_new_tokens=1) for n in tasks for _ in range(2)])
    assert engine.prefixes.stats()["misses"] == len(tasks) and engine.prefixes.stats()["hits"] == len(tasks)


def test_submit_returns_while_a_step_runs():
    """The engine's lock guards only the queue: while a forward pass is under way (a model held
    inside its forward by an event), a new request is queued at once instead of waiting for the step."""
    import threading

    model = tiny_model("llama")
    engine = Engine(model, WordTok(), {})
    engine.generate([Request(prompt=text(ROWS[0]), max_new_tokens=1)])  # the first-call self-check, done
    inside, release = threading.Event(), threading.Event()
    real = model.forward

    def slow(*args, **kwargs):
        inside.set()
        release.wait()
        return real(*args, **kwargs)

    model.forward = slow
    engine.submit(Request(prompt=text(ROWS[1]), max_new_tokens=2))
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    assert inside.wait(60)  # the step is inside the model's forward now, holding the batch
    submitted = threading.Event()
    threading.Thread(target=lambda: (engine.submit(Request(prompt=text(ROWS[2]), max_new_tokens=2)),
                                     submitted.set()), daemon=True).start()
    try:
        assert submitted.wait(30), "submit waited for the running step"
        assert engine.status()["waiting"] == 1
    finally:
        release.set()
        stepper.join()
        model.forward = real
    while engine.step():
        pass
    assert engine.stats["completed"] == 3
