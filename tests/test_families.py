"""Every common decoder family (conftest.FAMILIES): the self-check passes, mixed-task batches equal
an independent computation per row, and PEFT gives the same logits.

Two independent references, neither of which goes through our prefix path:
- the model's own plain forward over the prefix written out as tokens (a prefix compiled from
  tokens x must act exactly like x before the prompt), for every family;
- a hand-written attention computation (tests/reference.py) for random prefixes, for the
  Llama family (Llama, Qwen2, Mistral, Qwen3), which runs on any transformers release.
"""

import pytest
import reference
import torch
from conftest import FAMILIES, ROWS, left_padded, tiny_model
from test_engine import WordTok, text

from softprompt import hf, methods
from softprompt.hf.prefix import check_prefix_support, prefixed_forward
from softprompt.loops.generate import SamplingParams, generate_ids
from softprompt.serve import Engine, Request

TOL = 1e-4


def compiled(model, tokens: list[int]) -> torch.Tensor:
    """The model's own keys/values over `tokens`, as a prefix (L, 2, H_kv, P, D)."""
    x = torch.tensor([tokens])
    with torch.no_grad():
        out = hf.forward(model, hf.new_cache(), input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    return hf.to_prefix(out.cache)


def prefix_task(model, kv: torch.Tensor):
    task = methods.create("prefix_tuning", model, num_virtual_tokens=kv.shape[3], projection_dim=0)
    with torch.no_grad():
        task.prefix.copy_(kv)
    return task


def plain_greedy(model, tokens: list[int], n: int, eos: int = 2) -> list[int]:
    """Greedy continuation by full passes of the bare model (no cache, no prefix)."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([tokens + out])
            nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_self_check_passes(family):
    check_prefix_support(tiny_model(family))


WRITTEN = {"a": [11, 12], "b": [20, 31, 42, 53, 64], "c": [70, 9, 9, 81, 3, 44, 19]}


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_the_prefix_written_out(family):
    """Rows of three tasks (prefixes of 2, 5, 7 slots) and a bare row decode together in the engine
    and in generate_ids; each row's tokens equal the bare model's greedy continuation of
    [the task's tokens | the prompt], computed without any cache."""
    model = tiny_model(family)
    tasks = {name: prefix_task(model, compiled(model, toks)) for name, toks in WRITTEN.items()}
    plan = [("a", ROWS[0]), ("b", ROWS[1]), (None, ROWS[2]), ("c", ROWS[1]), ("b", ROWS[0])]
    n = 6
    want = [plain_greedy(model, (WRITTEN[t] if t else []) + row, n) for t, row in plan]

    engine = Engine(model, WordTok(), tasks)
    got = engine.generate([Request(prompt=text(row), task=t, max_new_tokens=n) for t, row in plan])
    assert [c.token_ids for c in got] == want

    ids, mask = left_padded([row for _, row in plan])
    kvs = [tasks[t].to_kv_prefix(model) if t else None for t, _ in plan]
    assert generate_ids(model, ids, mask, kvs, SamplingParams(max_new_tokens=n), eos_token_ids={2}) == want


@pytest.mark.parametrize("family", reference.SUPPORTED)
def test_prefixed_batch_equals_hand_written_attention(family):
    model = tiny_model(family)
    geo = methods.create("prefix_tuning", model, num_virtual_tokens=1, projection_dim=0).geometry
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randn(geo.prefix_shape(3), generator=g), None, torch.randn(geo.prefix_shape(6), generator=g)]
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        ours = prefixed_forward(model, ids, mask, prefixes, use_cache=False).logits.double()
        bare = prefixed_forward(model, ids, mask, [None, None, None], use_cache=False).logits.double()
    want = reference.logits(model, ids, mask, prefixes)
    real = mask.bool()
    assert (ours[real] - want[real]).abs().max() < TOL
    assert (bare[real] - want[real]).abs().max() > 1e-2  # the prefixes matter in the reference too


@pytest.mark.parametrize("family", reference.SUPPORTED)
def test_engine_mixed_batch_equals_hand_written_attention_per_row(family):
    model = tiny_model(family)
    tasks = {}
    for name, P, seed in (("p3", 3, 1), ("p8", 8, 2)):
        task = methods.create("prefix_tuning", model, num_virtual_tokens=P, projection_dim=0, seed=seed)
        with torch.no_grad():
            task.prefix.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        tasks[name] = task
    plan = [("p3", ROWS[0]), (None, ROWS[1]), ("p8", ROWS[2]), ("p8", ROWS[0])]
    got = Engine(model, WordTok(), tasks).generate([Request(prompt=text(r), task=t, max_new_tokens=5) for t, r in plan])
    for (t, row), c in zip(plan, got):
        assert c.token_ids == reference.greedy(model, row, tasks[t].kv().detach() if t else None, 5), (t, row)


@pytest.mark.parametrize("case", ["prefix", "prompt"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "gpt2", "qwen2")])
def test_logits_match_peft(family, case):
    """The PEFT oracle on the other families (Llama, GPT-2 and Qwen2 are in test_peft_oracle.py)."""
    from test_peft_oracle import paired

    model = tiny_model(family)
    try:
        ours, peft = paired(model, case)
    except (ValueError, NotImplementedError, AttributeError) as e:  # PEFT's own limits, named in the skip
        import peft as peft_pkg

        pytest.skip(f"PEFT {peft_pkg.__version__} cannot build {case} for {type(model).__name__}: {e}")
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        batch = ours(model, ids, mask).logits
        for i, row in enumerate(ROWS):
            alone = torch.tensor([row])
            want = peft(input_ids=alone, attention_mask=torch.ones_like(alone)).logits[0, -len(row):]
            assert (batch[i, -len(row):] - want).abs().max().item() < TOL
