"""The int8 base: each row's output depends on that row alone (exactly), whatever the CPU: the int8
matmul this CPU takes exactly is probed and asserted, never assumed. The prefix self-check passes
(exact in the float reference mode, within int8's own noise otherwise) and still fails a dropped
prefix; a mixed batch equals each row alone on the same quantized base; the fingerprint stays the
float32 weights', artifacts load, and training on it is refused.

Tolerances: an int8 base's logits for the same tokens through a prefill and through cached steps
differ, because float32 attention rounds the two differently in its last bits and per-row input
quantization turns a last-bit change into a whole quantization step now and then. The size of that
is int8 rounding noise, measured per test as the int8 logits' distance from the float reference
mode's (`float_reference`) for the same tokens; two draws of it lie within NOISE_FACTOR of one
(softprompt/hf/check.py)."""

import os

import pytest
import torch
from conftest import ROWS, VOCAB, tiny_model
from test_engine import WordTok, alone, make_tasks, text

from softprompt import methods
from softprompt.core.geometry import model_fingerprint
from softprompt.hf.check import NOISE_FACTOR
from softprompt.hf.prefix import check_prefix_support
from softprompt.hf.quantize import Int8Linear, QuantizationError, float_reference, quantize_int8
from softprompt.io.artifact import load_artifact, save_artifact
from softprompt.serve import Engine, Request


class CalibTok:
    """Text -> ids in the tiny vocabulary, for the calibration pass."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def int8(arch, calibrate=True):
    return quantize_int8(tiny_model(arch), CalibTok() if calibrate else None)


def test_int8_linear_is_close_and_rows_are_independent_exactly(monkeypatch):
    """The rotation spreads an outlier channel over its block, so the other channels keep their
    levels: the error falls by half or more against the same quantization unrotated."""
    import softprompt.hf.quantize as Q

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(9, 64)
    x[:, 5] *= 30  # an outlier channel, as after RMSNorm in real models
    q = Int8Linear(lin)
    assert q.shared.block == 64
    want, got = lin(x), q(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 0.02
    monkeypatch.setattr(Q, "BLOCK", 1)
    unrotated = Int8Linear(lin)
    assert unrotated.shared.block == 1
    assert ((unrotated(x) - want).abs().max() / want.abs().max()).item() > 2 * err
    for i in range(len(x)):  # a row alone gives the very bits it gets in the batch
        assert torch.equal(q(x[i:i + 1]), got[i:i + 1])
    assert q(x.view(3, 3, 64)).shape == (3, 3, 48)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_self_check_passes_on_the_quantized_base(arch):
    model = int8(arch)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) >= 2 * 4
    check_prefix_support(model)  # float32's tolerance: the int8 matmuls act on each token alone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_quantized_mixed_batch_rows_equal_rows_alone(arch, calibrate):
    model = int8(arch, calibrate)
    tasks = make_tasks(model)
    names = [None, *tasks]
    engine = Engine(model, WordTok(), tasks, max_batch_size=3, keep_logits=True)  # rows join mid-flight
    reqs = [Request(prompt=text(ROWS[j % 3] + [10 + j]), task=names[j % len(names)], max_new_tokens=3 + j % 4,
                    ignore_eos=True) for j in range(9)]
    for req, out in zip(reqs, engine.generate(reqs)):
        row = [int(x) for x in req.prompt.split()]
        toks, logits = alone(model, tasks.get(req.task), row, req.max_new_tokens)
        assert out.token_ids == toks
        with float_reference():  # int8 noise, measured on this very row (see the module docstring)
            _, ref = alone(model, tasks.get(req.task), row, req.max_new_tokens)
        noise = (logits - ref).abs().max().item()
        assert 0 < noise < 0.1 * ref.abs().max().item()  # int8 rounds, and only a little
        assert (out.logits - logits).abs().max().item() <= NOISE_FACTOR * noise


def test_fingerprint_and_artifacts_survive_quantization(tmp_path):
    fp32 = tiny_model("llama")
    path = save_artifact(methods.create("prompt_tuning", fp32, num_virtual_tokens=4), tmp_path / "a", fp32)
    model = int8("llama")
    assert model_fingerprint(model) == model_fingerprint(fp32) and model.softprompt_quantize == "int8"
    kv = load_artifact(path, model).to_kv_prefix(model)
    assert kv.dtype == torch.float32  # the prefix stays float32 on an int8 base


def test_training_on_the_quantized_base_is_refused():
    from softprompt.loops.train import TrainConfig, Trainer

    model = int8("llama")
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=2, projection_dim=0)
    with pytest.raises(ValueError, match="cannot train on a int8-quantized base"):
        Trainer(model, None, prompt, None, TrainConfig(steps=1))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_bases_quantize_and_generate_the_same_alone_and_batched(arch):
    from test_seq2seq import padded, tiny

    from softprompt.families.seq2seq.generate import generate_ids
    from softprompt.families.seq2seq.methods import create
    from softprompt.loops.generate import SamplingParams

    model = quantize_int8(tiny(arch), CalibTok())
    prompt = create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0)
    kv = prompt.to_kv_prefix(model)
    ids, mask = padded(ROWS)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    batch = generate_ids(model, ids, mask, [kv], params)
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        assert generate_ids(model, one, torch.ones_like(one), [kv], params)[0] == batch[i]


def test_layers_reading_one_input_share_one_product_and_give_what_they_give_alone():
    """q, k, v (and gate, up) read one tensor: one quantization, one int8 matmul, a slice each; each
    slice equals the group's whole product there (exactly); the layers whose input is wider than the
    hidden state (down_proj) take two levels of input quantization, and are closer to float32 for it."""
    fp32 = tiny_model("llama")
    model = int8("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    assert mlp.gate_proj.shared is mlp.up_proj.shared and attn.o_proj.shared is not attn.q_proj.shared
    assert mlp.down_proj.shared.levels == 2
    assert mlp.up_proj.shared.levels == model.lm_head.shared.levels == attn.q_proj.shared.levels == 1
    prod = attn.q_proj.shared
    x = torch.randn(2, 5, prod.weight_int8.shape[1])
    whole = prod(x)  # (2, 5, N)
    parts = [attn.k_proj(x), attn.q_proj(x), attn.v_proj(x)]  # any order
    start = [prod.sizes[0], 0, prod.sizes[0] + prod.sizes[1]]
    for j, part in enumerate(parts):
        assert part.is_contiguous() and torch.equal(part, whole[..., start[j]:start[j] + part.shape[-1]])
    assert prod._last.parts is None  # every part taken: nothing held
    y = x.clone()
    q1 = attn.q_proj(y)
    y.mul_(2)  # modified in place: the product made before is not reused
    assert torch.equal(attn.k_proj(y), prod(y)[..., prod.sizes[0]:prod.sizes[0] + prod.sizes[1]])
    assert not torch.equal(q1, attn.q_proj(y))
    down = mlp.down_proj
    h = torch.randn(9, down.in_features)
    h[:, 3] *= 50  # an outlier channel
    want = fp32.model.layers[0].mlp.down_proj(h)
    one = Int8Linear(fp32.model.layers[0].mlp.down_proj)  # one level
    prod = down.shared
    from softprompt.core.int8_kernels import path, rotate

    deq = (prod.weight_int8.float() * prod.weight_scale[:, None]).t()
    weights_only = rotate(h, prod.block) @ deq  # int8 weights, float inputs
    fine = 1 / (2 * path().qmax) ** 2  # the second level's step, relative to the row's largest value
    assert (down(h) - weights_only).abs().max() < 100 * fine * want.abs().max()
    assert torch.equal(one.shared.weight_int8, prod.weight_int8)  # the same int8 weights, one level of input
    assert (down(h) - weights_only).abs().max() < (one(h) - weights_only).abs().max() / 10
    for i in range(len(h)):  # two levels keep rows independent, exactly
        assert torch.equal(down(h[i:i + 1]), down(h)[i:i + 1])


def test_threads_never_see_each_others_products():
    """The loader thread compiles prompts through the model while the engine decodes with it."""
    import threading

    model = int8("llama")
    xs = [torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        want = [model(input_ids=x).logits for x in xs]
        got, errors = [[], []], []

        def run(i):
            try:
                for _ in range(20):
                    got[i].append(model(input_ids=xs[i]).logits)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for i in range(2):
        assert all(torch.equal(g, want[i]) for g in got[i])


def test_a_quantized_base_deep_copies_and_the_copy_computes_the_same():
    """The per-thread product cache is left behind (it cannot be copied), and made anew in the copy."""
    import copy

    model = int8("llama")
    twin = copy.deepcopy(model)
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(twin(input_ids=x).logits, model(input_ids=x).logits)


# ---- the fused int8 product (softprompt/core/int8_kernels.py) ---------------------------------------------


def _native_only():
    """Skip where the user chose the torch ops (SOFTPROMPT_INT8_KERNELS=torch): these test the C
    kernels and oneDNN's packed weights, which that setting turns off."""
    from softprompt.core import int8_kernels as k

    if k._torch_ops_only():
        pytest.skip("SOFTPROMPT_INT8_KERNELS=torch turns the native int8 kernels off")


def _product_args(K=48, sizes=(40, 8, 8), levels=2, block=1, bias=False):
    from softprompt.core.int8_kernels import pack

    g = torch.Generator().manual_seed(K + levels + len(sizes))
    N = sum(sizes)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    pack(w)
    return (w, torch.rand(N, generator=g) / 100, block,
            torch.randn(N, generator=g) if bias else None, list(sizes), levels)


@pytest.mark.parametrize("levels,block,bias,sizes", [(2, 1, False, (40, 8, 8)), (1, 16, True, (24, 24)),
                                                    (2, 16, True, (16,)), (1, 1, False, (40,)), (2, 8, False, (8,))])
def test_the_native_product_computes_the_torch_ops_bits_for_any_rows(levels, block, bias, sizes):
    """The C kernels (quantize a row in one pass, rescale and split in another) give the bits of the
    plain torch ops, for any batch: every step is the same IEEE operation, and a row's max does not
    depend on the order it is taken in."""
    _native_only()
    from softprompt.core import int8_kernels as k

    args = _product_args(sizes=sizes, levels=levels, block=block, bias=bias)
    x = torch.randn(37, 48)
    x[:, 3] *= 40  # an outlier channel
    x[4] = 0.0  # a row of zeros: the smallest scale
    x[6, 7] = -x[6].abs().max() * 2  # the largest magnitude negative
    whole = k.product(x, *args)
    assert k.native()  # built here (CI machines have a C compiler), not silently torch ops
    assert all(torch.equal(a, b) for a, b in zip(whole, k._math(x, *args)))
    assert [p.shape for p in whole] == [(37, n) for n in sizes] and all(p.is_contiguous() for p in whole)
    for rows in (slice(0, 1), slice(5, 7), slice(3, 35)):  # a row's bits do not depend on its batch
        assert all(torch.equal(a[rows], b) for a, b in zip(whole, k.product(x[rows], *args)))
    view = x.t().contiguous().t()[2:9]  # a non-contiguous view of another tensor
    assert all(torch.equal(a[2:9], b) for a, b in zip(whole, k.product(view, *args)))
    w, w_scale, blk, b, split, lv = args
    with pytest.raises(ValueError, match="split as"):  # lengths the C code would trust are checked first
        k.product(x, w, w_scale, 32, b, split, lv)  # a block that does not divide K
    with pytest.raises(ValueError, match="split as"):
        k.product(x, w, w_scale, blk, b, [*split[:-1], split[-1] + 1], lv)
    x[8, 5] = float("nan")  # a NaN spoils its own row alone, as with the torch ops
    got, want = k.product(x, *args), k._math(x, *args)
    for a, b in zip(got, want):
        assert a[8].isnan().all() and b[8].isnan().all()
        assert torch.equal(torch.cat([a[:8], a[9:]]), torch.cat([b[:8], b[9:]]))


def _expected_path():
    """The int8 matmul this machine must take (softprompt/core/int8_kernels.py): oneDNN with 8-bit inputs
    where the CPU multiplies u8 x s8 into int32 at once (VNNI or AMX, not capped below them), with
    7-bit inputs elsewhere; `_int_mm` or a float matmul under SOFTPROMPT_INT8_KERNELS=torch."""
    from softprompt.core import int8_kernels as k

    if k._torch_ops_only():
        return ("int_mm", "float"), (8,)
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(k.cpu_features()))
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in ("SSE41", "AVX", "AVX2", "AVX512_CORE")
    return ("onednn",), ((8,) if vnni and not capped else (7,))


def test_the_probed_matmul_is_the_one_this_cpu_should_take_and_exact_at_its_extremes():
    """Which products are exact depends on the CPU (AVX2 alone saturates 8-bit inputs): the probe's
    choice is asserted, and every path's sums are checked against integer arithmetic on the inputs
    that make them largest."""
    from softprompt.core import int8_kernels as k

    p = k.path()
    matmuls, bits = _expected_path()
    assert p.matmul in matmuls and p.bits in bits, (p, k.describe())
    assert p.qmax == {8: 127, 7: 63}[p.bits] and p.offset == (p.qmax + 1 if p.matmul == "onednn" else 0)
    for K in (64, 1536):  # 1536: sums past 2^24, rounded once to float32
        x, w = k._extremes(p.qmax, 40, K, torch.Generator().manual_seed(K))
        assert k.pack(w) == (p.matmul == "onednn")
        exact = (x.double() @ w.double().t()).float()
        assert torch.equal(k.int8_mm(k._codes(x.float()), w), exact)
    assert f"{p.bits}-bit inputs" in k.describe() and torch.backends.cpu.get_cpu_capability() in k.describe()


def test_packed_weights_multiply_exactly_and_are_never_taken_for_another_tensor():
    from softprompt.core import int8_kernels as k

    p = k.path()
    if p.matmul != "onednn":
        pytest.skip(f"this machine multiplies int8 without oneDNN's packed weights ({k.describe()})")
    w = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert k.pack(w) and w.data_ptr() in k._packed
    x = torch.randint(-p.qmax, p.qmax + 1, (33, 64), generator=torch.Generator().manual_seed(2)).float()
    x[0] = p.qmax
    q = k._codes(x)

    def exact(w):
        return (x.double() @ w.double().t()).float()

    assert torch.equal(k.int8_mm(q, w), exact(w))  # exact int32 sums, as float32
    top = w[:32]  # same address, another shape: its own product, not the packed weight's
    assert torch.equal(k.int8_mm(q, top), exact(top))
    w[5].neg_()  # written in place (as load_state_dict does): the packed form is stale, not used
    assert torch.equal(k.int8_mm(q, w), exact(w))
    assert k.pack(w) and torch.equal(k.int8_mm(q, w), exact(w))  # packed anew
    ptr = w.data_ptr()
    del w, top
    import gc

    gc.collect()
    assert ptr not in k._packed  # a freed weight's packing goes with it: its address may be reused


def test_a_matmul_that_overflows_is_refused_when_the_base_is_quantized(monkeypatch):
    """What a CPU without VNNI did with 8-bit inputs (sums saturating in int16): the quantized base
    strays far from its float32 self, and quantizing says so, naming the CPU and the path."""
    from softprompt.core import int8_kernels as k

    exact = k.int8_mm

    def saturating(q, w):
        y = exact(q, w)
        return y.clamp(-2 ** 12, 2 ** 12)  # a stand-in for int16 pair sums clipping

    monkeypatch.setattr(k, "int8_mm", saturating)
    monkeypatch.setattr(k, "_native", lambda: None)  # the torch ops, which call int8_mm by name
    with pytest.raises(QuantizationError, match=r"strays from its float32 self by .*torch ISA .*-bit inputs"):
        int8("llama")


def test_a_dropped_prefix_fails_the_self_check_on_a_quantized_base(monkeypatch):
    """Dropped everywhere: the exact check (float reference mode) fails at float32's tolerance.
    Dropped only by the int8 arithmetic: its noise-bounded half fails."""
    from softprompt import hf
    from softprompt.hf import prefix

    model = int8("llama")
    stack = prefix.stack_prefixes

    def dropped(prefixes, batch_size=None):
        return stack([None] * len(prefixes), batch_size)

    monkeypatch.setattr(prefix, "stack_prefixes", dropped)
    with pytest.raises(hf.PrefixIgnored, match="ignores the KV prefix"):
        check_prefix_support(model)
    from softprompt.hf.quantize import _reference

    def dropped_in_int8(prefixes, batch_size=None):
        return stack(prefixes if getattr(_reference, "on", False) else [None] * len(prefixes), batch_size)

    monkeypatch.setattr(prefix, "stack_prefixes", dropped_in_int8)
    with pytest.raises(hf.PrefixIgnored, match="strays from its float reference under the KV prefix.*drop it"):
        check_prefix_support(model)
    monkeypatch.setattr(prefix, "stack_prefixes", stack)
    check_prefix_support(model)


def test_without_a_compiler_products_run_as_torch_ops_with_one_warning(monkeypatch, tmp_path, caplog):
    _native_only()
    from softprompt.core import int8_kernels as k

    monkeypatch.setitem(k._state, "lib", None)
    monkeypatch.setitem(k._state, "failed", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    args = _product_args()
    x = torch.randn(5, 48)
    with caplog.at_level("WARNING", logger="softprompt.core.int8_kernels"):
        first = k.product(x, *args)
        second = k.product(x, *args)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, k._math(x, *args)))
    assert not k.native() and k._state["failed"].startswith("FileNotFoundError")
    assert len(caplog.records) == 1 and "running them as torch ops, slower" in caplog.records[0].getMessage()
    assert not list((tmp_path / "kernels").glob("*"))  # no half-built library left behind


def test_the_kernels_build_once_into_the_cache_and_load_from_there(monkeypatch, tmp_path):
    _native_only()
    from softprompt.core import int8_kernels as k

    monkeypatch.setitem(k._state, "lib", None)
    monkeypatch.setitem(k._state, "failed", None)
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    assert k.native()
    built = list((tmp_path / "kernels").glob("int8_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setitem(k._state, "lib", None)
    assert k.native() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "file"))  # no cache directory can be made there
    monkeypatch.setitem(k._state, "lib", None)
    assert k.native()  # built in a temporary directory instead


def test_a_copy_of_a_quantized_base_packs_its_own_weights():
    _native_only()
    import copy

    from softprompt.core import int8_kernels as k

    model = int8("llama")
    twin = copy.deepcopy(model)
    prods = [m.shared for m in twin.modules() if isinstance(m, Int8Linear)]
    assert prods and all(p.weight_int8.data_ptr() in k._packed for p in prods)


def test_a_quantized_base_multiplies_through_its_packed_weights_and_native_kernels(monkeypatch):
    """The fast path is the one taken (a silent fallback would only show as slowness)."""
    _native_only()
    from softprompt.core import int8_kernels as k

    model = int8("llama")
    prods = {id(m.shared): m.shared for m in model.modules() if isinstance(m, Int8Linear)}
    calls = {"onednn": 0, "math": 0}
    onednn, math = k._onednn, k._math
    monkeypatch.setattr(k, "_onednn", lambda *a: calls.__setitem__("onednn", calls["onednn"] + 1) or onednn(*a))
    monkeypatch.setattr(k, "_math", lambda *a: calls.__setitem__("math", calls["math"] + 1) or math(*a))
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 5)))
    assert calls == {"onednn": len(prods), "math": 0}


def test_the_rotation_leaves_the_product_unchanged_and_is_its_own_inverse_up_to_scale():
    """x W^T = (x H)(W H / B)^T for the block Hadamard H (H H^T = B I), in exact arithmetic; float64
    shows it to 1e-12. The butterflies give the same bits however many rows they see."""
    from softprompt.core.int8_kernels import rotate
    from softprompt.hf.quantize import _rotate_weight

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 128, generator=g, dtype=torch.float64), torch.randn(7, 128, generator=g, dtype=torch.float64)
    for block in (2, 16, 64):
        assert torch.allclose(rotate(x, block) @ (rotate(w, block) / block).t(), x @ w.t(), atol=1e-12)
        assert torch.allclose(rotate(rotate(x, block), block) / block, x, atol=1e-12)
        assert torch.equal(rotate(x, block)[2:3], rotate(x[2:3], block))
    h = rotate(torch.eye(4, dtype=torch.float64), 4)  # the Sylvester Hadamard matrix of order 4
    assert torch.equal(h, torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                                       dtype=torch.float64))
    wf = torch.randn(7, 128, generator=g)
    assert torch.allclose(_rotate_weight(wf, 64).double(), rotate(wf.double(), 64) / 64, atol=1e-6)
