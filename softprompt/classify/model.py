"""Two classifiers over a frozen model; both return class scores `(B, C)` from a padded batch.

EncoderClassifier   a bidirectional encoder with a deep prompt (prefix tuning at every layer, the
                    P-tuning v2 recipe), a soft prompt (prompt tuning), or no prompt (head only, the
                    linear probe), then pooling (mean or [CLS]) and a trainable Linear(d, C) head.
VerbalizerClassifier a causal LM with any prompt method and no head: class c scores
                    log p(label word c | prompt) = sum_j log p(w_j | prompt, w_<j) over the label
                    word's tokens (several tokens are fine). Training uses cross-entropy over these C
                    scores (a softmax over the classes, not the vocabulary): it is the decision we
                    measure, and it spends no gradient on pushing the label words above the other
                    49k tokens of the vocabulary, which does not change the prediction.

Both quack like a `PromptMethod` for the training loop and the artifact writer (`method`,
`num_virtual_tokens`, `export_tensors`, `config_dict`, `card_extra`), so `Trainer` and
`save_artifact` take them unchanged. The artifact holds the prompt's tensors, plus `head.weight`
and `head.bias` for an encoder; the card's `classifier` section holds the labels and how to
render and read an input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.core.defaults import POOLING
from softprompt.families.encoder import encode, pool
from softprompt.methods import InputPromptMethod, PromptMethod
from softprompt.methods.base import seeded

HEAD_ONLY = "head_only"  # the `method` of an encoder classifier without a prompt


class Classifier(nn.Module):
    """What the two kinds share: labels, the input template, and the PromptMethod-like surface."""

    kind: str
    padding_side: str

    def __init__(self, prompt: PromptMethod | None, labels: list[str], template: str = "{text}"):
        super().__init__()
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least 2 distinct labels, got {labels}")
        self.prompt = prompt
        self.labels = list(labels)
        self.template = template

    @property
    def method(self) -> str:
        return self.prompt.method if self.prompt is not None else HEAD_ONLY

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens if self.prompt is not None else 0

    def config_dict(self) -> dict:
        return self.prompt.config_dict() if self.prompt is not None else {}

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        return self.prompt.export_tensors() if self.prompt is not None else {}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return self.prompt_tensors()

    def card_section(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "template": self.template}

    @property
    def card_extra(self) -> dict:
        return {"task": "classify", "classifier": self.card_section()}

    def collate(self, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, T), padded on this model's side."""
        T, B = max(len(r) for r in rows), len(rows)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if self.padding_side == "right" else slice(T - len(r), T)
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return ids, mask

    def sizes(self, model) -> dict:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"method": self.method, "num_virtual_tokens": self.num_virtual_tokens,
                "trainable_parameters": trainable,
                "artifact_bytes": sum(t.numel() * 4 for t in self.export_tensors().values())}


class EncoderClassifier(Classifier):
    kind = "head"
    padding_side = "right"

    def __init__(self, prompt: PromptMethod | None, hidden_size: int, labels: list[str], pooling: str = POOLING,
                 template: str = "{text}", head: dict[str, torch.Tensor] | None = None, seed: int = 0,
                 shift_positions: bool = False):
        super().__init__(prompt, labels, template)
        self.shift_positions = shift_positions  # deep prompt: PEFT's positions P, P+1, ... (see encoder.encode)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.pooling = pooling
        self.head_lr: float | None = None  # None: the head trains at the run's lr
        with seeded(seed):  # the head's default init
            self.head = nn.Linear(hidden_size, len(labels))
        if head is not None:
            self.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the prompt at the run's lr, the head at `head_lr` (when set) through the
        loop's `lr_scale`, so every method's head learns at the same rate as the linear probe's."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("head.")]
        scale = self.head_lr / lr if self.head_lr else 1.0
        return [g for g in ({"params": rest}, {"params": head, "lr_scale": scale}) if g["params"]]

    def forward(self, model, input_ids, attention_mask) -> torch.Tensor:
        """Class logits (B, C)."""
        if self.prompt is None:
            h = encode(model, input_ids, attention_mask)
        elif isinstance(self.prompt, InputPromptMethod):
            h = encode(model, input_ids, attention_mask, soft_prompt=self.prompt.virtual_embeddings())
        else:
            h = encode(model, input_ids, attention_mask, prefix=self.prompt.kv(),
                       shift_positions=self.shift_positions)  # (B, T, d)
        return self.head(pool(h, attention_mask, self.pooling))  # (B, C)

    def export_tensors(self):
        head = {f"head.{k}": v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        return self.prompt_tensors() | head

    def card_section(self):
        return super().card_section() | {"pooling": self.pooling, "shift_positions": self.shift_positions}


class VerbalizerClassifier(Classifier):
    kind = "verbalizer"
    padding_side = "left"

    def __init__(self, prompt: PromptMethod | None, labels: list[str], label_words: list[str],
                 label_token_ids: list[list[int]], template: str = "{text}"):
        super().__init__(prompt, labels, template)
        if len(label_words) != len(labels) or len(label_token_ids) != len(labels):
            raise ValueError(f"{len(labels)} labels need as many label words, got {len(label_words)}")
        if any(not t for t in label_token_ids):
            raise ValueError("every label word needs at least one token")
        if len({tuple(t) for t in label_token_ids}) != len(labels):
            raise ValueError(f"label words {label_words} do not tokenize to distinct token sequences")
        self.label_words = list(label_words)
        self.label_token_ids = [list(map(int, t)) for t in label_token_ids]

    @staticmethod
    def label_tokens(tokenizer, template: str, label_words: list[str]) -> list[list[int]]:
        """Each label word as the model sees it after the prompt: after one space, unless the
        template ends in whitespace (data.join_target's rule for targets)."""
        sep = "" if template[-1:].isspace() else " "
        return [tokenizer(w if w[:1].isspace() else sep + w, add_special_tokens=False)["input_ids"]
                for w in label_words]

    def _lm(self, model, ids, mask, keep: int):
        if self.prompt is None:
            from softprompt.hf.prefix import prefixed_forward

            return prefixed_forward(model, ids, mask, [None], use_cache=False, logits_to_keep=keep).logits
        return self.prompt(model, ids, mask, logits_to_keep=keep).logits

    def forward(self, model, input_ids, attention_mask) -> torch.Tensor:
        """Class scores (B, C): the summed log-probabilities of each class's label tokens."""
        B, T = input_ids.shape
        C = len(self.labels)
        dev = input_ids.device
        if all(len(t) == 1 for t in self.label_token_ids):  # one pass: the next-token distribution
            logp = F.log_softmax(self._lm(model, input_ids, attention_mask, 1)[:, -1].float(), -1)  # (B, V)
            return logp[:, torch.tensor([t[0] for t in self.label_token_ids], device=dev)]  # (B, C)
        # Several tokens: one row per (input, class), the label word appended; left padding puts
        # every row's label word in the last columns, so the last K+1 positions cover all of them.
        K = max(len(t) for t in self.label_token_ids)
        lab = torch.zeros(C, K, dtype=torch.long, device=dev)  # right-aligned label tokens
        lmask = torch.zeros(C, K, dtype=torch.long, device=dev)
        for c, t in enumerate(self.label_token_ids):
            lab[c, K - len(t):] = torch.tensor(t, device=dev)
            lmask[c, K - len(t):] = 1
        ids = torch.cat([input_ids.repeat_interleave(C, 0), lab.repeat(B, 1)], 1)  # (B*C, T+K)
        mask = torch.cat([attention_mask.repeat_interleave(C, 0), lmask.repeat(B, 1)], 1)
        # Left-align each row again (a short label word leaves a gap of padding before it).
        order = torch.sort(mask, dim=1, stable=True).indices  # pads (0) first, then real tokens in order
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        logits = self._lm(model, ids, mask, K + 1)[:, :-1].float()  # (B*C, K, V): position t predicts t+1
        logp = F.log_softmax(logits, -1).gather(-1, ids[:, -K:].unsqueeze(-1)).squeeze(-1)  # (B*C, K)
        return (logp * lmask.repeat(B, 1)).sum(-1).view(B, C)

    def card_section(self):
        return super().card_section() | {"label_words": self.label_words, "label_token_ids": self.label_token_ids}
