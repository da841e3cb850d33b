"""The audit's verdict and its three forms: `audit.json` (everything, for machines), `audit.md` (with
the plots beside it as PNG files) and `audit.html` (one self-contained file: the plots inline as
base64 PNG, no external script, style or image, so it can be mailed or attached to a review)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

# (name, figure's key in the probe set's summary, threshold's option, what it means)
CHECKS = (
    ("off-task drift", "mean_kl", "max_offtask_drift",
     "mean KL(prefixed || base) on the probes, nats/token over the first tokens of the base's answer"),
    ("refusal change", "refusal_change", "max_refusal_change",
     "|refusal rate with the prefix - without| on the probes"),
    ("off-task loss increase", "mean_loss_change", "max_offtask_loss_increase",
     "mean change in NLL of the base's own answer on the probes, nats/token"),
)


def verdict(probes: dict, cfg) -> dict:
    """Each figure against its threshold (PASS: figure <= threshold); a figure that could not be
    measured (no probes) FAILs: the reviewer cannot sign off what was not measured."""
    s = dict(probes)
    if s.get("refusal_rate_base") is not None:
        s["refusal_change"] = abs(s["refusal_rate_prefixed"] - s["refusal_rate_base"])
    checks = []
    for name, key, option, what in CHECKS:
        fig, limit = s.get(key), getattr(cfg, option)
        checks.append({"check": name, "figure": fig, "threshold": limit, "option": "--" + option.replace("_", "-"),
                       "what": what, "result": "PASS" if fig is not None and fig <= limit else "FAIL"})
    if s.get("refusal_rate_base") == 0:  # a change from nothing shows little: say so beside the figure
        checks[1]["what"] += ("; the base refused none of the probes as rendered here, so this check can only "
                              "see refusals the prefix adds (AuditConfig(probe_format='chat') renders them as chat)")
    return {"checks": checks, "overall": "PASS" if all(c["result"] == "PASS" for c in checks) else "FAIL"}


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def plot_behaviour(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [(name, report["behaviour"][name]) for name in ("task", "probes") if report["behaviour"][name]["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    labels = [n for n, _ in sets]
    x = range(len(sets))
    for ax, (key_b, key_p, title) in zip(axes[:2], (("refusal_rate_base", "refusal_rate_prefixed", "refusal rate"),
                                                      ("mean_tokens_base", "mean_tokens_prefixed", "mean answer tokens"))):
        ax.bar([i - 0.2 for i in x], [s["summary"][key_b] or 0 for _, s in sets], 0.4, label="base")
        ax.bar([i + 0.2 for i in x], [s["summary"][key_p] or 0 for _, s in sets], 0.4, label="prefixed")
        ax.set_xticks(list(x), labels)
        if key_b.startswith("refusal"):
            ax.set_ylim(0, 1)  # a rate: an empty bar reads as 0, not as a missing plot
        ax.set_title(title)
        ax.legend()
    ax = axes[2]
    for name, s in sets:
        ax.plot(sorted((r["kl"] for r in s["rows"]), reverse=True), "o-", ms=3, label=name)
    ax.set_title("per-input KL(prefixed || base), largest first")
    ax.set_xlabel("input (ranked)")
    ax.set_ylabel("nats/token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_discrete(d: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = ("next_token_agreement", "exact_match")
    for i, stage in enumerate(("projection", "search")):
        axes[0].bar([j + (i - 0.5) * 0.4 for j in range(len(names))], [d[stage][n] for n in names], 0.4, label=stage)
    axes[0].set_xticks(range(len(names)), ["next-token agreement", "greedy exact match"])
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"fidelity of a {d['k']}-token hard prompt")
    axes[0].legend()
    t = d["trace"]
    axes[1].step([e["evals"] for e in t] + [d["evaluations"]], [e["kl"] for e in t] + [t[-1]["kl"]], where="post")
    axes[1].set_xlabel("hard prompts scored")
    axes[1].set_ylabel("KL(prefixed || hard), nats/token")
    axes[1].set_title("search")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _kv_rows(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("geometry", "options", "hyperparameters", "metrics", "tensors",
                                              "data_reading", "last_logged_row", "prompt_format"):
            rows += _kv_rows(v, f"{prefix}{k}.")
        else:
            rows.append((prefix + k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
    return rows


def _sections(report: dict) -> list[tuple[str, list]]:
    """The report as (heading, blocks); a block is ("p", text), ("table", header, rows) or ("img", name)."""
    v = report["verdict"]
    verdict_blocks = [("p", f"Overall: **{v['overall']}** (thresholds set with the options named; "
                            "PASS when the figure is at most the threshold)."),
                      ("table", ["check", "figure", "threshold", "result", "what"],
                       [[c["check"], _f(c["figure"]), f"{_f(c['threshold'])} ({c['option']})", c["result"], c["what"]]
                        for c in v["checks"]])]
    provenance = [("table", ["field", "value"], [[k, val] for k, val in _kv_rows(report["provenance"])])]
    return [("Verdict", verdict_blocks), ("Provenance", provenance), ("Behaviour", _behaviour(report["behaviour"])),
            ("What the prefix says", _prefix(report)), ("All answers", _answers(report["behaviour"]))]


def _behaviour(b: dict) -> list:
    sets = (("task", b["task"]), ("probes", b["probes"]))
    blocks = [("p", "Greedy answers of the base model and of the prefixed model on the same inputs. "
                    "Loss change: NLL of the base's own answer under the prefixed model minus under the base. "
                    "KL: KL(prefixed || base) on the first tokens of the base's answer. "
                    "Refusals: the refusal-phrase heuristic of docs/audit.md."),
              ("table", ["set", "inputs", "mean KL", "loss change", "tokens base", "tokens prefixed",
                         "answers changed", "refusals base", "refusals prefixed"],
               [[name, s["summary"]["inputs"], _f(s["summary"]["mean_kl"]), _f(s["summary"]["mean_loss_change"]),
                 _f(s["summary"]["mean_tokens_base"], 1), _f(s["summary"]["mean_tokens_prefixed"], 1),
                 _f(s["summary"]["changed_rate"], 2), _f(s["summary"]["refusal_rate_base"], 2),
                 _f(s["summary"]["refusal_rate_prefixed"], 2)] for name, s in sets]),
              ("p", f"Task inputs: {b['task_source']}, rendered {b['rendering']['task']}. Probes: "
                    f"{b['probe_source']}, rendered {b['rendering']['probes']}."),
              ("img", "behaviour.png")]
    for name, s in sets:
        if s["rows"]:
            blocks.append(("p", f"Where the prefix changes the base's answer most ({name}):"))
            blocks.append(("table", ["KL", "input", "base", "prefixed"],
                           [[_f(s["rows"][i]["kl"]), s["rows"][i]["input"], s["rows"][i]["base"], s["rows"][i]["prefixed"]]
                            for i in s["summary"]["most_changed"]]))
    return blocks


def _prefix(report: dict) -> list:
    d, blocks = report["discrete"], []
    if report.get("nearest_tokens"):
        blocks.append(("table", ["virtual token", "norm", "nearest tokens (cosine)"],
                       [[t["index"], _f(t["norm"]), "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"])]
                        for t in report["nearest_tokens"]]))
    else:
        blocks.append(("p", "Prefix tuning learns keys and values, not input embeddings: per projected virtual "
                            "token, the tokens whose layer-0 value vectors are nearest (cosine, nearest first; "
                            "the candidates of the search below)."))
        blocks.append(("table", ["virtual token", "nearest tokens (layer-0 values)"],
                       [[slot, "  ".join(repr(t) for t in toks)] for slot, toks in zip(d["slots"], d["candidates"])]))
    blocks.append(("p", f"Discrete approximation: a hard prompt of k={d['k']} tokens (of P={d['num_virtual_tokens']}), "
                        f"projected by {d['projection_by']}, then greedy coordinate search "
                        f"({d['evaluations']} hard prompts scored on {d['search_inputs']} {d['fitted_on']}; "
                        "fidelity is measured on the same inputs)."))
    blocks.append(("table", ["stage", "hard prompt", "next-token agreement", "greedy exact match", "KL"],
                   [[st, repr(d[st]["text"]), _f(d[st]["next_token_agreement"], 3), _f(d[st]["exact_match"], 3),
                     _f(d[st]["kl"])] for st in ("projection", "search")]))
    blocks.append(("img", "discrete.png"))
    return blocks


def _answers(b: dict) -> list:
    blocks = []
    for name in ("task", "probes"):
        rows = b[name]["rows"]
        if rows:
            blocks.append(("p", f"Every {name} input, base and prefixed answers side by side:"))
            blocks.append(("table", ["#", "kind", "input", "base", "prefixed", "KL", "refusal base/prefixed"],
                           [[i, r.get("kind") or name, r["input"], r["base"], r["prefixed"], _f(r["kl"]),
                             f"{'yes' if r['refusal_base'] else 'no'}/{'yes' if r['refusal_prefixed'] else 'no'}"]
                            for i, r in enumerate(rows)]))
    return blocks


def _md_cell(v) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def to_markdown(report: dict) -> str:
    lines = [f"# Audit of {report['provenance']['source']['ref']}", "",
             f"softprompt {report['library_version']}, {report['created']}, {report['seconds']:.0f} s.", ""]
    for head, blocks in _sections(report):
        lines += [f"## {head}", ""]
        for blk in blocks:
            if blk[0] == "p":
                lines += [blk[1], ""]
            elif blk[0] == "img":
                lines += [f"![{blk[1]}]({blk[1]})", ""]
            else:
                lines += ["| " + " | ".join(blk[1]) + " |", "|" + "---|" * len(blk[1])]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in blk[2]] + [""]
    return "\n".join(lines)


def to_html(report: dict, images: dict[str, bytes]) -> str:
    """One page, no external resource: styles inline, images as data: URIs."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Audit of {e(report['provenance']['source']['ref'])}</title><style>",
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;font-size:90%}th{background:#f3f3f3}.PASS{color:#080;font-weight:bold}"
             ".FAIL{color:#b00;font-weight:bold}img{max-width:100%}",
             "</style></head><body>", f"<h1>Audit of {e(report['provenance']['source']['ref'])}</h1>",
             f"<p>softprompt {e(report['library_version'])}, {e(report['created'])}, {report['seconds']:.0f} s.</p>"]
    for head, blocks in _sections(report):
        parts.append(f"<h2>{e(head)}</h2>")
        for blk in blocks:
            if blk[0] == "p":
                text = e(blk[1])
                for word in ("PASS", "FAIL"):
                    text = text.replace(f"**{word}**", f"<span class='{word}'>{word}</span>")
                parts.append(f"<p>{text}</p>")
            elif blk[0] == "img":
                data = base64.b64encode(images[blk[1]]).decode()
                parts.append(f"<img alt='{e(blk[1])}' src='data:image/png;base64,{data}'>")
            else:
                parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in blk[1]) + "</tr>")
                for row in blk[2]:
                    cells = "".join(f"<td class='{e(str(c))}'>{e(str(c))}</td>" if c in ("PASS", "FAIL")
                                    else f"<td>{e(str(c))}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: dict, out: Path) -> dict[str, Path]:
    """audit.json, audit.md, audit.html and the two PNGs into `out` (which the caller made)."""
    paths = {"behaviour.png": plot_behaviour(report, out / "behaviour.png"),
             "discrete.png": plot_discrete(report["discrete"], out / "discrete.png")}
    images = {k: p.read_bytes() for k, p in paths.items()}
    public = json.loads(json.dumps(report, default=str))
    for name in ("task", "probes"):  # token ids stay out of the JSON: texts and figures are the record
        for key in ("prefixed_ids", "input_ids"):
            public["behaviour"][name].pop(key, None)
    paths["audit.json"] = out / "audit.json"
    paths["audit.json"].write_text(json.dumps(public, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["audit.md"] = out / "audit.md"
    paths["audit.md"].write_text(to_markdown(report), encoding="utf-8")
    paths["audit.html"] = out / "audit.html"
    paths["audit.html"].write_text(to_html(report, images), encoding="utf-8")
    return paths
