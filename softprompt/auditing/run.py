"""`softprompt audit` / `softprompt.audit(...)`: resolve what is audited (an artifact path, or a
store task TASK[@VERSION]), run the three measurements (behaviour.py, discrete.py, the nearest
tokens of softprompt/runs/inspect.py) and write the report (report.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from softprompt.auditing.config import AuditConfig

PROBES = Path(__file__).parents[1] / "assets" / "probes" / "offtask.jsonl"


def default_out(ref: str) -> Path:
    return Path(str(ref).rstrip("/").removesuffix(".safetensors") + ".audit")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing OUT unless told (before anything loads); OUT must be a directory."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace the report, or choose a new --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; the report is a directory: choose a new --out")


def locate(ref: str, store=None) -> tuple[Path | None, dict | None]:
    """(artifact path, None) for a path that exists, else (None, the store's row + card) for
    TASK[@VERSION]; a one-line error for neither. Cheap: nothing loads a model."""
    if os.path.lexists(ref):
        return Path(ref), None
    from softprompt.store.core import Store, StoreError

    if "/" in ref or ref.endswith(".safetensors"):
        raise ValueError(f"no artifact at {ref}: the path does not exist (and it is no store task name)")
    try:
        s = Store(store)
        row = s.show(ref)
    except StoreError as e:
        raise ValueError(f"{ref} is no artifact path here, and the store says: {e}") from None
    if row.get("card_error") or not row.get("file_ok"):
        raise ValueError(f"task {ref}: {row.get('card_error') or 'its store file does not match the index'}")
    row["store"] = s.where
    return None, row


def probe_texts(path: Path = PROBES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def task_inputs(inputs, run: dict | None, n: int) -> tuple[list, str]:
    """(prompts, where they came from): --inputs FILE (a .txt file: one input per line; else rows as
    training data), or the training run's held-out data when it can be read; else none."""
    from softprompt.loops.config import DataConfig
    from softprompt.loops.data import DataError, read_examples

    data = {k: v for k, v in ((run or {}).get("data") or {}).items() if k in ("template", "target", "delimiter")}
    if inputs is not None:
        p = Path(inputs)
        if p.suffix == ".txt":
            lines = [x for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
            return lines[:n], f"{inputs} (first {min(n, len(lines))} lines)"
        try:
            exs = read_examples(inputs, DataConfig(**data, max_rows=n))
        except DataError as e:
            raise ValueError(f"--inputs {inputs}: {e}") from None
        return [ex.prompt for ex in exs], f"{inputs} (first {len(exs)} rows)"
    held = (run or {}).get("eval_data")
    if isinstance(held, str) and Path(held).is_file():
        try:
            exs = read_examples(held, DataConfig(**data, max_rows=n))
            return [ex.prompt for ex in exs], f"the run's held-out data {held} (first {len(exs)} rows)"
        except DataError:
            pass
    return [], "none (no --inputs given and no readable held-out data recorded; pass --inputs FILE)"


def _peft_card(prompt) -> dict:
    """What a PEFT adapter directory (no card of ours) says about itself: its method and options."""
    return {"method": prompt.method, "num_virtual_tokens": prompt.num_virtual_tokens,
            "config": prompt.config_dict(), "format": "a PEFT adapter directory (no softprompt card)"}


def _rendering(chat: bool) -> str:
    return "the base's chat template, as a user turn" if chat else "plain (as given)"


def run_audit(ref: str, model, tokenizer, out: Path, *, inputs=None, store=None, config: AuditConfig | None = None,
              progress: bool = True) -> dict:
    """Audit `ref` on the loaded base; writes the report into `out` (checked by the caller)."""
    from tqdm.auto import tqdm

    from softprompt import __version__
    from softprompt.auditing.behaviour import compare_set, encode
    from softprompt.auditing.discrete import approximate
    from softprompt.auditing.provenance import provenance, run_record
    from softprompt.auditing.report import verdict, write
    from softprompt.families import family_of
    from softprompt.io.artifact import load_artifact
    from softprompt.loops.data import render_prompt
    from softprompt.methods.base import InputPromptMethod
    from softprompt.runs.inspect import nearest_tokens

    cfg, t0 = config or AuditConfig(), time.perf_counter()
    path, row = locate(ref, store)
    if family_of(model).name != "causal_lm":
        raise ValueError(f"{ref}: the audit covers prompts for generation on a causal decoder, "
                         f"not on a {family_of(model).name} model")
    if path is not None:  # a classifier is refused here, with the command that fits it
        prompt = load_artifact(path, model)
        card = getattr(prompt, "card", None) or _peft_card(prompt)
    else:
        from softprompt.store.core import Store

        card = row["card"]
        prompt = Store(store).open(f"{row['name']}@{row['version']}", model)
    kv = prompt.to_kv_prefix(model).detach()
    prov = provenance(card, path, row)
    run, _ = run_record(path)
    fmt = card.get("prompt_format") or {}
    chat = bool(fmt.get("chat_template", ((run or {}).get("data") or {}).get("chat_template", False)))
    raw, task_source = task_inputs(inputs, run, cfg.max_inputs)
    probes = probe_texts()[:cfg.max_probes or None]
    task_texts = [render_prompt(p, tokenizer, chat) for p in raw]
    probe_chat = chat if cfg.probe_format == "task" else cfg.probe_format == "chat"
    probe_render = [render_prompt(p["input"], tokenizer, probe_chat) for p in probes]
    k = min(prompt.num_virtual_tokens, cfg.max_hard_tokens)
    fit_n = min(cfg.search_inputs, len(task_texts) or len(probe_render))
    total = 3 * (len(task_texts) + len(probe_render)) + cfg.search_rounds * k + 2 * fit_n
    bar = tqdm(total=total, desc="audit", unit="step", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    task = compare_set(model, tokenizer, task_texts, kv, cfg, bar.update)
    off = compare_set(model, tokenizer, probe_render, kv, cfg, bar.update)
    for r, p in zip(off["rows"], probes):
        r["kind"] = p.get("kind")
    fit_set = task if task_texts else off
    sample = [str(s) for s in (prov["training_data"].get("sample_rows") or [])]
    pool_texts = task_texts + sample + [str((card.get("config") or {}).get("init_text") or "")]
    if not task_texts:
        pool_texts += probe_render
    pool = sorted({t for ids in encode(tokenizer, [t for t in pool_texts if t]) for t in ids})
    discrete = approximate(prompt, model, tokenizer, fit_set["input_ids"], fit_set["prefixed_ids"], pool, cfg,
                           bar.update)
    discrete["fitted_on"] = "task inputs" if task_texts else "off-task probes (no task inputs)"
    bar.update(total - bar.n)  # the search stops early once a round keeps no swap
    bar.close()
    report = {
        "library_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
        "provenance": prov,
        "behaviour": {"task": task, "probes": off, "task_source": task_source,
                      "probe_source": f"the shipped probe set {PROBES.name} ({len(probes)} probes)",
                      "rendering": {"task": _rendering(chat), "probes": _rendering(probe_chat)}},
        "nearest_tokens": nearest_tokens(prompt, model, tokenizer, 5) if isinstance(prompt, InputPromptMethod) else None,
        "discrete": discrete,
    }
    report["verdict"] = verdict(off["summary"], cfg)
    report["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {k: str(v) for k, v in write(report, out).items()}
    return report


def audit(ref: str, out: str | os.PathLike | None = None, *, model=None, tokenizer=None, inputs=None, store=None,
          config: AuditConfig | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Audit a prefix (an artifact path or a store task TASK[@VERSION]) and write the report.

    `model`/`tokenizer`: the base (default: the embedded model, loaded here); `inputs`: held-out task
    inputs (default: the training run's recorded held-out data); `config`: an AuditConfig (options and
    verdict thresholds); `out`: the report directory (default REF.audit), refused if it exists unless
    `overwrite`. Returns the report (what audit.json holds, plus token ids)."""
    out = Path(out) if out is not None else default_out(ref)
    check_out(out, overwrite)
    locate(ref, store)  # a bad reference fails before the model loads
    if inputs is not None and not Path(inputs).is_file():
        raise ValueError(f"--inputs {inputs}: no such file")
    if (model is None) != (tokenizer is None):
        raise ValueError("give both model= and tokenizer= (or neither, for the embedded model)")
    if model is None:
        from softprompt.io.load import load_base

        model, tokenizer = load_base()
    return run_audit(ref, model, tokenizer, out, inputs=inputs, store=store, config=config, progress=progress)
