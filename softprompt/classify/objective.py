"""The training objective and the metrics of classification, for `train.Trainer(objective=...)`.

    loss = sum_rows -log softmax(scores)[label] / (rows in the global batch)

where `scores` (B, C) are an encoder head's logits or a verbalizer's label-word log-probabilities.
Metrics are in percent, like the generation metrics: accuracy and macro-F1 (the unweighted mean of
the per-class F1, so a classifier that ignores a rare class is not rewarded for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softprompt.classify.data import ClassificationData


def accuracy_f1(preds: list[int], golds: list[int], num_classes: int) -> dict:
    """{"accuracy", "f1"} in percent; F1 is macro-averaged over the classes (a class never predicted
    nor present counts as F1 0 only if it appears in gold or predictions)."""
    n = len(golds)
    acc = sum(p == g for p, g in zip(preds, golds)) / max(n, 1)
    f1s = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100 * acc, "f1": 100 * sum(f1s) / max(len(f1s), 1), "n": n}


class ClassificationObjective:
    """count / loss / metrics for the one training loop; the `prompt` it is given is a Classifier."""

    no_generation_metrics = frozenset({"accuracy", "f1"})

    def __init__(self):
        self._preds: dict[int, dict[int, int]] = {}  # id(data) -> row -> predicted class, from eval passes

    def count(self, data: ClassificationData, i: int) -> int:
        return 1

    def loss(self, classifier, model, data: ClassificationData, rows: list[int], pad_id: int, device):
        ids, mask = classifier.collate([data.ids[i] for i in rows], pad_id)
        scores = classifier(model, ids.to(device), mask.to(device))  # (B, C)
        gold = torch.tensor([data.labels[i] for i in rows], device=scores.device)
        if not torch.is_grad_enabled():  # an evaluation pass: keep the predictions for metrics()
            seen = self._preds.setdefault(id(data), {})
            seen.update(zip(rows, scores.argmax(-1).tolist()))
        return F.cross_entropy(scores.float(), gold, reduction="sum"), len(rows)

    def metrics(self, trainer, batch_size: int) -> dict:
        data = trainer.eval_data
        if data is None:
            return {}
        seen = self._preds.pop(id(data), {})  # the eval-loss pass just scored every row
        if len(seen) != len(data):
            seen = dict(enumerate(predict(trainer.prompt, trainer.model, data, batch_size, trainer.pad_id)
                                  .argmax(-1).tolist()))
        preds = [seen[i] for i in range(len(data))]
        return accuracy_f1(preds, data.labels, len(trainer.prompt.labels))


@torch.no_grad()
def predict(classifier, model, data: ClassificationData, batch_size: int, pad_id: int) -> torch.Tensor:
    """Class probabilities (N, C) for every row, in the data's order (batched by length)."""
    dev = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: -len(data.ids[i]))
    out = torch.zeros(len(data), len(classifier.labels))
    was_training = classifier.training
    classifier.eval()
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        ids, mask = classifier.collate([data.ids[i] for i in rows], pad_id)
        out[rows] = F.softmax(classifier(model, ids.to(dev), mask.to(dev)).float(), -1).cpu()
    classifier.train(was_training)
    return out
