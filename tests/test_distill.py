"""A long prompt as a task: compiled exactly (`sp.compile_text`: the logits of the prompt written out),
or distilled into a few virtual tokens (`sp.distill`: KL to the teacher's top-k, checked against a
hand computation; a trained student moves toward the teacher). Tiny models, seconds each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

import softprompt as sp
from softprompt.core.geometry import geometry
from softprompt.hf.prefix import compile_ids, prefixed_forward
from softprompt.loops import distill as D
from softprompt.loops.generate import SamplingParams, generate_ids
from softprompt.methods import PrefixTuning
from softprompt.serve import Engine, Request

# A prompt of 30 words, inputs of 3 to 5: random text (the tiny models are random too), fixed here.
PROMPT = " ".join(WORDS[(7 * i + 3) % 92] for i in range(30)) + "\n"
INPUTS = [" ".join(WORDS[(11 * j + 5 * i) % 92] for i in range(3 + j % 3)) for j in range(24)]
# A chat template for the word-level tokenizer: roles and the turn markers are words of its vocabulary.
CHAT = ("{% for m in messages %}[BOS] {{ 'ba' if m['role'] == 'system' else 'be' if m['role'] == 'user' else 'bi' }} "
        "{{ m['content'] }} [EOS] {% endfor %}{% if add_generation_prompt %}[BOS] bi{% endif %}")


def ids_of(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# compile_text: the prompt itself, exactly


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # llama 6/2 and qwen2 4/2 heads: grouped-query
def test_compiled_prompt_gives_the_logits_of_the_prompt_written_out(arch):
    """In float64, so the comparison shows the construction (positions 0..P-1, then P, P+1, ...;
    masks; no BOS) and not round-off: the two sides differ only in summation order (a cache read
    vs one pass over the whole text), which costs ~1e-15 of the logits' scale; 1e-10 leaves room
    on any CPU while a position off by one moves logits by O(1)."""
    model, tok = tiny_model(arch).double(), tiny_tokenizer()
    p_ids = D.prompt_ids(tok, PROMPT)
    assert p_ids == ids_of(tok, PROMPT) and p_ids[0] != tok.bos_token_id  # as written: no BOS added
    kv = compile_ids(model, p_ids)
    assert kv.shape == geometry(model).prefix_shape(len(p_ids))
    for text in INPUTS[:3]:
        x = torch.tensor([ids_of(tok, text)])
        ours = prefixed_forward(model, x, torch.ones_like(x), [kv], use_cache=False).logits[0]
        full = torch.tensor([p_ids + ids_of(tok, text)])
        want = model(input_ids=full, use_cache=False).logits[0, len(p_ids):]
        assert (ours - want).abs().max() <= 1e-10 * want.abs().max()
        # and the written-out ids are what the two texts tokenize to as one string (a clean boundary)
        assert ids_of(tok, PROMPT + text) == full[0].tolist() and D.boundary_is_clean(tok, PROMPT, text)


def test_compiled_artifact_serves_like_the_prompt_written_out(tmp_path):
    """float32 end to end: the artifact (float32, as the model computes: lossless), sp.load, the
    store and the serving Engine give the tokens of the prompt written out, and logits within
    float32 round-off (1e-5 of their scale on a 2-layer model: ~100x float32's epsilon, so no
    CPU's kernels can leave it, while a dropped or shifted prompt moves them by O(1))."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = sp.compile_text(model, tok, PROMPT)
    assert isinstance(prompt, PrefixTuning) and not prompt.projection_dim
    assert prompt.num_virtual_tokens == len(ids_of(tok, PROMPT))
    path = prompt.save_pretrained(tmp_path / "long")
    card = json.loads((path / "card.json").read_text())
    assert card["compiled_text"]["text"] == PROMPT and card["compiled_text"]["tokens"] == prompt.num_virtual_tokens
    assert card["prompt_format"] == {"chat_template": False, "template": None, "system_prompt": None}
    loaded = sp.load(path, model)
    assert torch.equal(loaded.kv(), prompt.kv())

    store = sp.Store(tmp_path / "store")
    store.add("long", path, model)
    from softprompt.serve.tasks import TaskRegistry

    for tasks in ({"long": str(path)}, TaskRegistry(fallback=store.entry)):
        engine = Engine(model, tok, tasks, keep_logits=True)
        for text in INPUTS[:4]:
            out = engine.generate([Request(prompt=text, task="long", max_new_tokens=6, ignore_eos=True)])[0]
            full = torch.tensor([ids_of(tok, PROMPT + text)])
            want = generate_ids(model, full, torch.ones_like(full), [None],
                                SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
            assert out.token_ids == want
            seq = torch.tensor([full[0].tolist() + want[:-1]])
            with torch.no_grad():
                logits = model(input_ids=seq).logits[0, full.shape[1] - 1:]
            assert (out.logits - logits).abs().max() <= 1e-5 * logits.abs().max()

    # and over HTTP from the store, like any task: the engine's tokens as text
    import httpx
    from test_http import Server

    from softprompt.serve.http import ServerConfig, create_app

    engine = Engine(model, tok, TaskRegistry(fallback=store.entry))
    want = engine.generate([Request(prompt=INPUTS[0], task="long", max_new_tokens=6, ignore_eos=True)])[0].text
    with Server(create_app(engine, store, ServerConfig(base_model_id="base"))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "long", "prompt": INPUTS[0], "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def test_chat_prompt_compiles_the_system_turn():
    """With chat=True the prefix is the template's system turn, and a request carries the rest of
    the conversation: together, token for token, the whole conversation written out."""
    model, tok = tiny_model("qwen2").double(), tiny_tokenizer()
    tok.chat_template = CHAT
    p_ids = D.prompt_ids(tok, PROMPT, chat=True)
    user = INPUTS[0]
    rest = D.request_text(tok, PROMPT, user, chat=True)
    whole = tok.apply_chat_template([{"role": "system", "content": PROMPT}, {"role": "user", "content": user}],
                                    tokenize=False, add_generation_prompt=True)
    assert p_ids + ids_of(tok, rest) == ids_of(tok, whole) and p_ids[0] == tok.bos_token_id
    x = torch.tensor([ids_of(tok, rest)])
    ours = prefixed_forward(model, x, torch.ones_like(x), [compile_ids(model, p_ids)], use_cache=False).logits[0]
    want = model(input_ids=torch.tensor([ids_of(tok, whole)])).logits[0, len(p_ids):]
    assert (ours - want).abs().max() <= 1e-10 * want.abs().max()
    prompt = sp.compile_text(model.float(), tok, PROMPT, chat=True)
    assert "prompt_format" not in prompt.card_extra  # no format a server could apply records this yet
    with pytest.raises(ValueError, match="chat template"):
        D.prompt_ids(tiny_tokenizer(), PROMPT, chat=True)


# --------------------------------------------------------------------------------------------
# The objective against a hand computation


def _hand_kl(teacher_logits, student_logits, k):
    """KL between the (k+1)-bucket coarsenings, by explicit sums over probabilities (float64)."""
    out = []
    for t, s in zip(teacher_logits, student_logits):
        q, p = t.softmax(-1), s.softmax(-1)
        top = torch.argsort(q, descending=True)[:k]
        rest = torch.ones_like(q, dtype=torch.bool)
        rest[top] = False
        qb = torch.cat([q[top], q[rest].sum().view(1)])
        pb = torch.cat([p[top], p[rest].sum().view(1)])
        if not rest.any():  # k = V: no tail bucket
            qb, pb = q[top], p[top]
        out.append(F.kl_div(pb.log(), qb, reduction="sum"))
    return torch.stack(out)


def test_topk_kl_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    t, s = (torch.randn(5, 12, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    full = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    for k in (1, 4, 11, 12):
        ids, logq = D.topk_targets(t, k)
        assert ids.dtype == torch.int32 and logq.shape == (5, k + 1) and logq.dtype == torch.float64
        got = D.topk_kl(s, ids, logq)
        assert torch.allclose(got, _hand_kl(t, s, k), rtol=1e-12, atol=1e-14)
        assert (got >= 0).all() and (got <= full + 1e-12).all()  # coarsening never raises a KL
        if k >= 11:  # a tail of at most one token: the coarsened KL is the full one
            assert torch.allclose(got, full, rtol=1e-12, atol=1e-14)
    assert torch.equal(D.topk_kl(t, *D.topk_targets(t, 4)), torch.zeros(5, dtype=torch.float64))


def test_objective_on_a_tiny_model_equals_a_hand_computation():
    """The cached targets (one padded batch, head at the taught positions only) and the loop's loss
    equal each row run alone with full logits and the KL summed by hand, in float64."""
    model, tok = tiny_model("llama").double(), tiny_tokenizer()
    teacher_kv = compile_ids(model, D.prompt_ids(tok, PROMPT))
    student = D.FixedPrefix(compile_ids(model, D.prompt_ids(tok, PROMPT)[:5]))
    reqs = [ids_of(tok, x) for x in INPUTS[:3]]
    conts = [[7, 8, 9], [10], [11, 12, 13, 14, 2]]
    data = D.teacher_targets(model, teacher_kv, reqs, conts, k=6, batch_size=2)
    loss, n = D.DistillObjective().loss(student, model, data, [0, 1, 2], 0, torch.device("cpu"))
    assert n == sum(map(len, conts))
    want = torch.zeros((), dtype=torch.float64)
    for i, (r, c) in enumerate(zip(reqs, conts)):
        seq = torch.tensor([r + c])
        at = slice(len(r) - 1, len(r) + len(c) - 1)  # the positions that predict c
        t = prefixed_forward(model, seq, torch.ones_like(seq), [teacher_kv], use_cache=False).logits[0, at]
        s = student(model, seq, torch.ones_like(seq)).logits[0, at]
        assert torch.equal(data.top_ids[i].long(), t.topk(6, dim=-1).indices)
        want = want + _hand_kl(t, s, 6).sum()
    assert abs(float(loss) - float(want)) <= 1e-10 * float(want) and float(want) > 0


# --------------------------------------------------------------------------------------------
# Inputs: de-duplication and the split


def test_dedupe_and_split_are_deterministic():
    texts = ["Hello, world", "hello world!", "  other  ", "", "Other", "third one"]
    assert D.dedupe(texts) == ["Hello, world", "other", "third one"]
    many = [f"input {i}" for i in range(20)]
    train, held = D.split_inputs(many, 0.25, seed=3)
    assert (train, held) == D.split_inputs(many, 0.25, seed=3) and len(held) == 5
    assert sorted(train + held) == list(range(20)) and not set(train) & set(held)
    assert D.split_inputs(many, 0.25, seed=4) != (train, held)
    with pytest.raises(ValueError, match="at least 2"):
        D.split_inputs(["one"], 0.5, 0)


def test_self_study_is_deterministic_with_a_seed():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kv = compile_ids(model, D.prompt_ids(tok, PROMPT))
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=5)
    a, drawn = D.self_study(model, tok, kv, INPUTS[0], 10, params, batch_size=4)
    assert (a, drawn) == D.self_study(model, tok, kv, INPUTS[0], 10, params, batch_size=4)
    assert len(a) == 10 and len(D.dedupe(a)) == 10 and drawn >= 10
    assert D.self_study(model, tok, kv, INPUTS[0], 10, SamplingParams(max_new_tokens=4, temperature=1.0, seed=6),
                        batch_size=4)[0] != a


# --------------------------------------------------------------------------------------------
# distill: end to end


OPTIONS = dict(num_virtual_tokens=4, steps=40, batch_size=6, lr=3e-2, top_k=16, max_new_tokens=5, stop=(),
               heldout=0.25, progress=False)


def test_distill_moves_the_student_toward_the_teacher(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    student, report = sp.distill(model, tok, PROMPT, INPUTS, out=str(tmp_path / "run"), **OPTIONS)
    h = report["heldout"]
    assert report["inputs"]["train"] == 18 and report["inputs"]["heldout"] == 6
    assert h["kl_end"] < h["kl_start"] and h["kl_end"] < h["kl_bare"]
    assert report["compression"] == len(ids_of(tok, PROMPT)) / 4
    assert report["cache_bytes"]["prompt"] == 30 * report["cache_bytes"]["student"] // 4
    assert set(report["init_kl"]) == {"prompt", "spaced"} and report["boundary_clean"]
    run = tmp_path / "run"
    for name in ("distill.json", "distill.md", "distill.png", "inputs.jsonl", "best", "last", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert json.loads((run / "distill.json").read_text())["heldout"]["kl_end"] == h["kl_end"]
    rows = [json.loads(line) for line in (run / "inputs.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and sum(r["split"] == "heldout" for r in rows) == 6

    # the student is a task like any other: it loads, and the engine serves it
    loaded = sp.load(run / "last", model)
    assert torch.equal(loaded.kv(), student.kv().detach().cpu())
    card = json.loads((run / "last" / "card.json").read_text())
    assert card["distill"]["prompt_tokens"] == 30 and card["prompt_format"]["chat_template"] is False
    kv = loaded.to_kv_prefix(model)
    engine = Engine(model, tok, {"student": str(run / "last")})
    for text in INPUTS[:3]:
        out = engine.generate([Request(prompt=text, task="student", max_new_tokens=5, ignore_eos=True)])[0]
        x = torch.tensor([ids_of(tok, text)])
        assert out.token_ids == generate_ids(model, x, torch.ones_like(x), [kv],
                                             SamplingParams(max_new_tokens=5, ignore_eos=True))[0]


def test_an_existing_out_is_refused_without_overwrite(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files"):
        sp.distill(model, tok, PROMPT, INPUTS, out=str(out), **OPTIONS)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # refused before anything was written
    sp.distill(model, tok, PROMPT, INPUTS, out=str(out), overwrite=True, **dict(OPTIONS, steps=2))
    assert (out / "distill.json").exists() and (out / "keep.txt").read_text() == "mine"


def test_inputs_from_files_and_self_study(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = [{"input": x, "output": WORDS[i]} for i, x in enumerate(INPUTS[:8])] + [{"input": INPUTS[0], "output": "x"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in.txt").write_text("\n".join(INPUTS[:8]) + "\n\n")
    assert D.dedupe(D.read_inputs(tmp_path / "in.txt")[0]) == INPUTS[:8]
    opts = dict(OPTIONS, steps=2)
    _, report = sp.distill(model, tok, PROMPT, str(tmp_path / "in.jsonl"), **opts)
    assert report["inputs"]["distinct"] == 8 and "task_score" in report  # labelled: the task's own score too
    (tmp_path / "in.csv").write_text("mr,ref\n" + "".join(f"{x},{WORDS[i]}\n" for i, x in enumerate(INPUTS[:8]))
                                     + f"{INPUTS[0]},{WORDS[50]}\n")
    texts, labels = D.read_inputs(tmp_path / "in.csv", "mr", "ref")
    assert texts == INPUTS[:8] + INPUTS[:1] and labels[-1] == WORDS[50]
    _, report = sp.distill(model, tok, PROMPT, None, sp.DistillConfig(inputs=str(tmp_path / "in.csv"),
                                                                    input_field="mr", label_field="ref"), **opts)
    assert report["inputs"]["distinct"] == 8 and report["task_score"]["teacher"]["n"] == 2  # two held out
    _, report = sp.distill(model, tok, PROMPT, None, n_self_study=8, template="ba {input} be", **opts)
    assert report["inputs"]["source"] == "self-study" and report["inputs"]["request"] == "ba"
    assert report["inputs"]["distinct"] == 8


def test_config_is_torch_free_and_validated():
    code = ("import sys; from softprompt.runs.distill_config import DistillConfig; DistillConfig(); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert sp.DistillConfig(stop="\n").stop == ("\n",)
    assert sp.DistillConfig.of(base="somewhere", steps=3).model.base == "somewhere"
    for bad in (dict(init="zeros"), dict(template="no slot"), dict(heldout=1.0), dict(num_virtual_tokens=0),
                dict(stop=("",)), dict(self_study_temperature=0.0)):
        with pytest.raises(ValueError):
            sp.DistillConfig(**bad)


@pytest.mark.embedded
def test_the_weather_prompt_on_the_embedded_model():
    """The shipped weather prompt on SmolLM2-135M: ~600 tokens, a clean boundary where it ends with
    one newline (and not with a space or two newlines, which byte-level BPE merges with the
    request), and compiled, the written-out logits within 1e-4 of their scale (float32 over 30
    layers: 1.2e-6 measured, a margin of ~80x for other CPUs' summation orders) and its tokens."""
    from softprompt.io.load import load_base

    model, tok = load_base()
    text = (Path(sp.__file__).parent / "assets" / "prompts" / "weather.txt").read_text()
    request = "Record: city: Oslo | sky: rain | high: 3 | wind: calm\nReport:"
    p_ids = D.prompt_ids(tok, text)
    assert 550 <= len(p_ids) <= 700 and text.endswith(".\n")
    assert D.boundary_is_clean(tok, text, request)
    assert not D.boundary_is_clean(tok, text[:-1] + " ", request) and not D.boundary_is_clean(tok, text + "\n", request)
    x = torch.tensor([ids_of(tok, request)])
    with torch.no_grad():
        ours = prefixed_forward(model, x, torch.ones_like(x), [compile_ids(model, p_ids)], use_cache=False).logits[0]
        want = model(input_ids=torch.tensor([p_ids + x[0].tolist()])).logits[0, len(p_ids):]
    assert (ours - want).abs().max() <= 1e-4 * want.abs().max()
    compiled = sp.compile_text(model, tok, text)
    assert sp.generate(model, tok, [request], compiled, max_new_tokens=16, stop=["\n"]) == \
        sp.generate(model, tok, [text + request], None, max_new_tokens=16, stop=["\n"])


def test_through_the_mlp_the_student_starts_at_the_prompt_and_exports_a_plain_prefix(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    student, report = sp.distill(model, tok, PROMPT, INPUTS, out=str(tmp_path / "run"),
                                 **dict(OPTIONS, steps=3, projection_dim=8, lr=None))
    assert student.projection_dim == 8 and report["heldout"]["kl_start"] == report["init_kl"]["prompt"]
    loaded = sp.load(tmp_path / "run" / "last", model)
    assert not loaded.projection_dim and torch.equal(loaded.kv(), student.kv().detach().cpu())


# --------------------------------------------------------------------------------------------
# The command line: `softprompt compile-text` and `softprompt distill`, on a tiny base directory


def test_the_commands_write_artifacts_that_load_and_refuse_to_overwrite(base_dir, tmp_path, capsys):
    from softprompt.cli import main

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(INPUTS) + "\n", encoding="utf-8")
    long = tmp_path / "long"
    assert main(["compile-text", str(prompt_file), str(long), "--base", str(base_dir)]) == 0
    model = sp.load_base(str(base_dir))[0]
    assert sp.load(long, model).num_virtual_tokens == len(ids_of(tiny_tokenizer(), PROMPT))
    assert main(["compile-text", str(prompt_file), str(long), "--base", str(base_dir)]) == 2  # no overwrite
    assert "already exists" in capsys.readouterr().err

    run = tmp_path / "run"
    argv = ["distill", str(prompt_file), str(run), "--inputs", str(inputs), "--base", str(base_dir),
            "--num-virtual-tokens", "4", "--steps", "3", "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    assert (run / "distill.md").exists() and sp.load(run / "best", model).num_virtual_tokens == 4
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nothere.txt"), str(tmp_path / "r2")]) == 2
    assert "no prompt file at" in capsys.readouterr().err and not (tmp_path / "r2").exists()
