"""What the prefix "says": its nearest tokens, and the best hard prompt of k tokens found by search.

A hard prompt here is k token ids placed where the soft prompt sits (before the input, at positions
0..k-1); `compile_ids` turns it into a KV prefix exactly as the model computes those tokens written
out, so the hard-prompted base and the prefixed model run through the same code.

1. Projection. Prompt and P-tuning learn input embeddings: each virtual token's candidates are its
   nearest vocabulary tokens by cosine (`softprompt inspect`'s `nearest_tokens`). Prefix tuning learns
   keys and values directly, with no embedding to compare; what a token alone decides there is its
   layer-0 value vector (before any attention mixes positions; RoPE rotates keys, not values), so a
   virtual position's candidates are the tokens whose layer-0 values are nearest by cosine, among a
   pool: the tokens of the audit's inputs, of a few training rows and of the card's init text. When
   P > k, k virtual tokens evenly spaced over the prompt are projected.
2. Search. Greedy coordinate search: for each position in turn, each of its next-nearest candidates is
   swapped in, and kept only if it improves the fit: next-token agreement no lower and KL no higher,
   one of them strictly (KL(prefixed || hard) over the first `kl_tokens` positions of the prefixed
   model's own greedy answers, teacher-forced). So the search can never end worse than the projection.
3. Fidelity, for the projection and after the search: next-token agreement (share of those positions
   where both models' likeliest token is the same) and greedy exact match (share of inputs whose whole
   greedy answer is the same under the hard prompt as under the prefix).
"""

from __future__ import annotations

import torch

from softprompt.auditing.behaviour import answer_logprobs, greedy, kl

POOL_CHUNK = 256  # tokens compiled per pass when measuring the pool's layer-0 values


def _slots(P: int, k: int) -> list[int]:
    """The k virtual tokens (of P) a hard prompt of k tokens stands for: evenly spaced."""
    if k >= P:
        return list(range(P))
    return [round(i * (P - 1) / (k - 1)) for i in range(k)] if k > 1 else [P - 1]


@torch.no_grad()
def candidates_embedding(prompt, model, slots: list[int], n: int) -> list[list[int]]:
    """Prompt/P-tuning: per slot, its n nearest vocabulary tokens by cosine (nearest first)."""
    from softprompt.runs.inspect import nearest_tokens

    near = nearest_tokens(prompt, model, None, k=n)
    return [[t["id"] for t in near[s]["nearest"]] for s in slots]


@torch.no_grad()
def candidates_kv(kv: torch.Tensor, model, pool: list[int], slots: list[int], n: int) -> list[list[int]]:
    """Prefix tuning: per slot, the n pool tokens whose layer-0 value vectors are nearest by cosine to
    the prefix's at that position. kv: (L, 2, H, P, D)."""
    from softprompt.hf.prefix import compile_ids

    values = []
    for s in range(0, len(pool), POOL_CHUNK):  # values at layer 0 do not depend on context or position
        values.append(compile_ids(model, pool[s:s + POOL_CHUNK])[0, 1].float().cpu())  # (H, c, D)
    v = torch.cat(values, dim=1).permute(1, 0, 2).flatten(1)  # (pool, H*D)
    target = kv[0, 1].float().cpu().permute(1, 0, 2).flatten(1)[slots]  # (k, H*D)
    cos = torch.nn.functional.normalize(target, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    idx = cos.topk(min(n, len(pool)), dim=-1).indices
    return [[pool[int(j)] for j in row] for row in idx]


class Fit:
    """Scores a hard prompt against the prefixed model on fixed inputs (module doc, step 2)."""

    def __init__(self, model, tokenizer, xs: list[list[int]], ys: list[list[int]], kv, batch_size: int):
        self.model, self.tok, self.xs, self.ys, self.bs = model, tokenizer, xs, ys, batch_size
        self.target = self._logprobs(kv)
        self.evals = 0

    def _logprobs(self, kv) -> list[torch.Tensor]:
        out = []
        for s in range(0, len(self.xs), self.bs):
            out += answer_logprobs(self.model, self.tok, self.xs[s:s + self.bs], self.ys[s:s + self.bs], kv)
        return out

    @torch.no_grad()
    def score(self, ids: list[int]) -> tuple[float, float]:
        """(next-token agreement, mean KL(prefixed || hard)) of the hard prompt `ids`."""
        from softprompt.hf.prefix import compile_ids

        self.evals += 1
        got = self._logprobs(compile_ids(self.model, ids))
        n = sum(len(t) for t in self.target)
        if n == 0:
            return 1.0, 0.0
        agree = sum(int((t.argmax(-1) == g.argmax(-1)).sum()) for t, g in zip(self.target, got))
        div = sum(float(kl(t, g).sum()) for t, g in zip(self.target, got))
        return agree / n, div / n


def better(new: tuple[float, float], old: tuple[float, float]) -> bool:
    """Agreement no lower and KL no higher, one of them strictly: the search's only way forward."""
    return new[0] >= old[0] and new[1] <= old[1] and (new[0] > old[0] or new[1] < old[1])


def search(fit: Fit, start: list[int], cands: list[list[int]], rounds: int, per_slot: int,
           tick=lambda n: None) -> tuple[list[int], list[dict]]:
    """Greedy coordinate search from `start`; returns (best ids, the trace: one entry per accepted swap)."""
    best, best_score = list(start), fit.score(start)
    trace = [{"evals": fit.evals, "agreement": best_score[0], "kl": best_score[1]}]
    for _ in range(rounds):
        moved = False
        for i, options in enumerate(cands):
            tried = [c for c in options if c != best[i]][:per_slot]
            for c in tried:
                trial = best[:i] + [c] + best[i + 1:]
                sc = fit.score(trial)
                if better(sc, best_score):
                    best, best_score, moved = trial, sc, True
                    trace.append({"evals": fit.evals, "agreement": sc[0], "kl": sc[1]})
            tick(1)
        if not moved:
            break
    return best, trace


def exact_match(model, tokenizer, xs, prefixed_ids, ids, cfg) -> float:
    """Share of inputs whose whole greedy answer under the hard prompt equals the prefixed model's."""
    from softprompt.hf.prefix import compile_ids

    if not xs:
        return 0.0
    hard = greedy(model, tokenizer, xs, compile_ids(model, ids), cfg.max_new_tokens, cfg.rows_per_pass)
    return sum(a == b for a, b in zip(hard, prefixed_ids)) / len(xs)


def approximate(prompt, model, tokenizer, xs, prefixed_ids, pool: list[int], cfg, tick=lambda n: None) -> dict:
    """The discrete-prompt approximation (module doc): projection, search, fidelity of both."""
    from softprompt.methods.base import InputPromptMethod

    kv = prompt.to_kv_prefix(model).detach()
    P = int(kv.shape[3])
    k = min(P, cfg.max_hard_tokens)
    slots = _slots(P, k)
    n = cfg.search_candidates + 1  # the nearest (the projection) and the ones the search tries
    if isinstance(prompt, InputPromptMethod):
        cands, how = candidates_embedding(prompt, model, slots, n), "nearest input embedding (cosine)"
    else:
        if not pool:
            raise ValueError("the discrete approximation of a KV prefix needs some input text for its token pool")
        cands, how = candidates_kv(kv, model, pool, slots, n), "nearest layer-0 value vector (cosine), over the pool"
    xs, ys = xs[:cfg.search_inputs], [y[:cfg.kl_tokens] for y in prefixed_ids[:cfg.search_inputs]]
    fit = Fit(model, tokenizer, xs, ys, kv, cfg.rows_per_pass)
    start = [c[0] for c in cands]
    best, trace = search(fit, start, cands, cfg.search_rounds, cfg.search_candidates, tick)
    out = {"k": k, "num_virtual_tokens": P, "slots": slots, "projection_by": how, "pool_size": len(pool),
           "candidates": [[tokenizer.decode([t]) for t in c] for c in cands],  # per slot, nearest first
           "search_inputs": len(xs), "evaluations": fit.evals, "trace": trace}
    for name, ids, sc in (("projection", start, (trace[0]["agreement"], trace[0]["kl"])),
                          ("search", best, (trace[-1]["agreement"], trace[-1]["kl"]))):
        out[name] = {"ids": ids, "tokens": [tokenizer.decode([t]) for t in ids], "text": tokenizer.decode(ids),
                     "next_token_agreement": sc[0], "kl": sc[1],
                     "exact_match": exact_match(model, tokenizer, xs, prefixed_ids[:len(xs)], ids, cfg)}
    return out
