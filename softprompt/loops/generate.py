"""Generation over a batch of prompts, each row with its own KV prefix (or none).

The loop is ours rather than `model.generate`, so that it sees exactly one thing, a KV prefix per
row, whatever method made it: prefill once over `[prefix | prompt]`, then one token per step
with the cache. Greedy by default, so the same input gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from softprompt import hf
from softprompt.hf.prefix import prefixed_forward

# Below this temperature sampling is argmax in all but name, and logits / T overflows float32
# (1e-40 turned every logit into inf and softmax into nan): such a temperature is greedy.
TEMPERATURE_FLOOR = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy (argmax).

    Beyond OpenAI's fields, vLLM's, with vLLM's meaning (its `SamplingParams`): `min_p`,
    `repetition_penalty`, `min_tokens`, `stop_token_ids`, `include_stop_str_in_output`,
    `allowed_token_ids` and bad words (`bad_words_ids`: token sequences, as the engine tokenizes
    vLLM's `bad_words`). `logit_bias` is OpenAI's: (token id, bias) pairs, a bias in [-100, 100].
    `penalize` applies them to one row's logits, in vLLM's order; `pick_next` then samples."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    min_p: float = 0.0  # 0: no cut; else drop tokens below min_p x the likeliest token's probability
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = ()  # a row that generates one ends (reason "stop"), the token kept
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string ends a row before this many new tokens
    presence_penalty: float = 0.0  # OpenAI's: see `penalize`
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's (and HF's): see `penalize`
    logit_bias: tuple[tuple[int, float], ...] = ()  # a {token id: bias} mapping is taken too
    allowed_token_ids: tuple[int, ...] | None = None  # None: every token
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k", "min_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        if self.allowed_token_ids is not None:
            ids = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not ids:
                raise ValueError("allowed_token_ids must not be empty")
            object.__setattr__(self, "allowed_token_ids", ids)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        bias = tuple((t, b) for t, b in bias)
        _token_ids("logit_bias", [t for t, _ in bias])
        for t, b in bias:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        words = tuple(_token_ids("bad_words_ids", w) for w in self.bad_words_ids)
        if any(not w for w in words):
            raise ValueError("bad_words_ids must be non-empty token sequences")
        object.__setattr__(self, "bad_words_ids", words)

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR

    @property
    def penalized(self) -> bool:
        """Whether `penalize` changes logits at all (else a row's logits go to `pick_next` as they are)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.min_tokens or self.logit_bias or self.allowed_token_ids is not None
                    or self.bad_words_ids)


def _token_ids(name: str, ids) -> tuple[int, ...]:
    ids = tuple(ids)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name} must hold token ids (integers >= 0), got {list(ids)!r}")
    return ids


def penalize(logits: torch.Tensor, generated: Sequence[int], params: SamplingParams, prompt: Sequence[int] = (),
             eos: Collection[int] = (), allowed: torch.Tensor | None = None) -> torch.Tensor:
    """One row's logits (1, V), processed for picking, in vLLM's order (its sampler's steps 3 to 6,
    after the structured-output mask); the result is float32, the input is not changed:

    1. `allowed` (V,) bool, a structured-output grammar's mask: other tokens get -inf;
    2. `allowed_token_ids`: only these tokens stay;
    3. bad words: a sequence's last token gets -inf when `generated` ends with the rest of it;
    4. `min_tokens`: while fewer tokens are generated, `eos` and `stop_token_ids` get -inf;
    5. `logit_bias` is added;
    6. `repetition_penalty` r over every token of `prompt` and `generated`: a logit > 0 is divided
       by r, any other multiplied by it; then OpenAI's `logit[j] - c[j] * frequency_penalty -
       (c[j] > 0) * presence_penalty`, where c[j] counts token j among the generated tokens only.
    Token ids past the vocabulary (V) are ignored (the engine refuses them at the door)."""
    if not params.penalized and allowed is None:
        return logits
    logits = logits.float().clone()
    V = logits.shape[-1]
    if allowed is not None:
        keep = allowed[:V]
        if keep.shape[0] < V:  # a grammar knows the tokenizer's tokens; the model may have more rows
            keep = torch.cat([keep, keep.new_zeros(V - keep.shape[0])])
        logits.masked_fill_(~keep.to(logits.device), float("-inf"))
    if params.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
        keep[[i for i in params.allowed_token_ids if i < V]] = True
        logits.masked_fill_(~keep, float("-inf"))
    for word in params.bad_words_ids:
        *head, last = word
        if last < V and len(generated) >= len(head) and list(generated[len(generated) - len(head):]) == head:
            logits[..., last] = float("-inf")
    if len(generated) < params.min_tokens:
        ends = [i for i in {*eos, *params.stop_token_ids} if i < V]
        logits[..., ends] = float("-inf")
    for token, bias in params.logit_bias:
        if token < V:
            logits[..., token] += bias
    if params.repetition_penalty != 1:
        seen = [i for i in set(prompt) | set(generated) if i < V]
        values = logits[..., seen]
        r = params.repetition_penalty
        logits[..., seen] = torch.where(values > 0, values / r, values * r)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(list(generated), device=logits.device), minlength=V)[:V].float()
        logits = logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
    return logits


def bad_words_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's `bad_words` as token sequences: each word as written (leading spaces dropped) and, where
    a leading space makes it another word of as many tokens (byte-level BPE's "Ġword"), that form
    too, so a word is barred at the start of the text and after a space alike."""
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    seqs: list[tuple[int, ...]] = []
    for word in words:
        bare = ids(word.lstrip())
        if not bare:
            raise ValueError(f"bad word {word!r} is no token at all")
        seqs.append(bare)
        spaced = ids(" " + word.lstrip())
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            seqs.append(spaced)
    return tuple(seqs)


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
    """logits (B, V) -> next token ids (B,): argmax when greedy; else temperature, `min_p`, `top_k`,
    `top_p` (vLLM's order), then a draw. Never raises on inf or nan logits (see safe_logits)."""
    if params.greedy:
        return greedy(logits)
    logits = safe_logits(logits)
    logits = logits / params.temperature  # the largest entry stays 0: softmax is finite
    if params.min_p:  # vLLM's place for it: after temperature, before top-k and top-p
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
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
    # each row's own tokens, for the repetition penalty (vLLM counts the prompt's tokens too)
    prompts = [input_ids[i][attention_mask[i].bool()].tolist() if params.repetition_penalty != 1 else ()
               for i in range(B)]
    for step in range(params.max_new_tokens):
        if params.penalized:  # row by row: each has its own tokens so far
            logits = torch.cat([penalize(logits[i:i + 1], out[i], params, prompts[i], eos_token_ids)
                                for i in range(B)])
        nxt = pick_next(logits, params, gen)  # (B,)
        append_tokens(out, nxt, done, eos_token_ids, stop_check, params.ignore_eos, params)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        pos = pos + 1
        res = hf.forward(model, cache, input_ids=nxt.view(B, 1), attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1)
        cache, logits = res.cache, res.logits[:, -1]
    return out


def append_tokens(out: list[list[int]], nxt: torch.Tensor, done: torch.Tensor, eos_token_ids, stop_check,
                  ignore_eos: bool, params: SamplingParams | None = None) -> None:
    """Append each unfinished row's next token (nxt: (B,)) and mark rows that end here (EOS, a
    token of `params.stop_token_ids`, or a stop string: `stop_check(row, ids)` returns how many
    tokens to keep). Before `params.min_tokens` tokens no stop string is looked for (and `penalize`
    has ruled out EOS and the stop tokens), as vLLM does."""
    stop_ids, min_tokens = (params.stop_token_ids, params.min_tokens) if params is not None else ((), 0)
    for i in range(len(out)):
        if done[i]:
            continue
        tok = int(nxt[i])
        out[i].append(tok)
        if (not ignore_eos and tok in eos_token_ids) or tok in stop_ids:
            done[i] = True
        elif stop_check is not None and len(out[i]) >= min_tokens and (keep := stop_check(i, out[i])) is not None:
            del out[i][keep:]
            done[i] = True


def cut_at_stop(text: str, stop: Sequence[str], include: bool = False) -> tuple[str, bool]:
    """`text` up to the earliest stop string in it (included only with `include`, vLLM's
    include_stop_str_in_output), and whether one was found: the one place a stop string ends a text
    (decoding, evaluation, the serving engine)."""
    hits = [(h, -len(s)) for s in stop if (h := text.find(s)) >= 0]
    if not hits:
        return text, False
    at, minus_len = min(hits)  # the earliest; of two there, the longer
    return text[: at - minus_len if include else at], True


class StopStrings:
    """Ends a row when its decoded text contains a stop string; the stop string is returned only
    with `include` (vLLM's include_stop_str_in_output)."""

    def __init__(self, tokenizer, stop: Sequence[str], include: bool = False):
        self.tokenizer, self.stop, self.include = tokenizer, tuple(stop), include
        self.cut: dict[int, str] = {}

    def __call__(self, row: int, ids: list[int]) -> int | None:
        text, hit = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop, self.include)
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
    stops = StopStrings(tokenizer, params.stop, params.include_stop_str_in_output) if params.stop else None
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
