"""Context distillation: the objective, the teacher's cached targets, and the inputs it is taught on.

The teacher is the frozen model given a long prompt (compiled once into a KV prefix of P_t
positions, `compile_text_kv`); the student is the same model given a short learned prefix. For
each input x the teacher writes its greedy continuation c = c_1..c_m; at every position that
predicts one of c_1..c_m the student is taught the teacher's next-token distribution:

    loss = mean over those positions of KL(q || p)      q: teacher, p: student

Only the teacher's top k tokens are kept per position (cached once: ids int32 (m, k) and their
log-probabilities float32 (m, k+1), see `topk_targets`), so its long forward pass is never
repeated. The rest of its mass is not dropped nor spread: both distributions are coarsened to
k+1 buckets, the teacher's k tokens and one tail bucket holding everything else,

    q_j = q(t_j), j <= k;  q_tail = 1 - sum_j q_j;  p_j = softmax(student logits)[t_j];  p_tail = 1 - sum_j p_j
    KL_k = sum_j q_j (log q_j - log p_j) + q_tail (log q_tail - log p_tail)

which is the exact KL between the coarsened distributions: never above the full KL (data
processing), equal to it when k covers the vocabulary (tested), and zero only when the student
gives every one of the teacher's top tokens the teacher's probability. Renormalizing the teacher
over its top k instead would teach the student to put *all* its mass there, a target the teacher
itself does not have. The student's log-probabilities come from its full-vocabulary softmax.

Rows are laid out as in training (`input + continuation`, left-padded; data.collate) and the LM
head runs only at the positions that predict a continuation token (hf.lm_head_at), as the loop's
cross-entropy does, so the objective plugs into the one training loop (loops/train.py `Trainer`,
its `objective=` hook) unchanged.

Inputs where the user has none come from self-study: the teacher itself writes candidates
(sampled with a seed), which are de-duplicated on normalized text and split into train and held-out.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from softprompt import hf
from softprompt.hf.prefix import check_prefix_support, prefixed_forward
from softprompt.loops.data import DataError, TokenRows, collate, data_rows
from softprompt.loops.evaluate import normalize
from softprompt.loops.generate import SamplingParams, StopStrings, eos_ids, generate_ids

# --------------------------------------------------------------------------------------------
# The long prompt as a KV prefix, and the text a request carries after it


def system_turn(tokenizer, system: str) -> str:
    """The chat template's rendering of a conversation that holds only the system turn `system`:
    the part of every conversation under that system prompt that comes before the first user turn.
    Raises ValueError where the tokenizer has no chat template, or where its template renders the
    system turn differently once a user turn follows (then no prefix can stand for it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template")
    head = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    full = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "x"}],
                                         tokenize=False, add_generation_prompt=True)
    if not full.startswith(head):
        raise ValueError("this chat template renders the system turn differently when a user turn follows, so the "
                         "system prompt cannot be compiled apart from the conversation")
    return head


def request_text(tokenizer, prompt: str, user: str, chat: bool) -> str:
    """What a request sends after the compiled prompt: `user` itself (plain), or, with `chat`, the
    rest of the chat template's rendering of [system: prompt, user: user] after the system turn
    (the user turn and the assistant's header)."""
    if not chat:
        return user
    head = system_turn(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "system", "content": prompt}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    return full[len(head):]


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The long prompt's tokens, as the prefix holds them: the text tokenized alone, with no
    special tokens added (serving tokenizes a request the same way, `add_special_tokens=False`,
    so `prompt ids + request ids` is exactly what writing the prompt out before the request
    gives); with `chat`, the chat template's system turn (its own special tokens included)."""
    text = system_turn(tokenizer, prompt) if chat else prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt has no tokens")
    return list(ids)


def boundary_is_clean(tokenizer, prompt: str, request: str, chat: bool = False) -> bool:
    """Whether the request's tokens after the prompt's are the tokens of the two written out as one
    string. The prefix always equals `prompt ids + request ids` (token by token, the served form);
    this says whether that is also the tokenization of the concatenated text. It holds when the
    prompt ends with a newline and the request starts with no whitespace, for byte-level BPE
    (SmolLM2, Llama 3, Qwen) and word-level tokenizers alike; a prompt ending in a space or two
    newlines may merge with the request's first characters in a joint tokenization."""
    head = system_turn(tokenizer, prompt) if chat else prompt
    tail = request_text(tokenizer, prompt, request, chat)
    joint = tokenizer(head + tail, add_special_tokens=False)["input_ids"]
    apart = prompt_ids(tokenizer, prompt, chat) + list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    return list(joint) == apart


# --------------------------------------------------------------------------------------------
# The objective


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's cached targets from its logits (N, V): the ids of its k most likely tokens
    (N, k) int32, most likely first, and their log-probabilities under its full softmax with the
    tail bucket's appended, (N, k+1) float32 (float64 logits stay float64)."""
    logp = logits.double().log_softmax(-1) if logits.dtype == torch.float64 else logits.float().log_softmax(-1)
    k = min(k, logp.shape[-1])
    top = logp.topk(k, dim=-1)
    return top.indices.to(torch.int32), torch.cat([top.values, _tail(logp, top.indices)], dim=-1)


def _tail(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `ids` (N, k), from full log-probabilities (N, V): (N, 1), -inf when none."""
    return logp.scatter(-1, ids.long(), float("-inf")).logsumexp(-1, keepdim=True)


def topk_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logq: torch.Tensor) -> torch.Tensor:
    """KL_k(q || p) per position (N,) (module docstring): the teacher's top-k ids (N, k) and
    log-probabilities with the tail's (N, k+1); the student's logits (N, V), computed in float32
    (float64 stays float64). A bucket the teacher gives no mass adds nothing (0 log 0 = 0)."""
    s = student_logits.double() if student_logits.dtype == torch.float64 else student_logits.float()
    logp = s.log_softmax(-1)  # (N, V), over the full vocabulary
    ids = top_ids.to(logp.device).long()
    logp_b = torch.cat([logp.gather(-1, ids), _tail(logp, ids)], dim=-1)  # (N, k+1)
    logq = top_logq.to(device=logp.device, dtype=logp.dtype)
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logp_b), torch.zeros_like(q))
    return terms.sum(-1)


def position_logits(prompt, model, input_ids, attention_mask, target_mask) -> torch.Tensor:
    """Logits (N, V) at the N positions that predict a target token (those where the next token
    is a target), row by row in order: the head runs only there (as loops/train.py target_loss).
    `prompt(model, ids, mask, logits_to_keep=K)` is a prompt method or a `FixedPrefix`."""
    T = input_ids.shape[1]
    pred = torch.zeros_like(target_mask)
    pred[:, :-1] = target_mask[:, 1:]  # (B, T): position t predicts token t+1
    cols = pred.any(0).nonzero()
    if not len(cols):
        raise ValueError("batch has no target tokens")
    K = T - int(cols[0])
    sel = pred[:, T - K:]  # (B, K)
    hf.once(model, check_prefix_support)  # before the head is hooked: the check needs whole logits
    with hf.lm_head_at(model, sel.to(input_ids.device)):
        return prompt(model, input_ids, attention_mask, logits_to_keep=K).logits  # (N, V)


class FixedPrefix:
    """A fixed KV prefix `(L, 2, H_kv, P, D)` (or None: the bare model) with a prompt's calling
    convention, for the teacher and the baselines."""

    def __init__(self, kv: torch.Tensor | None):
        self.kv = kv

    def __call__(self, model, input_ids, attention_mask, **kwargs):
        kwargs.setdefault("use_cache", False)
        return prefixed_forward(model, input_ids, attention_mask, [self.kv], **kwargs)


@dataclass
class DistillData(TokenRows):
    """Per row: `ids` = input + the teacher's continuation, `n_target` = the continuation's length
    m (the positions taught), the teacher's cached `top_ids` (m, k) int32 and `top_logq` (m, k+1)."""

    ids: list[list[int]]
    n_target: list[int]
    top_ids: list[torch.Tensor]
    top_logq: list[torch.Tensor]


class DistillObjective:
    """The loop's objective (loops/train.py `CausalLMObjective` has the protocol): the summed
    KL_k over the taught positions and their count, so the loop's loss is the mean KL per
    position; its `eval_loss` is the held-out mean KL, and `metrics` adds the held-out next-token
    agreement (the student's argmax is the teacher's)."""

    no_generation_metrics: frozenset = frozenset()

    def count(self, data: DistillData, i: int) -> int:
        return data.n_target[i]

    def loss(self, prompt, model, data: DistillData, rows: list[int], pad_id: int, device) -> tuple[torch.Tensor, int]:
        logits, top_ids, top_logq = self._batch(prompt, model, data, rows, pad_id, device)
        return topk_kl(logits, top_ids, top_logq).sum(), int(top_ids.shape[0])

    @staticmethod
    def _batch(prompt, model, data, rows, pad_id, device):
        ids, mask, tmask = collate([data.ids[i] for i in rows], [data.n_target[i] for i in rows], pad_id)
        logits = position_logits(prompt, model, ids.to(device), mask.to(device), tmask.to(device))
        return logits, torch.cat([data.top_ids[i] for i in rows]), torch.cat([data.top_logq[i] for i in rows])

    def metrics(self, trainer, batch_size: int) -> dict:
        if trainer.eval_data is None:
            return {}
        return {"agreement": evaluate(trainer.prompt, trainer.model, trainer.eval_data, batch_size,
                                      trainer.pad_id)["agreement"]}


@torch.no_grad()
def evaluate(prompt, model, data: DistillData, batch_size: int = 16, pad_id: int = 0) -> dict:
    """Mean KL_k per taught position and next-token agreement (the share of positions where the
    student's most likely token is the teacher's) of `prompt` (a prompt or a FixedPrefix) on `data`."""
    dev = next(model.parameters()).device
    kl, agree, n = 0.0, 0, 0
    for s in range(0, len(data), batch_size):
        rows = list(range(s, min(s + batch_size, len(data))))
        logits, top_ids, top_logq = DistillObjective._batch(prompt, model, data, rows, pad_id, dev)
        kl += float(topk_kl(logits, top_ids, top_logq).sum())
        agree += int((logits.argmax(-1).cpu() == top_ids[:, 0].long()).sum())
        n += int(top_ids.shape[0])
    return {"kl": kl / max(n, 1), "agreement": agree / max(n, 1), "positions": n}


# --------------------------------------------------------------------------------------------
# The teacher


@dataclass
class Continuations:
    """The teacher's greedy continuations of a list of requests: token ids (EOS or the token that
    holds the stop string included, so the student learns where to stop) and the text (cut at the
    stop string, special tokens dropped), in the requests' order."""

    ids: list[list[int]]
    texts: list[str]


@torch.no_grad()
def continue_requests(model, tokenizer, requests: Sequence[str], kv: torch.Tensor | None, params: SamplingParams,
                      batch_size: int = 16) -> Continuations:
    """Continuations of `requests` (each tokenized alone, as serving does) under the prefix `kv`,
    in batches of similar length through the one decoding loop (loops/generate.py)."""
    dev = next(model.parameters()).device
    ids: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i]))
    eos = eos_ids(tokenizer, model)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([requests[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        stops = StopStrings(tokenizer, params.stop) if params.stop else None
        rows = generate_ids(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev), [kv], params, eos, stops)
        for j, (i, r) in enumerate(zip(idx, rows)):
            ids[i] = r
            cut = stops is not None and j in stops.cut
            texts[i] = stops.cut[j] if cut else tokenizer.decode(r, skip_special_tokens=True)
    return Continuations(ids, [t.strip() for t in texts])


@torch.no_grad()
def teacher_targets(model, kv: torch.Tensor, request_ids: list[list[int]], continuations: list[list[int]], k: int,
                    batch_size: int = 16, pad_id: int = 0) -> DistillData:
    """One teacher forward pass over `request + continuation` per row (batched) under its prefix
    `kv`; keeps the top-k targets at the continuation's positions (`topk_targets`)."""
    rows = [list(r) + list(c) for r, c in zip(request_ids, continuations)]
    n_target = [len(c) for c in continuations]
    if any(n < 1 for n in n_target):
        raise ValueError("every continuation needs at least one token")
    dev = next(model.parameters()).device
    top_ids: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    top_logq: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    teacher = FixedPrefix(kv)
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        ids, mask, tmask = collate([rows[i] for i in idx], [n_target[i] for i in idx], pad_id)
        logits = position_logits(teacher, model, ids.to(dev), mask.to(dev), tmask.to(dev))
        t_ids, t_logq = topk_targets(logits, k)
        sizes = [n_target[i] for i in idx]
        for i, a, b in zip(idx, t_ids.cpu().split(sizes), t_logq.cpu().split(sizes)):
            top_ids[i], top_logq[i] = a.contiguous(), b.contiguous()
    return DistillData(rows, n_target, top_ids, top_logq)


# --------------------------------------------------------------------------------------------
# Inputs: de-duplication, the held-out split, self-study


def read_inputs(source, input_field: str | None = None, label_field: str | None = None) -> tuple[list[str], list]:
    """(inputs, a label or None each) from a list of strings or a file: .txt (one input per line),
    .jsonl/.csv/.tsv rows whose `input_field` holds the input (None: "input", else "prompt") and
    `label_field` the label, if any (None: "output", else "completion")."""
    if not isinstance(source, (str, os.PathLike)):
        texts = [str(x) for x in source]
        return texts, [None] * len(texts)
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ValueError(f"inputs file {path} does not exist")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return texts, [None] * len(texts)
    texts, labels = [], []
    for where, row in data_rows(path):
        if isinstance(row, DataError):
            raise row
        text = row.get(input_field) if input_field else row.get("input", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            field = repr(input_field) if input_field else "an 'input' or 'prompt'"
            raise ValueError(f"{where}: no input: a row needs {field} field holding text (it has {sorted(row)})")
        label = row.get(label_field) if label_field else row.get("output", row.get("completion"))
        texts.append(text)
        labels.append(label if isinstance(label, str) else None)
    return texts, labels


def distinct(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct text, two texts being the same when they are
    equal after normalizing case, punctuation and spaces (evaluate.normalize); blank ones dropped."""
    seen, out = set(), []
    for i, t in enumerate(texts):
        key = normalize(t)
        if key and key not in seen:
            seen.add(key)
            out.append(i)
    return out


def dedupe(texts: Sequence[str]) -> list[str]:
    """The distinct texts (`distinct`), stripped, in first-seen order."""
    return [texts[i].strip() for i in distinct(texts)]


def split_inputs(texts: Sequence[str], heldout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices into `texts`: a shuffle fixed by `seed`, `heldout` of them (at
    least one, and at least one left to train on) held out; each list in the texts' order."""
    n = len(texts)
    if n < 2:
        raise ValueError(f"distillation needs at least 2 distinct inputs (one to train on, one held out), got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = min(n - 1, max(1, round(n * heldout)))
    return sorted(order[n_held:]), sorted(order[:n_held])


def self_study(model, tokenizer, kv: torch.Tensor, request: str, n: int, params: SamplingParams,
               batch_size: int = 16, max_rounds: int = 4) -> tuple[list[str], int]:
    """Up to `n` distinct inputs written by the teacher (the model under the long prompt's prefix
    `kv`) in answer to `request`, sampled with `params` (its seed fixes the draw); rounds of
    `batch_size` samples go on until `n` distinct ones exist or `max_rounds * n` were drawn.
    Returns (inputs, samples drawn)."""
    if params.greedy:
        raise ValueError("self-study samples its inputs: use a temperature above 0")
    found: list[str] = []
    drawn, budget = 0, max_rounds * n
    seed = params.seed if params.seed is not None else 0
    while len(found) < n and drawn < budget:
        size = min(batch_size, budget - drawn)
        round_params = replace(params, seed=seed + drawn)  # each round its own draw
        out = continue_requests(model, tokenizer, [request] * size, kv, round_params, batch_size=size)
        drawn += size
        found = dedupe(found + [t for t in out.texts if t])
    return found[:n], drawn
