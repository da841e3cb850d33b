"""Classifier artifacts: the prompt's tensors (+ `head.weight`, `head.bias` for an encoder) and a card
whose `task` is "classify" and whose `classifier` section holds the kind, the labels, the template and
(verbalizer) the label words and their token ids. Written by `artifact.save_artifact` (a Classifier
supplies `card_extra`), read here with the same checks as any artifact: format, checksum, base-model
fingerprint, and shapes that fit the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from softprompt.classify.model import HEAD_ONLY, Classifier, EncoderClassifier, VerbalizerClassifier
from softprompt.core.defaults import POOLING
from softprompt.core.geometry import geometry
from softprompt.io.artifact import ArtifactError, read_artifact, verified_tensors
from softprompt.loops.config import DataConfig
from softprompt.methods import METHODS


def is_classifier_card(card: dict) -> bool:
    return isinstance(card, dict) and card.get("task") == "classify" and isinstance(card.get("classifier"), dict)


def read_classifier_card(path) -> dict:
    return read_artifact(path)[0]


def load_classifier(path: str | os.PathLike, model, *, allow_other_base: bool = False) -> Classifier:
    """A Classifier for `model` from an artifact; refuses a prompt artifact (no labels), a classifier
    made for other base weights, an encoder classifier on a decoder (and back), and bad shapes."""
    path = Path(path)
    card, blob = read_artifact(path)
    if not is_classifier_card(card):
        raise ArtifactError(f"{path} is a {card.get('method')} prompt for generation, not a classifier (its card has "
                            "no labels); train one with `softprompt train --task classify --labels ...`")
    tensors = verified_tensors(path, card, blob, model, allow_other_base)
    spec = card["classifier"]
    kind, labels = spec.get("kind"), list(spec.get("labels") or [])
    from softprompt.families.encoder import is_encoder_config

    if (kind == "head") != is_encoder_config(model.config):
        raise ArtifactError(f"{path} is a {'head-on-encoder' if kind == 'head' else 'label-word (decoder)'} "
                            f"classifier; the loaded model is {'not ' if kind == 'head' else ''}an encoder")
    geo = geometry(model)
    method = card["method"]
    prompt_tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    prompt = None
    if method != HEAD_ONLY:
        cls = METHODS.get(method)
        if cls is None:
            raise ArtifactError(f"{path}: unknown classifier method {method!r}; this softprompt knows "
                                f"{', '.join(sorted([*METHODS, HEAD_ONLY]))}: upgrade softprompt or check the card")
        want = {k: tuple(v) for k, v in cls.expected_shapes(geo, int(card["num_virtual_tokens"])).items()}
        have = {k: tuple(t.shape) for k, t in prompt_tensors.items()}
        if want != have:
            raise ArtifactError(f"{path}: prompt tensor shapes {have} do not fit this model, which needs {want}")
        prompt = cls.from_export(geo, card.get("config") or {}, prompt_tensors)
    template = spec.get("template") or "{text}"
    if kind == "head":
        head = {k: v for k, v in tensors.items() if k.startswith("head.")}
        want = {"head.weight": (len(labels), geo.hidden_size), "head.bias": (len(labels),)}
        if {k: tuple(v.shape) for k, v in head.items()} != want:
            raise ArtifactError(f"{path}: the head's shapes do not fit {len(labels)} labels on hidden size "
                                f"{geo.hidden_size}")
        clf: Classifier = EncoderClassifier(prompt, geo.hidden_size, labels, spec.get("pooling", POOLING), template, head,
                                            shift_positions=bool(spec.get("shift_positions", False)))
    elif kind == "verbalizer":
        clf = VerbalizerClassifier(prompt, labels, spec["label_words"], spec["label_token_ids"], template)
        bad = [t for ids in clf.label_token_ids for t in ids if not 0 <= t < geo.vocab_size]
        if bad:
            raise ArtifactError(f"{path}: label token ids {bad} are outside this model's vocabulary")
    else:
        raise ArtifactError(f"{path}: unknown classifier kind {kind!r}; upgrade softprompt")
    clf.card = card
    p = next(model.parameters())
    clf.to(p.device)
    clf.eval()
    return clf


def render(template: str, text: str) -> str:
    """An input text through the classifier's template: a template has one field (e.g. "{sentence}"
    or "Review: {text}\\nSentiment:"), filled with the text."""
    import string

    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    if len(fields) != 1:
        raise ValueError(f"the template {template!r} has {len(fields)} fields; a served classifier needs exactly one")
    return template.format(**{fields.pop(): text})


@torch.no_grad()
def classify_texts(classifier: Classifier, model, tokenizer, texts: list[str], batch_size: int = 32,
                   max_length: int = DataConfig.max_length) -> torch.Tensor:
    """Class probabilities (N, C) for raw texts (rendered through the classifier's template)."""
    from softprompt.classify.data import ClassificationData
    from softprompt.classify.objective import predict

    encoder = classifier.kind == "head"
    ids = []
    for t in texts:
        x = tokenizer(render(classifier.template, t), add_special_tokens=encoder, truncation=encoder,
                      max_length=max_length if encoder else None)["input_ids"]
        ids.append(x if encoder else x[-max_length:])
    data = ClassificationData(ids, [0] * len(ids), [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return predict(classifier, model, data, batch_size, pad)
