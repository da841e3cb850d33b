"""Summarize a task's inputs for the off-task guard (the math: core/offtask.py).

**Under the task's prefix, not the bare base.** The engine's prefill already runs every request
through the model *with its task's prefix in the cache*; the hidden state after layer `l` of the
request's tokens is therefore computed anyway, and the guard costs a hook, a mean over T tokens and
a (k + 1) x d product per row. A summary of bare-base states would need a second, prefix-less pass
over the first `l` layers of every request (about half a prefill). So the summary is fitted on
exactly the serving computation: the prompt's token ids (tokenized as the engine tokenizes a
request), left-padded, after the KV prefix, positions from P on (hf/prefix.py). A row served bare
(policy "base", or the bare model) is not scored.

`layer` defaults to L // 2: the middle of the stack, where states say what the input is about
rather than which word comes next (the last layers) or which words it has (the first ones).
"""

from __future__ import annotations

import torch

from softprompt import hf
from softprompt.core.offtask import OffTaskSummary, pool
from softprompt.hf.prefix import check_prefix_support, prefixed_forward


def default_layer(model) -> int:
    """The layer the guard reads by default: half the decoder's depth (at least 1)."""
    return max(1, len(hf.decoder_layers(model)) // 2)


@torch.no_grad()
def pooled_states(model, rows: list[list[int]], kv: torch.Tensor | None, layer: int,
                  batch_size: int = 32) -> torch.Tensor:
    """(N, d) float32: each row's hidden state after `layer` layers under the KV prefix `kv`
    ((L, 2, H_kv, P, D) or None), averaged over its own tokens, as the engine's prefill computes it.
    Each pass stops after `layer` (the rest of the model is not run)."""
    dev = next(model.parameters()).device
    hf.once(model, check_prefix_support)  # before the hook: the capture would stop the check's passes too
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, T - len(r):] = torch.tensor(r, device=dev)
            mask[j, T - len(r):] = 1
        with hf.layer_outputs(model, [layer], stop=True) as got:
            prefixed_forward(model, ids, mask, [kv], use_cache=False, logits_to_keep=1)
        out.append(pool(got[layer], [len(r) for r in chunk]).cpu())
    return torch.cat(out)


def summarize(model, rows: list[list[int]], kv: torch.Tensor | None, *, heldout: list[list[int]] | None = None,
              layer: int | None = None, k: int = 16, quantile: float = 0.99, batch_size: int = 32,
              meta: dict | None = None) -> OffTaskSummary:
    """The summary of token-id rows (prompts only, as requests arrive) under `kv`, its threshold the
    `quantile` of `heldout` rows' scores. Without `heldout`, every fifth row is held out (never fitted)."""
    from softprompt.core.geometry import model_fingerprint

    rows = [list(r) for r in rows if len(r)]
    if heldout is None:
        heldout, rows = rows[4::5], [r for i, r in enumerate(rows) if i % 5 != 4]
    heldout = [list(r) for r in heldout if len(r)]
    if len(rows) < 2 or not heldout:
        raise ValueError(f"an off-task summary needs at least 2 fitted and 1 held-out input, got {len(rows)} "
                         f"and {len(heldout)}")
    layer = default_layer(model) if layer is None else layer
    fit = pooled_states(model, rows, kv, layer, batch_size)
    held = pooled_states(model, heldout, kv, layer, batch_size)
    info = {"under": "prefix" if kv is not None else "base", "pooling": "mean", "base": model_fingerprint(model),
            "num_layers": len(hf.decoder_layers(model)), **(meta or {})}
    return OffTaskSummary.fit(fit, held, layer, k=k, quantile=quantile, meta=info)


def offtask_summary(model, tokenizer, texts, prompt=None, *, heldout=None, layer: int | None = None, k: int = 16,
                    quantile: float = 0.99, add_special_tokens: bool = False) -> OffTaskSummary:
    """The off-task summary of a task's input texts under `prompt` (a PromptMethod, a Prefix or a KV
    tensor; None for the bare model), for any artifact and its data (an existing task gets one this
    way). Texts are tokenized as the engine tokenizes a request's prompt (no special tokens by default);
    give them as the server receives them (after any chat template the task's card asks for).
    `heldout`: texts of the same task kept for the threshold (default: every fifth of `texts`)."""
    kv = prompt_kv(model, prompt)
    enc = (lambda ts: [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in ts])
    return summarize(model, enc(list(texts)), kv, heldout=None if heldout is None else enc(list(heldout)),
                     layer=layer, k=k, quantile=quantile)


def prompt_kv(model, prompt) -> torch.Tensor | None:
    """The plain KV prefix tensor of a PromptMethod, a Prefix or a tensor (None stays None)."""
    if prompt is None:
        return None
    if hasattr(prompt, "to_kv_prefix"):
        with torch.no_grad():
            prompt = prompt.to_kv_prefix(model)
    kv = prompt.kv() if hasattr(prompt, "kv") else prompt
    p = next(model.parameters())
    return kv.detach().to(device=p.device, dtype=p.dtype)
