"""The int8 base: each row's output depends on that row alone (exactly), so the prefix self-check
passes at float32's tolerance and a mixed batch equals each row alone on the same quantized base;
the fingerprint stays the float32 weights', artifacts load, and training on it is refused."""

import pytest
import torch
from conftest import ROWS, VOCAB, tiny_model
from test_engine import WordTok, alone, make_tasks, text

from softprompt import methods
from softprompt.artifact import load_artifact, model_fingerprint, save_artifact
from softprompt.prefix import check_prefix_support
from softprompt.quantize import Int8Linear, quantize_int8
from softprompt.serve import Engine, Request


class CalibTok:
    """Text -> ids in the tiny vocabulary, for the calibration pass."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def int8(arch, smooth=True):
    return quantize_int8(tiny_model(arch), CalibTok() if smooth else None)


def test_int8_linear_is_close_and_rows_are_independent_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(9, 64)
    x[:, 5] *= 30  # an outlier channel, as after RMSNorm in real models
    q = Int8Linear(lin, x.abs().amax(0))
    want, got = lin(x), q(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.03
    for i in range(len(x)):  # a row alone gives the very bits it gets in the batch
        assert torch.equal(q(x[i:i + 1]), got[i:i + 1])
    assert q(x.view(3, 3, 64)).shape == (3, 3, 48)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_self_check_passes_on_the_quantized_base(arch):
    model = int8(arch)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) >= 2 * 4
    check_prefix_support(model)  # float32's tolerance: the int8 matmuls act on each token alone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("smooth", [True, False])
def test_quantized_mixed_batch_rows_equal_rows_alone(arch, smooth):
    model = int8(arch, smooth)
    tasks = make_tasks(model)
    names = [None, *tasks]
    engine = Engine(model, WordTok(), tasks, max_batch_size=3, keep_logits=True)  # rows join mid-flight
    reqs = [Request(prompt=text(ROWS[j % 3] + [10 + j]), task=names[j % len(names)], max_new_tokens=3 + j % 4,
                    ignore_eos=True) for j in range(9)]
    for req, out in zip(reqs, engine.generate(reqs)):
        toks, logits = alone(model, tasks.get(req.task), [int(x) for x in req.prompt.split()], req.max_new_tokens)
        assert out.token_ids == toks
        assert (out.logits - logits).abs().max().item() < 1e-4


def test_fingerprint_and_artifacts_survive_quantization(tmp_path):
    fp32 = tiny_model("llama")
    path = save_artifact(methods.create("prompt_tuning", fp32, num_virtual_tokens=4), tmp_path / "a", fp32)
    model = int8("llama")
    assert model_fingerprint(model) == model_fingerprint(fp32) and model.softprompt_quantize == "int8"
    kv = load_artifact(path, model).to_kv_prefix(model)
    assert kv.dtype == torch.float32  # the prefix stays float32 on an int8 base


def test_training_on_the_quantized_base_is_refused():
    from softprompt.train import TrainConfig, Trainer

    model = int8("llama")
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=2, projection_dim=0)
    with pytest.raises(ValueError, match="cannot train on a int8-quantized base"):
        Trainer(model, None, prompt, None, TrainConfig(steps=1))


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_bases_quantize_and_generate_the_same_alone_and_batched(arch):
    from test_seq2seq import padded, tiny

    from softprompt.seq2seq import create
    from softprompt.seq2seq.generate import generate_ids
    from softprompt.generate import SamplingParams

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
    slice equals the group's whole product there (exactly); the LM head and the layers that do not
    widen take two levels of input quantization, and are closer to float32 for it."""
    fp32 = tiny_model("llama")
    model = int8("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    assert mlp.gate_proj.shared is mlp.up_proj.shared and attn.o_proj.shared is not attn.q_proj.shared
    assert mlp.down_proj.shared.levels == model.lm_head.shared.levels == attn.q_proj.shared.levels == 2
    assert mlp.up_proj.shared.levels == 1
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
    one = Int8Linear(fp32.model.layers[0].mlp.down_proj)  # one level, no smoothing
    prod = down.shared
    weights_only = h @ (prod.weight_int8.float() * prod.weight_scale[:, None]).t()  # int8 weights, float inputs
    assert (down(h) - weights_only).abs().max() < 2e-3 * want.abs().max()  # the inputs' error is 1/32258
    assert (down(h) - want).abs().max() < (one(h) - want).abs().max() / 3
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


# ---- the fused int8 product (softprompt/int8_kernels.py) ---------------------------------------------


def _product_args(K=48, sizes=(40, 8, 8), levels=2, smooth=False, bias=False):
    from softprompt.int8_kernels import pack

    g = torch.Generator().manual_seed(K + levels + len(sizes))
    N = sum(sizes)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    pack(w)
    return (w, torch.rand(N, generator=g) / 100, torch.rand(K, generator=g) + 0.5 if smooth else None,
            torch.randn(N, generator=g) if bias else None, list(sizes), levels)


@pytest.mark.parametrize("levels,smooth,bias,sizes", [(2, False, False, (40, 8, 8)), (1, True, True, (24, 24)),
                                                      (2, False, True, (16,)), (1, False, False, (40,))])
def test_the_native_product_computes_the_torch_ops_bits_for_any_rows(levels, smooth, bias, sizes):
    """The C kernels (quantize a row in one pass, rescale and split in another) give the bits of the
    plain torch ops, for any batch: every step is the same IEEE operation, and a row's max does not
    depend on the order it is taken in."""
    from softprompt import int8_kernels as k

    args = _product_args(sizes=sizes, levels=levels, smooth=smooth, bias=bias)
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
    w, w_scale, inv_smooth, b, split, lv = args
    with pytest.raises(ValueError, match="split as"):  # lengths the C code would trust are checked first
        k.product(x, w, w_scale, torch.ones(47), b, split, lv)
    with pytest.raises(ValueError, match="split as"):
        k.product(x, w, w_scale, inv_smooth, b, [*split[:-1], split[-1] + 1], lv)
    x[8, 5] = float("nan")  # a NaN spoils its own row alone, as with the torch ops
    got, want = k.product(x, *args), k._math(x, *args)
    for a, b in zip(got, want):
        assert a[8].isnan().all() and b[8].isnan().all()
        assert torch.equal(torch.cat([a[:8], a[9:]]), torch.cat([b[:8], b[9:]]))


def test_packed_weights_multiply_exactly_and_are_never_taken_for_another_tensor():
    from softprompt import int8_kernels as k

    w = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert k.pack(w) and w.data_ptr() in k._packed
    q = torch.randint(-127, 128, (33, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    q[0] = 127
    assert torch.equal(k.int8_mm(q, w), torch._int_mm(q, w.t()).float())  # exact int32 sums, as float32
    top = w[:32]  # same address, another shape: its own product, not the packed weight's
    assert torch.equal(k.int8_mm(q, top), torch._int_mm(q, top.t()).float())
    w[5].neg_()  # written in place (as load_state_dict does): the packed form is stale, not used
    assert torch.equal(k.int8_mm(q, w), torch._int_mm(q, w.t()).float())
    assert k.pack(w) and torch.equal(k.int8_mm(q, w), torch._int_mm(q, w.t()).float())  # packed anew
    ptr = w.data_ptr()
    del w, top
    import gc

    gc.collect()
    assert ptr not in k._packed  # a freed weight's packing goes with it: its address may be reused


def test_without_a_compiler_products_run_as_torch_ops_with_one_warning(monkeypatch, tmp_path, caplog):
    from softprompt import int8_kernels as k

    monkeypatch.setitem(k._state, "lib", None)
    monkeypatch.setitem(k._state, "failed", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    args = _product_args()
    x = torch.randn(5, 48)
    with caplog.at_level("WARNING", logger="softprompt.int8_kernels"):
        first = k.product(x, *args)
        second = k.product(x, *args)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, k._math(x, *args)))
    assert not k.native() and k._state["failed"].startswith("FileNotFoundError")
    assert len(caplog.records) == 1 and "running them as torch ops, slower" in caplog.records[0].getMessage()
    assert not list((tmp_path / "kernels").glob("*"))  # no half-built library left behind


def test_the_kernels_build_once_into_the_cache_and_load_from_there(monkeypatch, tmp_path):
    from softprompt import int8_kernels as k

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
    import copy

    from softprompt import int8_kernels as k

    model = int8("llama")
    twin = copy.deepcopy(model)
    prods = [m.shared for m in twin.modules() if isinstance(m, Int8Linear)]
    assert prods and all(p.weight_int8.data_ptr() in k._packed for p in prods)


def test_a_quantized_base_multiplies_through_its_packed_weights_and_native_kernels(monkeypatch):
    """The fast path is the one taken (a silent fallback would only show as slowness)."""
    from softprompt import int8_kernels as k

    model = int8("llama")
    prods = {id(m.shared): m.shared for m in model.modules() if isinstance(m, Int8Linear)}
    calls = {"onednn": 0, "math": 0}
    onednn, math = k._onednn, k._math
    monkeypatch.setattr(k, "_onednn", lambda *a: calls.__setitem__("onednn", calls["onednn"] + 1) or onednn(*a))
    monkeypatch.setattr(k, "_math", lambda *a: calls.__setitem__("math", calls["math"] + 1) or math(*a))
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (2, 5)))
    assert calls == {"onednn": len(prods), "math": 0}
