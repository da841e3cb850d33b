"""Seeing inside a prompt: what its virtual tokens resemble, how large they are, and how much the
real tokens attend to them.

- Prompt tuning and P-tuning: per virtual token, the nearest vocabulary tokens by cosine similarity
  against the input embedding table, and its norm placed among the vocabulary's norms.
- Every method (prefix tuning directly; prompt/P-tuning through their compiled KV prefix):
  per-layer key and value norms of the prefix, and, on a few real inputs, the share of attention
  that real tokens give to the prefix, per layer and query head (averaged over real query tokens;
  share to the prefix + share to the real tokens = 1 exactly, since each attention row is a softmax).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softprompt.hf import eager_attention  # noqa: F401  (public here)
from softprompt.methods.base import InputPromptMethod


@torch.no_grad()
def nearest_tokens(prompt: InputPromptMethod, model, tokenizer=None, k: int = 5) -> list[dict]:
    """Per virtual token: its `k` nearest vocabulary tokens by cosine (id, token, cosine) and its norm."""
    emb = prompt.virtual_embeddings().detach().float().cpu()  # (P, d)
    table = model.get_input_embeddings().weight.detach().float().cpu()  # (V, d)
    cos = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T  # (P, V)
    vals, ids = cos.topk(min(k, table.shape[0]), dim=-1)
    vocab_norms = table.norm(dim=-1).sort().values
    out = []
    for i in range(emb.shape[0]):
        norm = float(emb[i].norm())
        out.append({
            "index": i,
            "norm": norm,
            "norm_percentile": float(100.0 * torch.searchsorted(vocab_norms, torch.tensor(norm)).item() / len(vocab_norms)),
            "nearest": [{"id": int(t), "token": _tok(tokenizer, int(t)), "cosine": float(c)}
                        for t, c in zip(ids[i], vals[i])],
        })
    return out


def vocab_norm_stats(model) -> dict:
    norms = model.get_input_embeddings().weight.detach().float().norm(dim=-1).cpu()
    q = torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95]))
    return {"min": float(norms.min()), "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2]),
            "max": float(norms.max())}


def _tok(tokenizer, i: int) -> str | None:
    if tokenizer is None:
        return None
    return tokenizer.decode([i])  # readable (" sentiment", not "Ġsentiment")


@torch.no_grad()
def kv_norms(kv: torch.Tensor) -> dict:
    """Per layer, the mean L2 norm of the prefix's key and value vectors (over heads and positions).
    kv: (L, 2, H_kv, P, D)."""
    n = kv.detach().float().norm(dim=-1)  # (L, 2, H, P)
    return {"key": n[:, 0].mean(dim=(1, 2)).tolist(), "value": n[:, 1].mean(dim=(1, 2)).tolist()}


@torch.no_grad()
def attention_share(model, kv: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Share of attention real tokens give to the prefix vs the real tokens, per layer and query head.

    kv: the prefix (L, 2, H_kv, P, D); input_ids/attention_mask: a left-padded batch (B, T).
    Each attention row sums to 1 over the visible slots (prefix + real tokens), so
    `prefix[l][h] + real[l][h] == 1`. Averaged over every real query token of every row.
    Returns `{"prefix": (L, Hq) list, "real": (L, Hq) list, "num_query_tokens": int}`.
    """
    from softprompt.hf.prefix import prefixed_forward

    dev = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    P = kv.shape[3]
    with eager_attention(model):
        out = prefixed_forward(model, input_ids, attention_mask, [kv.to(dev)], use_cache=True,
                               output_attentions=True, logits_to_keep=1)
    q = attention_mask.to(torch.float64)  # (B, T) real query tokens
    n = q.sum()
    prefix, real = [], []
    for att in out.attentions:  # (B, Hq, T, P + T)
        att = att.to(torch.float64)
        pre = att[..., :P].sum(-1)  # (B, Hq, T)
        rest = att[..., P:].sum(-1)
        prefix.append(((pre * q[:, None]).sum(dim=(0, 2)) / n).tolist())
        real.append(((rest * q[:, None]).sum(dim=(0, 2)) / n).tolist())
    return {"prefix": prefix, "real": real, "num_query_tokens": int(n)}


def _example_batch(data: str, tokenizer, n: int, max_length: int = 128):
    from softprompt.loops.data import DataConfig, read_examples, render_prompt

    exs = read_examples(data, DataConfig(max_rows=max(n, 1)))[:n]
    if not exs:
        raise ValueError(f"{data} has no usable rows for the attention share")
    texts = [render_prompt(ex.prompt, tokenizer, False) + " " + (ex.target or "") for ex in exs]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return enc["input_ids"], enc["attention_mask"]


def inspect_prompt(prompt, model, tokenizer=None, *, input_ids=None, attention_mask=None, k: int = 5) -> dict:
    """Everything `softprompt inspect` reports, as a JSON-able dict."""
    from softprompt.core.geometry import geometry

    geo = geometry(model)
    report: dict = {"method": prompt.method, "num_virtual_tokens": prompt.num_virtual_tokens,
                    "geometry": geo.to_dict()}
    if isinstance(prompt, InputPromptMethod):
        report["vocab_norms"] = vocab_norm_stats(model)
        report["virtual_tokens"] = nearest_tokens(prompt, model, tokenizer, k)
    kv = prompt.to_kv_prefix(model).detach()
    report["kv_norms"] = kv_norms(kv)
    if input_ids is not None:
        report["attention_share"] = attention_share(model, kv, input_ids, attention_mask)
    return report


def summary(report: dict) -> str:
    """A readable terminal summary of `inspect_prompt`'s report."""
    lines = [f"{report['method']}, P={report['num_virtual_tokens']}, "
             f"{report['geometry']['num_layers']} layers x {report['geometry']['num_attention_heads']} query heads"]
    if "virtual_tokens" in report:
        v = report["vocab_norms"]
        lines.append(f"vocabulary norms: p5 {v['p5']:.3f}  median {v['median']:.3f}  p95 {v['p95']:.3f}")
        lines.append(f"{'#':>3} {'norm':>7} {'pct':>5}  nearest tokens (cosine)")
        for t in report["virtual_tokens"]:
            near = "  ".join(f"{n['token'] if n['token'] is not None else n['id']!r} {n['cosine']:.2f}"
                             for n in t["nearest"])
            lines.append(f"{t['index']:>3} {t['norm']:>7.3f} {t['norm_percentile']:>4.0f}%  {near}")
    kn = report["kv_norms"]
    att = report.get("attention_share")
    lines.append("layer  key norm  value norm" + ("  prefix share (mean over heads; min-max)" if att else ""))
    for layer, (kk, vv) in enumerate(zip(kn["key"], kn["value"])):
        row = f"{layer:>5}  {kk:>8.3f}  {vv:>10.3f}"
        if att:
            s = att["prefix"][layer]
            row += f"  {sum(s) / len(s):>6.1%} ({min(s):.1%}-{max(s):.1%})"
        lines.append(row)
    if att:
        flat = [x for row in att["prefix"] for x in row]
        lines.append(f"real tokens give {sum(flat) / len(flat):.1%} of their attention to the prefix on average "
                     f"({att['num_query_tokens']} query tokens)")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """PNG: the prefix's attention share as a layer x head heatmap (when measured) and the per-layer
    key/value norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = report.get("attention_share")
    kn = report["kv_norms"]
    L = len(kn["key"])
    ncols = 2 if att else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, max(3.5, 0.22 * L + 1.5)), squeeze=False)
    axes = axes[0]
    if att:
        import numpy as np

        m = np.array(att["prefix"])
        ax = axes[0]
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(m.shape[1]))
        step = max(1, L // 15)
        ax.set_yticks(range(0, L, step))
        ax.set_title("share of attention real tokens give the prefix")
        if m.size <= 120:
            for (i, j), val in np.ndenumerate(m):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if val > 0.6 else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of attention to the prefix")
    ax = axes[-1]
    ax.plot(kn["key"], range(L), "o-", label="key")
    ax.plot(kn["value"], range(L), "s-", label="value")
    ax.invert_yaxis()
    ax.set_xlabel("mean L2 norm")
    ax.set_ylabel("layer")
    ax.set_title("prefix key/value norms per layer")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"{report['method']}, P={report['num_virtual_tokens']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_inspect(adapter: str, model, tokenizer, data: str | None = None, out: str | None = None, examples: int = 4,
                top_k: int = 5, allow_other_base: bool = False) -> tuple[dict, Path, Path]:
    """Load, inspect, write OUT.json and OUT.png (OUT defaults to ADAPTER.inspect); returns (report, json, png)."""
    from softprompt.io.artifact import load_artifact

    prompt = load_artifact(adapter, model, allow_other_base=allow_other_base)
    ids = mask = None
    if data is not None:
        ids, mask = _example_batch(data, tokenizer, examples)
    report = inspect_prompt(prompt, model, tokenizer, input_ids=ids, attention_mask=mask, k=top_k)
    report["adapter"] = str(adapter)
    stem = Path(out) if out else Path(str(adapter).rstrip("/").removesuffix(".safetensors") + ".inspect")
    jpath, ppath = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".png")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(report, indent=2))
    plot(report, ppath)
    return report, jpath, ppath
