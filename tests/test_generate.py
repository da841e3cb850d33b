"""The generation loop: sampling options, stopping rules, and batches that mix prefixes per row.

Pins: top_k=1 and a tiny top_p are greedy; a seed fixes a sample and other seeds change it;
max_new_tokens=0 gives nothing; an eos token ends its row (kept as the last id) while other rows go
on; stop strings cut the text before the stop string; bad SamplingParams fail with a clear message;
a batch whose rows carry prefixes of different lengths (or none) gives each row exactly the tokens,
and the logits within 1e-4, of that row run alone.
"""

import pytest
import torch
from conftest import ROWS, left_padded, tiny_model
from tiny_tokenizer import tokenizer  # noqa: F401  (fixture)

from softprompt import methods
from softprompt.hf.prefix import prefixed_forward
from softprompt.loops.generate import SamplingParams, eos_ids, generate, generate_ids

N = 8


def compiled_prefix(model, n=4, seed=2):
    return methods.create("prompt", model, num_virtual_tokens=n, seed=seed).to_kv_prefix(model)


def run(model, prefixes=None, rows=ROWS, **params):
    ids, mask = left_padded(rows)
    params = SamplingParams(**{"max_new_tokens": N, "ignore_eos": True, **params})
    return generate_ids(model, ids, mask, prefixes or [compiled_prefix(model)], params)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = run(model)
    assert run(model, temperature=1.0, top_k=1, seed=0) == greedy
    assert run(model, temperature=0.7, top_p=1e-6, seed=1) == greedy


def test_seed_fixes_the_sample(model):
    a = run(model, temperature=1.0, seed=11)
    assert run(model, temperature=1.0, seed=11) == a
    assert all(len(r) == N for r in a)
    others = [run(model, temperature=1.0, seed=s) for s in (12, 13, 14)]
    assert any(o != a for o in others), "different seeds never changed the sample"


def test_zero_new_tokens_gives_empty_outputs(model, tokenizer):
    assert run(model, max_new_tokens=0) == [[] for _ in ROWS]
    assert generate(model, tokenizer, ["ba be", "ca"], None, max_new_tokens=0) == ["", ""]


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])  # tiny GPT-2 (tied embeddings) repeats one token
def test_eos_stops_its_row_only(arch_name):
    model = tiny_model(arch_name)
    full = run(model, [None])
    # eos = the token row r produces at step 3 (new there), absent from another row j's output
    choice = next(((r, j) for r in range(len(ROWS)) for j in range(len(ROWS))
                   if j != r and full[r][3] not in full[r][:3] and full[r][3] not in full[j]), None)
    assert choice is not None, f"no usable eos candidate in {full}"
    r, j = choice
    eos = full[r][3]
    ids, mask = left_padded(ROWS)
    got = generate_ids(model, ids, mask, [None], SamplingParams(max_new_tokens=N), eos_token_ids={eos})
    assert got[r] == full[r][:4], "the row did not stop right at eos (eos kept as last id)"
    assert got[j] == full[j] and len(got[j]) == N, "another row stopped too"
    for i, row in enumerate(full):
        assert got[i] == (row[: row.index(eos) + 1] if eos in row else row)
    # ignore_eos overrides it
    assert generate_ids(model, ids, mask, [None], SamplingParams(max_new_tokens=N, ignore_eos=True),
                        eos_token_ids={eos}) == full


def test_eos_ids_come_from_tokenizer_and_model(tokenizer):
    assert eos_ids(tokenizer, tiny_model("llama")) == {2}


def test_stop_strings_cut_before_the_stop(tokenizer):
    model = tiny_model("llama")
    prompts = ["ba be bi bo bu", "ca ce", "da de di"]
    full = generate(model, tokenizer, prompts, None, max_new_tokens=N)
    words = full[0].split()
    assert len(words) >= 5, full
    for stop in [(words[2],), (words[4], words[1]), (f"{words[2]} {words[3]}",)]:
        got = generate(model, tokenizer, prompts, None, max_new_tokens=N, stop=stop)
        for text, out in zip(full, got):
            hits = [text.index(s) for s in stop if s in text]
            assert out == (text[: min(hits)] if hits else text), (stop, text, out)
            assert not any(s in out for s in stop)
        assert got[0] == " ".join(words[: 1 if stop[-1] == words[1] else 2]) + " "
    assert generate(model, tokenizer, prompts, None, max_new_tokens=N, stop=words[2]) == \
        generate(model, tokenizer, prompts, None, max_new_tokens=N, stop=(words[2],))


@pytest.mark.parametrize("options,message", [
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
    (dict(top_k=-2), "top_k must be >= 0, got -2"),
    (dict(stop=("ok", "")), "stop strings must be non-empty"),
])
def test_sampling_params_validation(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_sampling_params_accepts_one_stop_string():
    assert SamplingParams(stop="ba").stop == ("ba",)


def test_prefix_count_must_match_prompts(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="2 prefixes for 3 prompts"):
        generate(model, tokenizer, ["ba", "be", "bi"], [None, None])


def mixed_prefixes(model):
    """Row 0: a compiled prompt-tuning prefix (P=3); row 1: a direct prefix-tuning one (P=7); row 2: none."""
    p3 = compiled_prefix(model, n=3, seed=5)
    prefix = methods.create("prefix", model, num_virtual_tokens=7, projection_dim=0, seed=6)
    with torch.no_grad():
        prefix.prefix.mul_(0.3)
    return [p3, prefix.to_kv_prefix(model), None]


def test_mixed_prefix_batch_equals_rows_alone(model):
    prefixes = mixed_prefixes(model)
    assert [None if p is None else p.shape[3] for p in prefixes] == [3, 7, None]
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        batch = prefixed_forward(model, ids, mask, prefixes).logits
    params = SamplingParams(max_new_tokens=N, ignore_eos=True)
    got = generate_ids(model, ids, mask, prefixes, params)
    for i, (row, p) in enumerate(zip(ROWS, prefixes)):
        alone_ids = torch.tensor([row])
        one = torch.ones_like(alone_ids)
        with torch.no_grad():
            alone = prefixed_forward(model, alone_ids, one, [p]).logits[0]
        assert (batch[i, -len(row):] - alone).abs().max().item() < 1e-4, f"row {i} logits"
        assert got[i] == generate_ids(model, alone_ids, one, [p], params)[0], f"row {i} tokens"
    with torch.no_grad():  # the bare row is the bare model
        bare = model(input_ids=torch.tensor([ROWS[2]])).logits[0]
    assert (batch[2, -len(ROWS[2]):] - bare).abs().max().item() < 1e-4


def test_shared_prefix_equals_one_per_row(model):
    kv = compiled_prefix(model)
    assert run(model, [kv]) == run(model, [kv, kv, kv])


def test_greedy_fast_path_picks_what_safe_logits_picks():
    """The one-pass greedy pick equals the argmax of the sanitized logits on every kind of row:
    finite, ties, -inf entries, nan, +inf, and rows of nothing usable."""
    from softprompt.loops.generate import greedy, safe_logits

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 50, generator=g)
    rows[1, [3, 7]] = rows[1].max() + 1  # a tie at the top: the first index
    rows[2, ::2] = float("-inf")
    rows[3, 5] = float("nan")
    rows[4, [4, 9]] = float("inf")
    rows[5] = float("-inf")
    rows[6] = float("nan")
    rows[7, 0] = float("nan")
    rows[7, 1] = float("inf")
    rows[8] = rows[8].clamp(max=0) - 3e38  # large magnitudes
    want = safe_logits(rows).argmax(-1)
    assert torch.equal(greedy(rows), want)
    for i in (0, 1, 2, 8):  # all finite maxima: the one-pass path, on batches of finite rows alone
        assert torch.equal(greedy(rows[i:i + 1]), want[i:i + 1])
    assert want[1] == 3 and want[4] == 4 and want[7] == 1
