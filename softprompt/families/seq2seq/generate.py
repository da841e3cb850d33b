"""Generation for encoder-decoder models: encode once (with the soft prompt and encoder prefix),
then decode one token per step from the decoder start token over a cache that already holds the
decoder self- and cross-attention prefixes. Greedy by default, so the same input gives the same
output; a row stops at eos (or a stop string) and the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from softprompt.families.seq2seq.core import Seq2SeqBatchPrefix, Seq2SeqError, Seq2SeqPrefix, decode, encode, make_cache
from softprompt.loops.generate import SamplingParams, StopStrings, append_tokens, eos_ids, penalize, pick_next


def decoder_start_id(model) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise Seq2SeqError(f"{type(model).__name__} has no decoder_start_token_id in its config")
    return int(start)


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prefixes: Sequence[Seq2SeqPrefix | None], params: SamplingParams = SamplingParams(),
                 eos_token_ids=frozenset(), stop_check=None) -> list[list[int]]:
    """Token ids generated for each row; input (B, S) padded on either side; one prefix per row
    or a single one for all rows (or [None])."""
    B = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    if params.max_new_tokens == 0:
        return out
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    bp = Seq2SeqBatchPrefix.build(list(prefixes), B)
    hidden, mask = encode(model, input_ids, attention_mask, bp)  # (B, S, d), (B, S)
    cache = make_cache(model, bp, hidden, growing=True)
    nxt = torch.full((B,), decoder_start_id(model), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(params.max_new_tokens):
        res = decode(model, bp, hidden, mask, nxt.view(B, 1), cache=cache, use_cache=True)
        cache = res.cache
        logits = res.logits[:, -1]
        if params.penalized:  # row by row, over its own output tokens (the decoder's; as the seq2seq engine does)
            logits = torch.cat([penalize(logits[i:i + 1], out[i], params, (), eos_token_ids) for i in range(B)])
        nxt = pick_next(logits, params, gen)  # (B,)
        append_tokens(out, nxt, done, eos_token_ids, stop_check, params.ignore_eos, params)
        if bool(done.all()):
            break
    return out


def generate(model, tokenizer, prompts: Sequence[str], prefix=None, params: SamplingParams | None = None,
             **options) -> list[str]:
    """Outputs for `prompts` under one `Seq2SeqPrefix` (or a list, one per prompt, or None)."""
    params = params or SamplingParams(**options)
    if isinstance(prompts, str):
        prompts = [prompts]
    prefixes = [prefix] if prefix is None or isinstance(prefix, Seq2SeqPrefix) else list(prefix)
    if len(prefixes) not in (1, len(prompts)):
        raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
    dev = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    stops = StopStrings(tokenizer, params.stop) if params.stop else None
    ids = generate_ids(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), prefixes, params,
                       eos_ids(tokenizer, model), stops)
    return [stops.cut[i] if stops is not None and i in stops.cut else tokenizer.decode(row, skip_special_tokens=True)
            for i, row in enumerate(ids)]


def evaluate_groups(model, tokenizer, groups, prefix, *, chat_template: bool = False, max_new_tokens: int = 64,
                    num_beams: int = 1, batch_size: int = 16) -> dict:
    """Score `groups` = [(prompt, [references])] with greedy outputs; adds `predictions`. Same
    signature as the decoder's `softprompt.loops.evaluate.evaluate_groups`; what an encoder-decoder cannot
    do yet (beam search, chat templates) is refused rather than silently ignored."""
    from softprompt.loops.evaluate import score

    if chat_template:
        raise Seq2SeqError("chat templates are for decoder-only chat models; an encoder-decoder base takes plain inputs")
    if num_beams != 1:
        raise Seq2SeqError(f"beam search (num_beams={num_beams}) is not implemented for encoder-decoder bases yet; "
                           "use --num-beams 1 (greedy)")

    prompts = [p if isinstance(p, str) else p[1] for p, _ in groups]
    hyps = []
    for s in range(0, len(prompts), batch_size):
        hyps += generate(model, tokenizer, prompts[s:s + batch_size], prefix, max_new_tokens=max_new_tokens)
    result = score(hyps, [refs for _, refs in groups])
    result["predictions"] = hyps
    return result
