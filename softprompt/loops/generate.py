"""Generation over a batch of prompts, each row with its own KV prefix (or none).

The loop is ours rather than `model.generate`, so that it sees exactly one thing, a KV prefix per
row, whatever method made it: prefill once over `[prefix | prompt]`, then one token per step
with the cache. Greedy by default, so the same input gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from softprompt import hf
from softprompt.hf.prefix import prefixed_forward

# Below this temperature sampling is argmax in all but name, and logits / T overflows float32
# (1e-40 turned every logit into inf and softmax into nan): such a temperature is greedy.
TEMPERATURE_FLOOR = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: see `penalize`
    frequency_penalty: float = 0.0

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise ValueError(f"temperature and top_p must be finite numbers, got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def penalize(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on one row's logits (1, V), before temperature:
    `logit[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty`, where c[j] counts token j
    among the tokens generated so far (the prompt's tokens are not counted)."""
    if not params.penalized or not generated:
        return logits
    counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)
    return logits - counts * params.frequency_penalty - (counts > 0).to(logits.dtype) * params.presence_penalty


def token_logprobs(logits: torch.Tensor, token_id: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token_id` under one position's logits (V,), and the `top`
    most likely (id, logprob) pairs. Taken from the raw logits (before temperature, penalties and
    top-k/top-p cuts), as OpenAI and vLLM report them; the same tensor the token was picked from."""
    lp = safe_logits(logits.unsqueeze(0))[0].log_softmax(-1)  # (V,)
    best = ()
    if top:
        values, ids = torch.topk(lp, min(top, lp.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return float(lp[token_id]), best


def safe_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits that sampling can always use: nan is never picked, a +inf logit takes all the
    mass, and each row is shifted so its largest entry is 0 (a row of nothing usable is uniform)."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pinf = torch.isposinf(logits)
    logits = torch.where(pinf.any(-1, keepdim=True), torch.where(pinf, 0.0, float("-inf")), logits)
    top = logits.amax(-1, keepdim=True)  # (B, 1); -inf for a row with no finite entry
    return torch.where(torch.isfinite(top), logits - top, torch.zeros_like(logits))


def greedy_ids(logits: torch.Tensor) -> list[int]:
    return greedy(logits).tolist()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax of `safe_logits(logits)`: (B, V) -> (B,) ids, in one pass over the logits when
    every row's largest entry is finite (no nan, no +inf: the usual case), in several otherwise.

    A decode step's logits are the batch times the vocabulary (32 x 49152 floats for the embedded
    model): the full `safe_logits` pass costs about 10% of a float32 step there, and a finite row
    maximum means it would change no row's argmax (a shift by the row's maximum keeps its order,
    and -inf entries are never the argmax of a row with a finite one)."""
    top, ids = logits.max(-1)  # (B,), (B,); max propagates nan
    if bool(torch.isfinite(top).all()):
        return ids
    return safe_logits(logits).argmax(-1)


def pick_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Never raises on inf or nan logits (see safe_logits)."""
    if params.greedy:
        return greedy(logits)
    logits = safe_logits(logits)
    logits = logits / params.temperature  # the largest entry stays 0: softmax is finite
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[:, 0] = False  # the best token always stays (a top_p of 5e-324 is 0 in float32)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def eos_ids(tokenizer, model=None) -> set[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefixes: Sequence[torch.Tensor | None],
    params: SamplingParams = SamplingParams(),
    eos_token_ids: set[int] = frozenset(),
    stop_check=None,
) -> list[list[int]]:
    """Token ids generated for each row of a left-padded batch.

    prefixes: one `(L, 2, H, P_i, D)` per row, or a single one shared by all rows, or [None].
    stop_check(row, ids) -> int | None: called after each token; returns how many ids to keep
    when the row should stop (stop strings), or None to go on.
    """
    if params.penalized:  # the engine applies them (serve.Engine); this loop stays the plain one
        raise ValueError("presence and frequency penalties are applied by the serving engine (softprompt.serve), "
                         "not by generate_ids")
    B = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    if params.max_new_tokens == 0:
        return out
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    res = prefixed_forward(model, input_ids, attention_mask, prefixes, use_cache=True, logits_to_keep=1, growing=True)
    cache, mask = res.cache, res.attention_mask  # mask (B, Pmax + T)
    pos = res.position_ids[:, -1:]  # (B, 1), last real position of each row
    logits = res.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(params.max_new_tokens):
        nxt = pick_next(logits, params, gen)  # (B,)
        append_tokens(out, nxt, done, eos_token_ids, stop_check, params.ignore_eos)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        pos = pos + 1
        res = hf.forward(model, cache, input_ids=nxt.view(B, 1), attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1)
        cache, logits = res.cache, res.logits[:, -1]
    return out


def append_tokens(out: list[list[int]], nxt: torch.Tensor, done: torch.Tensor, eos_token_ids, stop_check,
                  ignore_eos: bool) -> None:
    """Append each unfinished row's next token (nxt: (B,)) and mark rows that end here (EOS, or
    a stop string: `stop_check(row, ids)` returns how many tokens to keep)."""
    for i in range(len(out)):
        if done[i]:
            continue
        tok = int(nxt[i])
        out[i].append(tok)
        if not ignore_eos and tok in eos_token_ids:
            done[i] = True
        elif stop_check is not None and (keep := stop_check(i, out[i])) is not None:
            del out[i][keep:]
            done[i] = True


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string in it (not included), and whether one was found: the one
    place a stop string ends a text (decoding, evaluation, the serving engine)."""
    hits = [h for h in (text.find(s) for s in stop) if h >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopStrings:
    """Ends a row when its decoded text contains a stop string; the stop string is not returned."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.cut: dict[int, str] = {}

    def __call__(self, row: int, ids: list[int]) -> int | None:
        text, hit = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)
        if not hit:
            return None
        self.cut[row] = text
        return len(ids)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    prefix: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    params: SamplingParams | None = None,
    **options,
) -> list[str]:
    """Continuations of `prompts` (text, used as given) under one prefix, or one per prompt.

    `prefix` is a KV prefix `(L, 2, H, P, D)` (see `PromptMethod.to_kv_prefix`), a list with one
    per prompt, or None for the bare model. `options` are `SamplingParams` fields.
    """
    params = params or SamplingParams(**options)
    if isinstance(prompts, str):
        prompts = [prompts]
    if prefix is None or isinstance(prefix, torch.Tensor):
        prefixes = [prefix]
    else:
        prefixes = list(prefix)
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
    dev = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    stops = StopStrings(tokenizer, params.stop) if params.stop else None
    ids = generate_ids(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), prefixes, params,
                       eos_ids(tokenizer, model), stops)
    texts = []
    for i, row in enumerate(ids):
        if stops is not None and i in stops.cut:
            texts.append(stops.cut[i])
        else:
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


# `softprompt.loops.generate(...)` calls the public API's generate (softprompt/runs/api.py): see softprompt._CallableModule.
