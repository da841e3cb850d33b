"""A long prompt as a task: compiled exactly (`compile_text`), or distilled into a few virtual tokens
(`distill`). docs/distill.md has the whole story; softprompt/loops/distill.py the objective.

    compile_text   the prompt's own K/V at positions 0..P_t-1 as a prefix-tuning artifact (direct,
                   P = its token count): serving it gives the logits of the prompt written out
                   before each request, token for token (tests/test_distill.py), no training.
    distill        teacher = the model given the compiled prompt; student = the model given a
                   P-token prefix, started from the prompt's own K/V; trained with the one loop
                   (loops/train.py Trainer) on KL(teacher || student) over the teacher's greedy
                   continuations of each input, then measured on held-out inputs.

The boundary between prompt and request: the prefix holds the prompt's tokens (tokenized alone,
no special tokens added) and a request is tokenized alone after it, as the server tokenizes
requests. That equals writing the two out as one string when the prompt ends with a newline and
the request starts with no whitespace (loops/distill.py `boundary_is_clean`; the report says
whether it held).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch

from softprompt.core.geometry import geometry
from softprompt.hf.prefix import compile_ids
from softprompt.io.artifact import save_artifact
from softprompt.loops import distill as D
from softprompt.loops.evaluate import normalize, score
from softprompt.loops.generate import SamplingParams
from softprompt.methods import PrefixTuning, check_size
from softprompt.methods.config import PrefixTuningConfig
from softprompt.runs.distill_config import CompileTextConfig, DistillConfig  # noqa: F401  (public here too)

REPORT_FILES = ("distill.json", "distill.md", "distill.png", "inputs.jsonl")


def _say(cfg: DistillConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def compile_text(model, tokenizer, text: str, *, chat: bool = False) -> PrefixTuning:
    """The long prompt `text` itself as a KV-prefix prompt (prefix tuning, direct, P = its token
    count), ready to save, load, store and serve like any task. Plain: the text's tokens as written
    (no BOS or other special token added: a request is tokenized the same way). `chat`: `text` is a
    system prompt; the prefix is the chat template's system turn, and a request must carry the
    rest of the conversation (loops/distill.py `request_text`)."""
    ids = D.prompt_ids(tokenizer, text, chat)
    check_size(model, "prefix_tuning", len(ids))
    # from_kv stores it as float32 (as every artifact): lossless for a float32 or bfloat16 base
    prompt = PrefixTuning.from_kv(geometry(model), compile_ids(model, ids), {"source": "compiled_text"})
    prompt.card_extra = {"compiled_text": {"tokens": len(ids), "chat": chat, "sha256": _sha(text), "text": text}}
    if not chat:  # requests are plain text after the prefix (a chat-compiled prompt has no recordable format yet)
        prompt.card_extra["prompt_format"] = {"chat_template": False, "template": None, "system_prompt": None}
    prompt.attach_base(model, save_artifact)
    return prompt


# --------------------------------------------------------------------------------------------
# Inputs


def _inputs(cfg: DistillConfig, model, tokenizer, text: str, kv, inputs) -> tuple[list[str], list, dict]:
    """The distinct inputs and each one's labels (all the references a repeated input has, E2E's
    way; [] for none), from `inputs`, `cfg.inputs` or self-study; and what happened."""
    source = inputs if inputs is not None else cfg.inputs
    if source is not None:
        texts, given = D.read_inputs(source, cfg.input_field, cfg.label_field)
        kept = D.distinct(texts)
        distinct = [texts[i].strip() for i in kept]
        refs: dict = {normalize(texts[i]): [] for i in kept}
        for t, label in zip(texts, given):
            if label is not None and normalize(t) in refs:
                refs[normalize(t)].append(label)
        labels = [refs[normalize(texts[i])] for i in kept]
        facts = {"source": str(source) if isinstance(source, (str, os.PathLike)) else "list", "given": len(texts)}
    else:
        # A template with a lead-in ("Record: {input}"): the teacher fills the slot itself; else it is asked.
        # The lead-in's trailing spaces are dropped: byte-level BPE writes a word's space with the word,
        # and a model continuing a bare space writes worse text (seen on the embedded model).
        head = cfg.template.split("{input}")[0].rstrip(" \t")
        ask = head if head.strip() else cfg.self_study_prompt + ("" if cfg.chat else "\n")
        request = D.request_text(tokenizer, text, ask, cfg.chat)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.self_study_temperature, top_p=0.95,
                                seed=cfg.seed, stop=("\n",))
        _say(cfg, f"self-study: the teacher writes {cfg.n_self_study} inputs ...")
        distinct, drawn = D.self_study(model, tokenizer, kv, request, cfg.n_self_study, params, cfg.teacher_batch_size)
        labels = [[] for _ in distinct]
        facts = {"source": "self-study", "request": ask, "drawn": drawn}
    if cfg.max_inputs:
        distinct, labels = distinct[:cfg.max_inputs], labels[:cfg.max_inputs]
    facts["distinct"] = len(distinct)
    return distinct, labels, facts


# --------------------------------------------------------------------------------------------
# The student's start


def student_start(cfg: DistillConfig, model, tokenizer, teacher_kv: torch.Tensor, init: str) -> PrefixTuning:
    """A P-token prefix-tuning prompt at `init` (DISTILL_INITS): the teacher's compiled K/V at its
    first P positions, or at P evenly spaced ones (keys keep the rotation of their first position),
    P random tokens' K/V, or N(0, 1)."""
    P, P_t = cfg.num_virtual_tokens, teacher_kv.shape[3]
    config = {"source": "distill", "distill_init": init}
    if init in ("prompt", "spaced"):
        if P > P_t:
            raise ValueError(f"num_virtual_tokens {P} is longer than the prompt ({P_t} tokens): nothing to distill")
        pos = torch.arange(P) if init == "prompt" else torch.linspace(0, P_t - 1, P).round().long()
        kv = teacher_kv[:, :, :, pos.to(teacher_kv.device)]
    elif init == "vocab":
        g = torch.Generator().manual_seed(cfg.seed)
        V = model.get_input_embeddings().weight.shape[0]
        kv = compile_ids(model, torch.randint(0, V, (P,), generator=g).tolist())
    else:
        spec = PrefixTuningConfig(num_virtual_tokens=P, init="random", projection_dim=cfg.projection_dim, seed=cfg.seed)
        return PrefixTuning.create(model, tokenizer, spec)
    return PrefixTuning.from_kv(geometry(model), kv, config, cfg.projection_dim, cfg.seed)


# --------------------------------------------------------------------------------------------
# The run


def _out_dir(cfg: DistillConfig) -> Path | None:
    """OUT, checked before anything heavy: one that holds files is refused unless `overwrite`."""
    if cfg.out is None:
        return None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; a distillation run needs a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} already holds files; pass overwrite=True (--overwrite) to replace that run, or "
                         "choose a new OUT")
    return out


def _subset(data: D.DistillData, rows: list[int]) -> D.DistillData:
    return D.DistillData([data.ids[i] for i in rows], [data.n_target[i] for i in rows],
                         [data.top_ids[i] for i in rows], [data.top_logq[i] for i in rows])


@dataclass
class Teaching:
    """What the teacher made: the prompt's tokens and K/V, the distinct inputs (their labels, the
    requests they became and those requests' tokens), its greedy continuations, the cached targets,
    the train/held-out split (indices), and how the inputs came about."""

    prompt_ids: list[int]
    kv: torch.Tensor  # (L, 2, H, P_t, D), the model's dtype and device
    texts: list[str]
    labels: list[list[str]]
    requests: list[str]
    continuations: D.Continuations
    data: D.DistillData
    train_rows: list[int]
    held_rows: list[int]
    facts: dict


def teach(cfg: DistillConfig, model, tok, prompt_text: str, inputs=None) -> Teaching:
    """The teacher's part: compile the prompt once, find the inputs (given or self-study), split
    them, continue each greedily and cache the top-k targets over input + continuation."""
    p_ids = D.prompt_ids(tok, prompt_text, cfg.chat)
    check_size(model, "prefix_tuning", len(p_ids) + cfg.max_new_tokens)
    kv = compile_ids(model, p_ids)
    texts, labels, facts = _inputs(cfg, model, tok, prompt_text, kv, inputs)
    requests = [D.request_text(tok, prompt_text, cfg.template.replace("{input}", x), cfg.chat) for x in texts]
    req_ids = [list(tok(r, add_special_tokens=False)["input_ids"]) for r in requests]
    ctx = geometry(model).max_position_embeddings
    fits = [i for i, r in enumerate(req_ids) if r and (not ctx or len(p_ids) + len(r) + cfg.max_new_tokens <= ctx)]
    facts["too_long"] = len(texts) - len(fits)
    texts, labels, requests, req_ids = ([xs[i] for i in fits] for xs in (texts, labels, requests, req_ids))
    train_rows, held_rows = D.split_inputs(texts, cfg.heldout, cfg.seed)
    _say(cfg, f"teacher: {len(p_ids)} prompt tokens; continuing {len(texts)} inputs "
              f"({len(train_rows)} to train on, {len(held_rows)} held out) ...")
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    continuations = D.continue_requests(model, tok, requests, kv, params, cfg.teacher_batch_size)
    data = D.teacher_targets(model, kv, req_ids, continuations.ids, cfg.top_k, cfg.teacher_batch_size, _pad(tok))
    return Teaching(p_ids, kv, texts, labels, requests, continuations, data, train_rows, held_rows,
                    {**facts, "train": len(train_rows), "heldout": len(held_rows)})


def _pad(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def distill(model, tokenizer, prompt_text: str, inputs=None, config: DistillConfig | None = None, **options):
    """Distill `prompt_text` into a `num_virtual_tokens` prefix; returns (student prompt, report dict).

    inputs: a list of strings, or a .jsonl/.csv/.tsv/.txt file (loops/distill.py read_inputs); None: `config.inputs`,
    else self-study. `config` and/or `options`: DistillConfig fields (steps, lr, init, top_k, out, ...).
    With `out`, the student is saved as OUT/best and OUT/last (the training loop's own artifacts,
    with metrics.jsonl and plot.png) beside distill.json, distill.md, distill.png and inputs.jsonl.
    """
    given = {f.name: getattr(config, f.name) for f in fields(config)} if config is not None else {}
    cfg = DistillConfig.of(**{**given, **options})
    out = _out_dir(cfg)  # refused before anything heavy runs
    t0, tok, dev = time.perf_counter(), tokenizer, next(model.parameters()).device
    T = teach(cfg, model, tok, prompt_text, inputs)
    teacher_s = time.perf_counter() - t0
    train_data, held_data = _subset(T.data, T.train_rows), _subset(T.data, T.held_rows)

    ev = partial(D.evaluate, model=model, data=held_data, batch_size=cfg.teacher_batch_size, pad_id=_pad(tok))
    bare = ev(D.FixedPrefix(None))
    starts = {init: ev(D.FixedPrefix(student_start(cfg, model, tok, T.kv, init).kv().detach().to(dev)))["kl"]
              for init in ("prompt", "spaced") if cfg.num_virtual_tokens <= len(T.prompt_ids)}
    student = student_start(cfg, model, tok, T.kv, cfg.init)
    student.attach_base(model, save_artifact)
    student.to(dev)
    start = ev(student)
    _say(cfg, f"held-out KL: bare model {bare['kl']:.4f}, student at start ({cfg.init}) {start['kl']:.4f}")

    t1 = time.perf_counter()
    history = _train(cfg, model, tok, student, train_data, held_data, out, card_fields(cfg, prompt_text, T.prompt_ids))
    train_s = time.perf_counter() - t1
    end = ev(student)
    held_requests = [T.requests[i] for i in T.held_rows]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)
    student_texts = D.continue_requests(model, tok, held_requests, student.to_kv_prefix(model), params,
                                        cfg.teacher_batch_size).texts
    outputs = ([T.continuations.texts[i] for i in T.held_rows], student_texts, [T.labels[i] for i in T.held_rows])
    evals = {"bare": bare, "start": start, "end": end, "init_kl": starts}
    report = _report(cfg, model, len(T.prompt_ids), T.facts, evals, outputs)
    # whether the served form (prompt tokens + request tokens) is also the joint tokenization, on the first input
    first = cfg.template.replace("{input}", T.texts[0])
    report["boundary_clean"] = D.boundary_is_clean(tok, prompt_text, first, cfg.chat)
    report["seconds"] = {"teacher": teacher_s, "train": train_s, "total": time.perf_counter() - t0}
    report["history"] = [{k: r[k] for k in ("step", "loss", "eval_loss", "agreement") if k in r} for r in history]
    if out is not None:
        rows = [(T.texts[i], T.requests[i], T.continuations.texts[i], "train") for i in T.train_rows]
        rows += [(T.texts[i], T.requests[i], T.continuations.texts[i], "heldout", s)
                 for i, s in zip(T.held_rows, student_texts)]
        write_report(out, report, rows)
    _say(cfg, summary_line(report))
    return student, report


def card_fields(cfg: DistillConfig, prompt_text: str, p_ids: list[int]) -> dict:
    """What the student's card records beside the loop's metrics: how requests are formatted, and
    what it was distilled from."""
    extra = {"distill": {"prompt_tokens": len(p_ids), "prompt_sha256": _sha(prompt_text), "chat": cfg.chat,
                         "template": cfg.template, "top_k": cfg.top_k, "init": cfg.init}}
    if not cfg.chat:  # plain requests after the prefix (a chat-distilled prompt has no recordable format yet)
        extra["prompt_format"] = {"chat_template": False, "system_prompt": None,
                                  "template": None if cfg.template == "{input}" else cfg.template}
    return extra


def _train(cfg: DistillConfig, model, tokenizer, student, train_data, held_data, out: Path | None, card: dict):
    """The one training loop with the distillation objective; the run directory as `softprompt
    train` leaves it (runs/train.py: the earlier run's files replaced, best/ and last/ saved)."""
    from softprompt.loops.train import TrainConfig, Trainer, TrainerOutput
    from softprompt.runs.train import prepare_run_dir, save_with

    lr = cfg.lr if cfg.lr is not None else PrefixTuningConfig(projection_dim=cfg.projection_dim).default_lr()
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, eval_every=cfg.eval_every,
                       checkpoint_every=0)
    if out is not None:
        prepare_run_dir(out, resume=False, overwrite=True)  # _out_dir refused a full OUT without overwrite
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
    output = TrainerOutput(out, partial(save_with, card), {"dataset": cfg.inputs or "self-study"}, None, cfg.progress)
    trainer = Trainer(model, tokenizer, student, train_data, tcfg, held_data, None, D.DistillObjective(), output)
    return trainer.run().history


def cache_bytes(model, positions: int) -> int:
    """Bytes of K/V a prefix of `positions` takes per task in the model's cache dtype."""
    g = geometry(model)
    per_value = model.get_input_embeddings().weight.element_size()
    return positions * g.num_layers * 2 * g.num_key_value_heads * g.head_dim * per_value


def _report(cfg, model, prompt_tokens: int, input_facts: dict, evals: dict, outputs: tuple) -> dict:
    """The report's numbers: `evals` holds the held-out evaluations (bare, start, end) and the start
    KL of each K/V init; `outputs` the held-out (teacher texts, student texts, references ([] for none))."""
    P = cfg.num_virtual_tokens
    bare, start, end = evals["bare"], evals["start"], evals["end"]
    teacher_texts, student_texts, labels = outputs
    agree = score(student_texts, [[t] for t in teacher_texts])
    report = {
        "prompt_tokens": prompt_tokens, "num_virtual_tokens": P, "compression": prompt_tokens / P,
        "cache_bytes": {"prompt": cache_bytes(model, prompt_tokens), "student": cache_bytes(model, P)},
        "inputs": input_facts,
        "heldout": {"positions": end["positions"], "kl_bare": bare["kl"], "kl_start": start["kl"], "kl_end": end["kl"],
                    "agreement_bare": bare["agreement"], "agreement_start": start["agreement"],
                    "agreement": end["agreement"],
                    "exact_match": 100 * sum(s == t for s, t in zip(student_texts, teacher_texts)) / len(teacher_texts),
                    "bleu": agree["bleu"], "rouge_l": agree["rouge_l"]},
        "init": cfg.init, "init_kl": evals["init_kl"],
        "config": {k: v for k, v in cfg.__dict__.items() if k != "model"},
    }
    if all(labels):  # labelled inputs: the task's own score, teacher and student
        report["task_score"] = {"teacher": score(teacher_texts, labels), "student": score(student_texts, labels)}
    report["examples"] = [{"teacher": t, "student": s} for t, s in list(zip(teacher_texts, student_texts))[:5]]
    return report


def summary_line(report: dict) -> str:
    h = report["heldout"]
    return (f"distilled {report['prompt_tokens']} prompt tokens into {report['num_virtual_tokens']} "
            f"({report['compression']:.1f}x): held-out KL {h['kl_start']:.4f} -> {h['kl_end']:.4f} (bare model "
            f"{h['kl_bare']:.4f}), next-token agreement {100 * h['agreement']:.1f}%, "
            f"exact match {h['exact_match']:.1f}%, ROUGE-L {h['rouge_l']:.1f}")


def write_report(out: Path, report: dict, rows: list[tuple]) -> None:
    """OUT/distill.json, distill.md, distill.png (the KL curve) and inputs.jsonl (every input, its
    request, the teacher's continuation, its split, and the student's on held-out ones)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "distill.md").write_text(markdown(report))
    with open(out / "inputs.jsonl", "w") as f:
        for row in rows:
            keys = ("input", "request", "teacher", "split", "student")
            f.write(json.dumps(dict(zip(keys, row))) + "\n")
    plot_kl(report, out / "distill.png")


def markdown(report: dict) -> str:
    h, c, i = report["heldout"], report["cache_bytes"], report["inputs"]
    rows = [("", "bare model", "student at start", "student"),
            ("KL(teacher ‖ ·) per position", f"{h['kl_bare']:.4f}", f"{h['kl_start']:.4f}", f"{h['kl_end']:.4f}"),
            ("next-token agreement", f"{100 * h['agreement_bare']:.1f}%", f"{100 * h['agreement_start']:.1f}%",
             f"{100 * h['agreement']:.1f}%")]
    table = [f"| {' | '.join(r)} |" for r in rows]
    table.insert(1, "|---|---|---|---|")
    lines = ["# Distillation report", "", summary_line(report), "",
             f"- prompt: {report['prompt_tokens']} tokens -> {report['num_virtual_tokens']} virtual tokens "
             f"({report['compression']:.1f}x); cache per task {c['prompt'] / 2**20:.2f} MiB -> "
             f"{c['student'] / 2**20:.3f} MiB",
             f"- inputs: {i['distinct']} distinct ({i['source']}), {i['train']} trained on, {i['heldout']} held out"
             + (f", {i['too_long']} too long" if i.get("too_long") else ""),
             f"- init: {report['init']}" + "".join(f"; held-out KL at start from {k}: {v:.4f}"
                                                   for k, v in report["init_kl"].items()),
             f"- boundary: the prompt's tokens + a request's are{'' if report.get('boundary_clean') else ' not'} the "
             "tokens of the two written out as one string (docs/distill.md, \"The boundary\")",
             f"- held-out greedy continuations, student vs teacher: exact match {h['exact_match']:.1f}%, "
             f"BLEU {h['bleu']:.2f}, ROUGE-L {h['rouge_l']:.2f} ({h['positions']} taught positions)",
             "", *table, ""]
    if "task_score" in report:
        t, s = report["task_score"]["teacher"], report["task_score"]["student"]
        lines += [f"- task score against the labels ({name}): teacher {t[key]:.2f}, student {s[key]:.2f}"
                  for key, name in (("bleu", "BLEU"), ("rouge_l", "ROUGE-L"), ("exact_match", "exact match %"),
                                    ("accuracy", "first-word accuracy %"))] + [""]
    secs = report.get("seconds", {})
    if secs:
        lines += [f"- time: teacher {secs['teacher']:.0f} s, training {secs['train']:.0f} s, "
                  f"total {secs['total']:.0f} s", ""]
    lines += ["## Examples (held out)", ""] + [f"- teacher: {e['teacher']!r}\n  student: {e['student']!r}"
                                               for e in report["examples"]]
    return "\n".join(lines) + "\n"


def plot_kl(report: dict, path: Path) -> Path | None:
    """PNG: the training KL per step, the held-out KL at start, evaluations and end, and the bare model's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    hist, h = report["history"], report["heldout"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in hist], [r["loss"] for r in hist], color="tab:blue", lw=1, label="training KL")
    ev = [(0, h["kl_start"])] + [(r["step"], r["eval_loss"]) for r in hist if "eval_loss" in r]
    ax.plot(*zip(*ev), "o-", color="tab:orange", label="held-out KL")
    ax.axhline(h["kl_bare"], color="gray", ls="--", lw=1, label="bare model (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("KL per position (nats)")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The command line's runs: cli.py parsed the configs and, before anything heavy loaded, checked the
# paths read and refused an OUT it would overwrite without --overwrite (cli.check_paths)


def read_prompt_file(path: str) -> str:
    """The long prompt's text, as written (UTF-8); a one-line ValueError for an empty or unreadable file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} holds no prompt text")
    return text


def run_compile_text(cfg: CompileTextConfig) -> Path:
    """`softprompt compile-text PROMPT_FILE OUT`: the prompt as a KV-prefix artifact at OUT."""
    from softprompt.io.load import load_base

    text = read_prompt_file(cfg.prompt_file)
    model, tok = load_base(cfg.model.base)
    prompt = compile_text(model, tok, text, chat=cfg.chat)
    path = prompt.save_pretrained(cfg.out)
    print(f"compiled {prompt.num_virtual_tokens} prompt tokens into a prefix at {path}", file=sys.stderr)
    return Path(path)


def run_distill(cfg: DistillConfig) -> dict:
    """`softprompt distill PROMPT_FILE OUT`: the student in OUT/best, the report beside it."""
    from softprompt.io.load import load_base

    text = read_prompt_file(cfg.prompt_file)
    model, tok = load_base(cfg.model.base)
    _, report = distill(model, tok, text, config=cfg)
    print(summary_line(report), file=sys.stderr)
    return report
