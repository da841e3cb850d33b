"""Model cards: a markdown page for any artifact, from its card (and, for a training run's
`RUN/best` or `RUN/last`, the run's `run.json` hyperparameters and `metrics.jsonl`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from softprompt.families import card_family, family_named
from softprompt.io.artifact import read_card

METHOD_NAMES = {"prompt_tuning": "prompt tuning (Lester et al. 2021)",
                "prefix_tuning": "prefix tuning (Li & Liang 2021)",
                "p_tuning": "P-tuning (Liu et al. 2021)"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v) + "`"
    return f"`{v}`" if v not in (None, "") else "-"


def _table(rows: dict, head=("field", "value")) -> list[str]:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return out


def _prompt_format(fmt) -> str:
    """How training formatted the inputs, in words (a server gives requests the same: docs/serving.md)."""
    if not isinstance(fmt, dict):
        return "not recorded (a server sends chat through the base's chat template, completions as given)"
    words = ("the base's chat template, as a user turn" if fmt.get("chat_template")
             else "plain prompts (no chat template: chat requests must be one user message)")
    if fmt.get("template"):
        words += f"; rows rendered by the template {_fmt(fmt['template'])}"
    if fmt.get("system_prompt"):
        words += f"; system prompt {_fmt(fmt['system_prompt'])}"
    return words


def _run_info(path: Path) -> tuple[dict | None, dict | None]:
    """(run.json, last metrics row) of the training run that wrote `path`, if it is RUN/best|last."""
    run_dir = path.parent if path.name in ("best", "last") else None
    if run_dir is None or not (run_dir / "run.json").is_file():
        return None, None
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except ValueError:
        return None, None
    last = None
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text().splitlines():
            try:
                last = json.loads(line)
            except ValueError:
                pass
    return run, last


def model_card(path: str | os.PathLike) -> str:
    """The artifact's model card as markdown: base model and fingerprint (and LoRA, if any), method
    and sizes, data, hyperparameters, metrics, date, library version."""
    path = Path(path)
    card = read_card(path)
    base = card.get("base_model") or {}
    geo = base.get("geometry") or {}
    method = card["method"]
    P = card["num_virtual_tokens"]
    name = path.name.removesuffix(".safetensors")
    if name in ("best", "last"):
        name = f"{path.parent.name}/{name}"
    lines = [f"# {name}", "",
             f"A {METHOD_NAMES.get(method, method)} artifact for `{base.get('name')}`, made with softprompt "
             f"{card.get('library_version')} on {card.get('created')}.", ""]
    lines += ["## Base model", ""]
    base_name = str(base.get("name") or "")
    rows = {"name": base_name, "fingerprint": base.get("fingerprint")}
    if "+lora:" in base_name:
        rows["LoRA adapter"] = base_name.split("+lora:", 1)[1]
    if geo:
        rows["geometry"] = (f"{geo.get('model_type')}: {geo.get('num_layers')} layers, "
                            f"{geo.get('num_attention_heads')} query heads, {geo.get('num_key_value_heads')} KV heads "
                            f"x {geo.get('head_dim')}, hidden {geo.get('hidden_size')}, vocab {geo.get('vocab_size')}")
    lines += _table(rows) + [""]
    if "+lora:" in base_name:
        lines += ["This prompt was trained on the LoRA-adapted model; it loads only on that model "
                  "(the fingerprint covers the adapted weights) and is refused on the bare base.", ""]
    lines += ["## Method and sizes", ""]
    tensors = {k: f"{v['shape']} {v['dtype']}" for k, v in (card.get("tensors") or {}).items()}
    rows = {"method": method, "virtual tokens (P)": P, **{f"tensor {k}": v for k, v in tensors.items()},
            "artifact bytes (tensors)": f"{card.get('bytes') or 0:,}", "tensor sha256": card.get("tensor_sha256")}
    serving = family_named(card_family(card)).describe_prefix(card)
    if serving:
        rows["KV prefix"] = serving
    lines += _table(rows) + [""]
    lines += ["## Configuration", ""] + _table(card.get("config") or {}, ("option", "value")) + [""]
    run, last = _run_info(path)
    run_data = (run or {}).get("train_data") or (run or {}).get("data_path")  # data_path: runs before train_data
    lines += ["## Data", "", f"- dataset: {_fmt(card.get('dataset') or run_data)}",
              f"- prompt format: {_prompt_format(card.get('prompt_format'))}"]
    if run:
        lines += [f"- held-out data: {_fmt(run.get('eval_data'))}", f"- bad rows: {_fmt(run.get('bad_rows'))}"]
        data = {k: v for k, v in (run.get("data") or {}).items() if v not in (None, False, 0)}
        if data:
            lines += [f"- reading: {_fmt(data)}"]
    lines += [""]
    if run:
        train = {k: v for k, v in (run.get("train") or {}).items()}
        lines += ["## Training hyperparameters", ""] + _table(train, ("hyperparameter", "value"))
        lines += ["", f"Data-parallel processes: {run.get('world', 1)}.", ""]
    lines += ["## Metrics", ""]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += _table(metrics, ("metric", "value"))
    else:
        lines += ["No metrics recorded in the card."]
    if last:
        lines += ["", f"Last logged row of the run: {_fmt(last)}"]
    cmd = f"softprompt generate \"...\" --adapter {path}"
    bare, _, lora = base_name.partition("+lora:")
    if bare and bare != "SmolLM2-135M-Instruct":
        cmd += f" --base {bare}"
    if lora:
        cmd += f" --lora {lora.removesuffix(' (unmerged)')}" + (" --no-merge-lora" if lora.endswith("(unmerged)") else "")
    lines += ["", "## Use", "", "```bash", cmd, "```", ""]
    return "\n".join(lines)
