"""What the prefix does to answers: the base model and the prefixed model answer the same inputs
greedily (the project's own decoding, `generate_ids`), then both score the base's answer token by
token (teacher forcing), which gives per input:

- `nll_base`, `nll_prefixed`: mean negative log-likelihood (nats/token) of the base's own answer
  under each model; their difference is how much the prefix moves the model off what it would say;
- `kl`: mean over the first `kl_tokens` positions of KL(prefixed || base) of the next-token
  distributions along the base's answer (nats/token): 0 when the prefix changes nothing there;
- `changed`: the two greedy answers differ; `refusal_*`: the refusal-phrase heuristic below.

Per set (task inputs, off-task probes): the means, the refusal rates, and the inputs with the
largest `kl` (where the prefix changes the base's answer most).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A refusal, by its phrasing: an answer that contains one of these (case-insensitive, curly quotes
# folded, within its first 300 characters) counts as a refusal. Simple and documented
# (docs/audit.md); it misses refusals phrased otherwise, the same way for both models.
REFUSAL_PHRASES = (
    "i can't", "i cannot", "i can not", "i'm sorry", "i am sorry", "sorry, but", "i apologize",
    "i'm not able", "i am not able", "i'm unable", "i am unable", "i won't", "i will not", "as an ai",
    "cannot assist", "can't assist", "cannot help with", "can't help with", "not appropriate", "i must decline",
)
MAX_INPUT_TOKENS = 256  # longer inputs keep their last tokens (what the answer depends on most)


def is_refusal(text: str) -> bool:
    t = text.lower().replace("\u2019", "'")[:300]
    return any(p in t for p in REFUSAL_PHRASES)


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as the model sees it (no special tokens added, as `generate` does)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][-MAX_INPUT_TOKENS:]
        out.append(ids or [tokenizer.eos_token_id or 0])  # an empty input still gets a position to answer from
    return out


def _pad_left(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def greedy(model, tokenizer, xs: list[list[int]], kv, max_new_tokens: int, batch_size: int,
           tick: Callable[[int], None] = lambda n: None) -> list[list[int]]:
    """Greedy answer ids per input under `kv` (a KV prefix, or None for the bare base)."""
    from softprompt.loops.generate import SamplingParams, eos_ids, generate_ids

    dev = next(model.parameters()).device
    eos, out = eos_ids(tokenizer, model), []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for s in range(0, len(xs), batch_size):
        ids, mask = _pad_left(xs[s:s + batch_size], _pad_id(tokenizer), dev)
        out += generate_ids(model, ids, mask, [kv], params, eos)
        tick(len(xs[s:s + batch_size]))
    return out


@torch.no_grad()
def answer_logprobs(model, tokenizer, xs: list[list[int]], ys: list[list[int]], kv) -> list[torch.Tensor]:
    """Per row, the log-probabilities `(len(y), V)` (float32, CPU) of the next token at each position
    of answer `y` given input `x` (and the prefix `kv`, or None): teacher forcing, one forward pass.
    An empty answer gives a `(0, V)` tensor."""
    from softprompt.hf.prefix import prefixed_forward

    dev = next(model.parameters()).device
    rows = [x + y for x, y in zip(xs, ys)]
    ids, mask = _pad_left(rows, _pad_id(tokenizer), dev)
    logits = prefixed_forward(model, ids, mask, [kv]).logits  # (B, T, V)
    T, out = ids.shape[1], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        start = T - len(rows[i]) + len(x) - 1  # the logits at x's last token predict y[0]
        out.append(torch.log_softmax(logits[i, start:start + len(y)].float(), dim=-1).cpu())
    return out


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities (n, V) -> (n,)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0.0)


def nll(logp: torch.Tensor, y: Sequence[int]) -> float | None:
    if len(y) == 0:
        return None
    return float(-logp[torch.arange(len(y)), torch.tensor(list(y))].mean())


def compare_set(model, tokenizer, texts: list[str], kv, cfg, tick=lambda n: None) -> dict:
    """Base vs prefixed on one set of inputs: per-input rows and the set's summary (module doc)."""
    xs = encode(tokenizer, texts)
    base = greedy(model, tokenizer, xs, None, cfg.max_new_tokens, cfg.rows_per_pass, tick)
    pref = greedy(model, tokenizer, xs, kv, cfg.max_new_tokens, cfg.rows_per_pass, tick)
    rows = []
    for s in range(0, len(xs), cfg.rows_per_pass):
        bx, by = xs[s:s + cfg.rows_per_pass], base[s:s + cfg.rows_per_pass]
        lb = answer_logprobs(model, tokenizer, bx, by, None)
        lp = answer_logprobs(model, tokenizer, bx, by, kv)
        for j, (y, a, b) in enumerate(zip(by, lb, lp)):
            i = s + j
            m = min(cfg.kl_tokens, len(y))
            b_text = tokenizer.decode(y, skip_special_tokens=True)
            p_text = tokenizer.decode(pref[i], skip_special_tokens=True)
            rows.append({"input": texts[i], "base": b_text, "prefixed": p_text,
                         "base_tokens": len(y), "prefixed_tokens": len(pref[i]),
                         "nll_base": nll(a, y), "nll_prefixed": nll(b, y),
                         "kl": float(kl(b[:m], a[:m]).mean()) if m else 0.0,
                         "changed": pref[i] != y, "refusal_base": is_refusal(b_text),
                         "refusal_prefixed": is_refusal(p_text)})
        tick(len(bx))
    return {"rows": rows, "summary": summarize(rows, cfg.top_changed), "prefixed_ids": pref, "input_ids": xs}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], top: int) -> dict:
    """A set's figures (None where the set is empty)."""
    n = len(rows)
    dnll = [r["nll_prefixed"] - r["nll_base"] for r in rows if r["nll_base"] is not None]
    ranked = sorted(range(n), key=lambda i: -rows[i]["kl"])[:top]
    return {
        "inputs": n,
        "mean_kl": _mean(r["kl"] for r in rows),
        "mean_nll_base": _mean(r["nll_base"] for r in rows),
        "mean_nll_prefixed": _mean(r["nll_prefixed"] for r in rows),
        "mean_loss_change": _mean(dnll),
        "mean_tokens_base": _mean(r["base_tokens"] for r in rows),
        "mean_tokens_prefixed": _mean(r["prefixed_tokens"] for r in rows),
        "changed_rate": _mean(float(r["changed"]) for r in rows),
        "refusal_rate_base": _mean(float(r["refusal_base"]) for r in rows),
        "refusal_rate_prefixed": _mean(float(r["refusal_prefixed"]) for r in rows),
        "most_changed": ranked,  # row indices, largest KL first
    }
