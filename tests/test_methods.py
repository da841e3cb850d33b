"""The prompt methods on tiny models: what trains, what serves, what is stored, how they start.

Pins: (1) gradients reach the prompt's parameters and nothing of the frozen base model, whose
weights stay bit-identical through an optimizer step; (2) a soft prompt compiled to a KV prefix
gives the same logits and the same greedy tokens as the soft prompt itself; (3) export/reload
round trips give identical logits, with shapes from the model geometry (KV heads, not query
heads); (4) init options give exactly the embeddings or K/V they promise, and bad options fail
with a ValueError that says what is wrong; (5) `sizes()` counts parameters and artifact bytes.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import ROWS, left_padded, tiny_model
from tiny_tokenizer import tokenizer  # noqa: F401  (fixture)

from softprompt import methods
from softprompt.core.geometry import geometry
from softprompt.hf.prefix import compile_embeddings, prefixed_forward
from softprompt.loops.generate import SamplingParams, generate_ids
from softprompt.methods import PrefixTuning

P = 5
K = 16  # projection / encoder hidden size
CASES = {
    "prompt": ("prompt_tuning", dict(init="random")),
    "prompt_residual": ("prompt_tuning", dict(init="random", residual_dim=K)),
    "prefix": ("prefix_tuning", dict(projection_dim=0)),
    "prefix_mlp": ("prefix_tuning", dict(projection_dim=K)),
    "ptuning_mlp": ("p_tuning", dict(encoder="mlp", encoder_hidden_size=K)),
    "ptuning_lstm": ("p_tuning", dict(encoder="lstm", encoder_hidden_size=K)),
}
SOFT = ["prompt", "prompt_residual", "ptuning_mlp", "ptuning_lstm"]  # methods that compile a soft prompt
# the residual MLP's LayerNorm gain starts at zero, so its Linears get no gradient on the first step
# (test_residual_prompt_starts_at_its_init_and_then_trains_all_of_it)
FIRST_STEP = [c for c in CASES if c != "prompt_residual"]


def make(model, case, tokenizer=None, scale=None, **extra):
    method, opts = CASES[case]
    prompt = methods.create(method, model, tokenizer, num_virtual_tokens=P, seed=1, **{**opts, **extra})
    if scale:  # larger than a default init, so that the prompt visibly changes the output
        with torch.no_grad():
            for p in prompt.parameters():
                p.normal_(0, scale)
    return prompt


def lm_loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("case", FIRST_STEP)
def test_gradients_reach_only_the_prompt(model, case):
    prompt = make(model, case)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt_before = {n: p.detach().clone() for n, p in prompt.named_parameters()}
    buffers_before = {n: b.clone() for n, b in prompt.named_buffers()}
    ids, mask = left_padded(ROWS)
    opt = torch.optim.AdamW(prompt.parameters(), lr=1e-2)
    lm_loss(prompt(model, ids, mask).logits, ids, mask).backward()

    trainable = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"
    for n, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None, f"base parameter {n} takes part in training"
    opt.step()
    after = model.state_dict()
    assert after.keys() == base_before.keys()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    for n, p in trainable:
        assert not torch.equal(p.detach(), prompt_before[n]), f"prompt tensor {n} did not move"
    for n, b in prompt.named_buffers():  # e.g. the prefix-MLP's fixed base prefix
        assert torch.equal(b, buffers_before[n])


def naive_greedy(prompt, model, row, n):
    """Re-run the soft-prompt forward on the growing sequence, one row alone, no cache."""
    ids = list(row)
    with torch.no_grad():
        for _ in range(n):
            t = torch.tensor([ids])
            ids.append(int(prompt(model, t, torch.ones_like(t)).logits[0, -1].argmax()))
    return ids[len(row):]


@pytest.mark.parametrize("case", SOFT)
def test_compiled_prefix_equals_soft_prompt(model, case):
    prompt = make(model, case, scale=0.5)
    kv = prompt.to_kv_prefix(model)
    assert tuple(kv.shape) == geometry(model).prefix_shape(P)
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        soft = prompt(model, ids, mask).logits
        compiled = prefixed_forward(model, ids, mask, [kv]).logits
        bare = model(input_ids=torch.tensor([ROWS[0]])).logits[0]
    real = mask.bool()
    assert (soft[real] - compiled[real]).abs().max().item() < 1e-5
    assert (soft[0] - bare).abs().max().item() > 1e-2  # the prompt matters

    got = generate_ids(model, ids, mask, [kv], SamplingParams(max_new_tokens=8, ignore_eos=True))
    for i, row in enumerate(ROWS):
        assert got[i] == naive_greedy(prompt, model, row, 8), f"row {i}"


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(model, case):
    prompt = make(model, case, scale=0.5)
    geo = geometry(model)
    cls = type(prompt)
    exported = prompt.export_tensors()
    assert {k: tuple(v.shape) for k, v in exported.items()} == cls.expected_shapes(geo, P)
    for t in exported.values():
        assert t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad
    if case.startswith("prefix"):
        assert torch.equal(exported["prefix"], prompt.kv())

    reloaded = cls.from_export(geo, prompt.config_dict(), exported)
    assert reloaded.num_virtual_tokens == P
    # nothing training-only survives: the reloaded prompt holds exactly the exported tensors
    assert {n for n, _ in reloaded.named_parameters()} == set(exported)
    assert torch.equal(reloaded.to_kv_prefix(model), prompt.to_kv_prefix(model))
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        assert torch.equal(reloaded(model, ids, mask).logits, prompt(model, ids, mask).logits)
    if case == "prefix_mlp":
        assert reloaded.config_dict()["projection_dim"] == 0
    if case == "prompt_residual":
        assert reloaded.config_dict()["residual_dim"] == 0 and prompt.config_dict()["residual_dim"] == K
        W = prompt.prompt_embeddings.detach()
        assert not torch.equal(exported["prompt_embeddings"], W)  # P' = P + LN(MLP(P)) was written, not P
        r = prompt.residual
        expected = W + F.layer_norm(r.up(torch.relu(r.down(W))), (W.shape[1],), r.norm.weight, r.norm.bias)
        assert torch.allclose(exported["prompt_embeddings"], expected.detach(), atol=1e-6)


def test_residual_prompt_starts_at_its_init_and_then_trains_all_of_it(model, tokenizer):
    """Razdaibiedina et al.'s P' = P + LN(W_up ReLU(W_down P)), with the LayerNorm's gain at zero: the
    first forward is exactly the init's (a text init stays the text), and after two AdamW steps every
    tensor of it has moved while the base stays bit-identical."""
    plain = methods.create("prompt", model, tokenizer, num_virtual_tokens=P, init="text", init_text="ba be bi")
    res = methods.create("prompt", model, tokenizer, num_virtual_tokens=P, init="text", init_text="ba be bi",
                         residual_dim=K)
    assert torch.equal(res.virtual_embeddings().detach(), plain.prompt_embeddings.detach())
    assert torch.equal(res.export_tensors()["prompt_embeddings"], plain.export_tensors()["prompt_embeddings"])
    ids, mask = left_padded(ROWS)
    with torch.no_grad():
        assert torch.equal(res(model, ids, mask).logits, plain(model, ids, mask).logits)

    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    before = {n: p.detach().clone() for n, p in res.named_parameters()}
    assert set(before) == {"prompt_embeddings", "residual.down.weight", "residual.down.bias", "residual.up.weight",
                           "residual.up.bias", "residual.norm.weight", "residual.norm.bias"}
    opt = torch.optim.AdamW(res.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lm_loss(res(model, ids, mask).logits, ids, mask).backward()
        opt.step()
    for n, p in res.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not move"
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items())
    # same seed, same MLP: the reparameterization's own init is seeded too
    a, b = (methods.create("prompt", model, tokenizer, num_virtual_tokens=P, init="text", init_text="ba be bi",
                           residual_dim=K, seed=3) for _ in range(2))
    assert torch.equal(a.residual.down.weight, b.residual.down.weight)


def test_prefix_shape_uses_kv_heads():
    llama = tiny_model("llama")
    geo = geometry(llama)
    assert (geo.num_attention_heads, geo.num_key_value_heads, geo.head_dim) == (6, 2, 8)
    assert PrefixTuning.expected_shapes(geo, P) == {"prefix": (2, 2, 2, P, 8)}
    prompt = make(llama, "prefix_mlp")
    assert tuple(prompt.export_tensors()["prefix"].shape) == (2, 2, 2, P, 8)
    with pytest.raises(ValueError, match=r"\(2, 2, 6, 5, 8\).*\(2, 2, 2, 5, 8\)"):
        PrefixTuning.from_export(geo, {}, {"prefix": torch.zeros(2, 2, 6, P, 8)})


# --- init options ----------------------------------------------------------------------------

def table(model):
    return model.get_input_embeddings().weight


def test_prompt_init_tokens_repeat(model):
    prompt = methods.create("prompt", model, num_virtual_tokens=5, init="tokens", init_tokens=(5, 6))
    assert torch.equal(prompt.prompt_embeddings.detach(), table(model)[[5, 6, 5, 6, 5]])


@pytest.mark.parametrize("text,n,rows", [("ba be bi", 5, [4, 5, 6, 4, 5]), ("ba be bi bo bu ca ce", 3, [4, 5, 6])])
def test_prompt_init_text_repeat_and_cut(tokenizer, text, n, rows):
    model = tiny_model("llama")
    prompt = methods.create("prompt", model, tokenizer, num_virtual_tokens=n, init="text", init_text=text)
    assert torch.equal(prompt.prompt_embeddings.detach(), table(model)[rows])


def test_prompt_init_vocab_rows_are_table_rows(model):
    a = methods.create("prompt", model, num_virtual_tokens=7, init="vocab", seed=4).prompt_embeddings.detach()
    b = methods.create("prompt", model, num_virtual_tokens=7, init="vocab", seed=4).prompt_embeddings.detach()
    assert torch.equal(a, b)  # seeded
    W = table(model)
    for row in a:
        assert (W == row).all(-1).any(), "a vocab-init row is not a row of the embedding table"


@pytest.mark.parametrize("method,options,message", [
    ("prompt", dict(init="bogus"), "init must be one of"),
    ("prompt", dict(init="text", init_text=""), "init_text must be a non-empty string"),
    ("prompt", dict(init="tokens"), "needs init_tokens"),
    ("prompt", dict(init="tokens", init_tokens=(5, 96)), r"\[96\] are outside the vocabulary \(size 96\)"),
    ("prompt", dict(init="tokens", init_tokens=(-1,)), r"\[-1\] are outside the vocabulary"),
    ("prompt", dict(init="text", init_text="ba be", tokenizer=None), "needs the tokenizer"),
    ("prompt", dict(init="text", init_text="   "), "empty token list"),
    ("prefix", dict(init="bogus"), "init must be one of"),
    ("prefix", dict(init="text", init_text=""), "init_text must be a non-empty string"),
    ("prefix", dict(projection_dim=-1), "projection_dim must be >= 0"),
    ("prompt", dict(residual_dim=-1), "residual_dim must be >= 0"),
    ("ptuning", dict(encoder="gru"), "encoder must be one of"),
])
def test_invalid_options_raise_value_error(tokenizer, method, options, message):
    model = tiny_model("llama")
    tok = options.pop("tokenizer", tokenizer)
    with pytest.raises(ValueError, match=message):
        methods.create(method, model, tok, num_virtual_tokens=P, **options)


@pytest.mark.parametrize("n", [0, -1])
@pytest.mark.parametrize("method,options", [
    ("prompt", dict(init="vocab")), ("prompt", dict(init="random")),
    ("prompt", dict(init="tokens", init_tokens=(5, 6))), ("prompt", dict(init="text", init_text="ba be")),
    ("prefix", dict(projection_dim=0)), ("prefix", dict(projection_dim=K)),
    ("prefix", dict(init="text", init_text="ba be")),
    ("ptuning", dict(encoder="mlp")),
])
def test_nonpositive_num_virtual_tokens_is_a_value_error(tokenizer, method, options, n):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        methods.create(method, tiny_model("llama"), tokenizer, num_virtual_tokens=n, **options)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'lora'.*prefix_tuning"):
        methods.create("lora", tiny_model("llama"))


@pytest.mark.parametrize("projection_dim", [0, K])
def test_prefix_init_text_starts_at_the_text_kv(model, tokenizer, projection_dim):
    prompt = methods.create("prefix", model, tokenizer, num_virtual_tokens=5, init="text", init_text="ba be bi",
                            projection_dim=projection_dim)
    expected = compile_embeddings(model, table(model)[[4, 5, 6, 4, 5]])
    assert torch.equal(prompt.kv().detach(), expected)
    assert torch.equal(prompt.export_tensors()["prefix"], expected)


# --- sizes -----------------------------------------------------------------------------------

def manual_trainable(case, geo):
    L, d, kv = geo.num_layers, geo.hidden_size, geo.kv_dim
    if case == "prompt":
        return P * d
    if case == "prompt_residual":
        return P * d + (d * K + K) + (K * d + d) + 2 * d
    if case == "prefix":
        return L * 2 * kv * P
    if case == "prefix_mlp":
        return P * kv + (kv * K + K) + (K * L * 2 * kv + L * 2 * kv)
    if case == "ptuning_mlp":
        return P * d + (d * K + K) + (K * K + K) + (K * d + d)
    lstm = 2 * (4 * K * d + 4 * K * K + 8 * K) + 2 * (4 * K * 2 * K + 4 * K * K + 8 * K)
    return P * d + lstm + (2 * K * 2 * K + 2 * K) + (2 * K * d + d)


@pytest.mark.parametrize("case", list(CASES))
def test_sizes(model, case):
    prompt = make(model, case)
    geo = geometry(model)
    sizes = prompt.sizes(model)
    base = sum(p.numel() for p in model.parameters())
    assert sizes["trainable_parameters"] == manual_trainable(case, geo)
    assert sizes["total_parameters"] == base + sizes["trainable_parameters"]
    assert sizes["num_virtual_tokens"] == P and sizes["method"] == CASES[case][0]
    if case.startswith("prefix"):
        L, H, D = geo.num_layers, geo.num_key_value_heads, geo.head_dim
        assert sizes["artifact_bytes"] == L * 2 * H * P * D * 4
    else:
        assert sizes["artifact_bytes"] == P * geo.hidden_size * 4


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_text_init_is_the_text_written_out_whatever_the_embedding_scale(tokenizer, family):
    """Gemma 3 scales token embeddings inside its embedding module (by sqrt(d)): an init read from the
    weight table would start from vectors the model never sees for those tokens. Prompt tuning starts
    at the module's vectors (as PEFT's TEXT init does); prefix tuning at the KV of the text itself."""
    model = tiny_model(family)
    ids = [4, 5, 6, 4, 5]
    written = model.get_input_embeddings()(torch.tensor(ids)).float()
    prompt = methods.create("prompt", model, tokenizer, num_virtual_tokens=5, init="text", init_text="ba be bi")
    assert torch.equal(prompt.prompt_embeddings.detach(), written)
    if family == "gemma3":  # the case this guards: the table's rows are not what the model sees
        assert not torch.allclose(table(model)[ids].float(), written)
    prefix = methods.create("prefix", model, tokenizer, num_virtual_tokens=5, init="text", init_text="ba be bi")
    x = torch.tensor([[7, 8, 9]])
    ours = prefixed_forward(model, x, torch.ones_like(x), [prefix.kv().detach()], use_cache=False).logits[0]
    full = model(torch.tensor([ids + [7, 8, 9]])).logits[0, 5:]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
