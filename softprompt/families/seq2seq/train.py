"""Training encoder-decoder prompts with the one loop in softprompt/loops/train.py.

Data reuses `TokenizedData`: row i stores `source ids + target ids` with `n_target[i]` = target
length (target tokens and eos), so batching by length and resuming work unchanged. The loss is

    sum over target tokens y_t of -log p(y_t | source, y_<t)

with teacher forcing: the decoder reads [start, y_1, ..., y_{n-1}] (right-padded) and predicts
[y_1, ..., y_n]; the normalizer is the number of target tokens, as for decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softprompt.families.seq2seq.generate import decoder_start_id
from softprompt.loops.data import BadRows, DataConfig, Example, TokenizedData, keep_fitting
from softprompt.loops.train import CausalLMObjective


def tokenize_seq2seq(examples: list[Example], tokenizer, cfg: DataConfig = DataConfig(),
                     bad: BadRows | None = None) -> TokenizedData:
    """Source with the tokenizer's special tokens (T5 and BART expect them), target + eos."""
    eos = tokenizer.eos_token_id

    def encode(ex):
        src = tokenizer(ex.prompt if isinstance(ex.prompt, str) else ex.prompt[1])["input_ids"]
        return src, tokenizer(ex.target, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])

    return keep_fitting(examples, encode, cfg, bad)


def seq2seq_batch(rows: list[list[int]], n_target: list[int], pad_id: int, start_id: int):
    """(input_ids, attention_mask) (B, S) right-padded sources; (decoder_input_ids,
    decoder_attention_mask, labels) (B, T) right-padded, labels -100 at padding."""
    srcs = [r[:len(r) - n] for r, n in zip(rows, n_target)]
    tgts = [r[len(r) - n:] for r, n in zip(rows, n_target)]
    B, S, T = len(rows), max(map(len, srcs)), max(map(len, tgts))
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    dec = torch.full((B, T), pad_id, dtype=torch.long)
    dmask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        dec[i, :len(t)] = torch.tensor([start_id] + t[:-1])
        dmask[i, :len(t)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return ids, mask, dec, dmask, labels


class Seq2SeqObjective(CausalLMObjective):
    """The loop's objective for encoder-decoder models: `CausalLMObjective`'s count and metrics,
    a teacher-forced loss, and seq2seq generation for the scores."""

    def loss(self, prompt, model, data: TokenizedData, rows: list[int], pad_id: int, device):
        batch = seq2seq_batch([data.ids[i] for i in rows], [data.n_target[i] for i in rows], pad_id,
                              decoder_start_id(model))
        ids, mask, dec, dmask, labels = (t.to(device) for t in batch)
        logits = prompt(model, ids, mask, dec, dmask).logits  # (B, T, V)
        keep = labels != -100
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"), int(keep.sum())

    def evaluate_groups(self):
        from softprompt.families.seq2seq.generate import evaluate_groups

        return evaluate_groups
