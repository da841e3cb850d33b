"""Evaluation: generate for each input, score against all of its references.

Metrics (each input may have several references; E2E has ~8 per MR):
  bleu         corpus BLEU (sacrebleu), multi-reference, 0..100
  rouge_l      ROUGE-L F1 (rouge-score, stemmed), the best reference per input, averaged, 0..100
  exact_match  % of outputs equal to one of the references (after normalizing case, spaces, punctuation)
  accuracy     % of outputs whose first word is the first word of one of the references
               (classification: "positive" / "negative")
Decoding is greedy (batched) or beam search (`num_beams > 1`, length-normalized).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

from softprompt import hf
from softprompt.hf.prefix import prefixed_forward
from softprompt.loops.generate import SamplingParams, StopStrings, cut_at_stop, eos_ids, generate_ids

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus metrics for `hypotheses[i]` against its references `references[i]` (one or more)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("nothing to score")
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    hyps = [h.strip() for h in hypotheses]
    refs = [[r.strip() for r in rs] for rs in references]
    bleu = BLEU().corpus_score(hyps, _streams(references)).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(max(scorer.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hyps, refs)) / len(hyps)
    em = sum(normalize(h) in {normalize(r) for r in rs} for h, rs in zip(hyps, refs)) / len(hyps)

    def first(t):
        w = normalize(t).split()
        return w[0] if w else ""

    acc = sum(first(h) in {first(r) for r in rs} for h, rs in zip(hyps, refs)) / len(hyps)
    return {"bleu": bleu, "rouge_l": 100 * rouge, "exact_match": 100 * em, "accuracy": 100 * acc, "n": len(hyps)}


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every input's k-th reference (None where it has fewer)."""
    refs = [[r.strip() for r in rs] for rs in references]
    return [[rs[k] if k < len(rs) else None for rs in refs] for k in range(max(len(r) for r in refs))]


def paired_bootstrap(systems: dict[str, Sequence[str]], references: Sequence[Sequence[str]], baseline: str,
                     n_samples: int = 1000) -> dict[str, dict]:
    """Corpus BLEU of each system with a 95% interval, and each system's p-value against `baseline`,
    by paired bootstrap resampling (Koehn, 2004) as sacrebleu implements it (`--paired-bs`: the
    same resampled inputs for every system, seed 12345, so a run is reproducible).

    systems: name -> outputs, one per input, aligned with `references` (one or more per input).
    Returns name -> {"bleu", "bleu_mean", "bleu_low", "bleu_high", "p_value"} (p_value None for the
    baseline): the interval is the bootstrap mean +- sacrebleu's 95% half-width.
    """
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if baseline not in systems:
        raise ValueError(f"baseline {baseline!r} is not among the systems {list(systems)}")
    if any(len(h) != len(references) for h in systems.values()):
        raise ValueError(f"every system needs one output per input ({len(references)})")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    order = [baseline, *(name for name in systems if name != baseline)]  # sacrebleu: the baseline first
    named = [(name, [h.strip() for h in systems[name]]) for name in order]
    test = PairedTest(named, {"BLEU": BLEU()}, references=_streams(references), test_type="bs", n_samples=n_samples)
    _, results = test()
    out = {}
    for name, r in zip(order, results["BLEU"]):
        mean, half = float(r.mean), float(r.ci)
        out[name] = {"bleu": float(r.score), "bleu_mean": mean, "bleu_low": mean - half, "bleu_high": mean + half,
                     "p_value": None if r.p_value is None else float(r.p_value)}
    return out


@torch.no_grad()
def beam_search(model, tokenizer, prompt: str, prefix: torch.Tensor | None, num_beams: int = 4,
                max_new_tokens: int = 64, length_penalty: float = 1.0) -> list[int]:
    """Token ids of the best beam for one prompt under one KV prefix `(L, 2, H, P, D)` (or None),
    without the end token: the beam transformers' `generate(num_beams=K, early_stopping=False)`
    returns (tests/test_beam.py), so reported beam-5 scores mean what the papers' do.

    Its rules, followed here: each step keeps the 2K best continuations of the K live beams; of
    those, the ones ending (an end token, or the last allowed token) and ranked among the first K
    become finished hypotheses, scored `logprob / generated_length**length_penalty` (the end token
    counted), of which the K best are kept; the K best that do not end live on. The search stops
    when every step's candidates end, or once K hypotheses are finished and the best live beam,
    normalized at its current length, scores no better than the worst of them.
    """
    dev = next(model.parameters()).device
    eos = eos_ids(tokenizer, model)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=dev)
    res = prefixed_forward(model, ids, torch.ones_like(ids), [prefix], use_cache=True, logits_to_keep=1)
    cache = res.cache
    hf.repeat_rows(cache, num_beams)
    full_mask = res.attention_mask.repeat(num_beams, 1)
    pos = res.position_ids[:, -1:].repeat(num_beams, 1)
    logp = res.logits[:, -1].float().log_softmax(-1).repeat(num_beams, 1)  # (K, V)
    scores = torch.full((num_beams,), -1e9, device=dev)
    scores[0] = 0.0  # all beams start identical: expand from the first only
    seqs: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []  # the K best, by normalized score
    V = logp.shape[-1]
    for step in range(max_new_tokens):
        last = step + 1 == max_new_tokens
        top = torch.topk((scores[:, None] + logp).view(-1), 2 * num_beams)  # (2K,) of K*V
        live: list[tuple[float, int, int]] = []  # (score, beam, token)
        for rank, (s, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            b, t = divmod(flat, V)
            if t in eos or last:
                if rank < num_beams:
                    finished.append((s / (step + 1) ** length_penalty, seqs[b] + ([] if t in eos else [t])))
            elif len(live) < num_beams:
                live.append((s, b, t))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        if last or not live:
            break
        if len(finished) == num_beams and live[0][0] / (step + 1) ** length_penalty <= finished[-1][0]:
            break  # no live beam can still beat the worst kept hypothesis (transformers' heuristic)
        live += [(-1e9, live[0][1], live[0][2])] * (num_beams - len(live))  # shapes kept: dead rows
        scores = torch.tensor([s for s, _, _ in live], device=dev)
        bi = torch.tensor([b for _, b, _ in live], device=dev)
        seqs = [seqs[b] + [t] for _, b, t in live]
        hf.reorder_rows(cache, bi)
        full_mask = torch.cat([full_mask[bi], torch.ones(num_beams, 1, dtype=full_mask.dtype, device=dev)], 1)
        pos = pos[bi] + 1
        out = hf.forward(model, cache, input_ids=torch.tensor([t for _, _, t in live], device=dev).view(-1, 1),
                         attention_mask=full_mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logp = out.logits[:, -1].float().log_softmax(-1)
    return finished[0][1] if finished else []


def predict(model, tokenizer, prompts: Sequence[str], prefix: torch.Tensor | None, *, max_new_tokens: int = 64,
            num_beams: int = 1, batch_size: int = 16, stop: Sequence[str] = ("\n",),
            length_penalty: float = 1.0) -> list[str]:
    """Outputs for rendered prompts under one KV prefix: greedy in batches, or beam search."""
    dev = next(model.parameters()).device
    outs: list[str] = [""] * len(prompts)
    if num_beams > 1:
        for i, p in enumerate(prompts):
            outs[i] = _cut(tokenizer.decode(beam_search(model, tokenizer, p, prefix, num_beams, max_new_tokens,
                                                        length_penalty),
                                            skip_special_tokens=True), stop)
        return outs
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths, less padding
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        stops = StopStrings(tokenizer, params.stop) if params.stop else None
        rows = generate_ids(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), [prefix], params,
                            eos_ids(tokenizer, model), stops)
        for j, (i, r) in enumerate(zip(idx, rows)):
            outs[i] = stops.cut[j] if stops is not None and j in stops.cut else tokenizer.decode(r, skip_special_tokens=True)
    return [o.strip() for o in outs]


def _cut(text: str, stop: Sequence[str]) -> str:
    return cut_at_stop(text, stop)[0].strip()


def evaluate_groups(model, tokenizer, groups, prefix, *, chat_template: bool = False, max_new_tokens: int = 64,
                    num_beams: int = 1, batch_size: int = 16, length_penalty: float = 1.0) -> dict:
    """Score `groups` = [(prompt, [references])] (see `data.group_references`); adds `predictions`."""
    from softprompt.loops.data import render_prompt

    prompts = [render_prompt(p, tokenizer, chat_template) for p, _ in groups]
    hyps = predict(model, tokenizer, prompts, prefix, max_new_tokens=max_new_tokens, num_beams=num_beams,
                   batch_size=batch_size, length_penalty=length_penalty)
    result = score(hyps, [refs for _, refs in groups])
    result["predictions"] = hyps
    return result
