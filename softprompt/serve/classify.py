"""Classification for the server, kept apart from HTTP: task name + texts -> label and probabilities.

A classification task is a classifier artifact (see softprompt/classify). A label-word (verbalizer)
task runs on the server's own decoder, the one the generation engine holds, and is checked against
its fingerprint; a head-on-encoder task runs on an encoder loaded once, on first use (by default the
embedded all-MiniLM-L6-v2, or the local directory the card names). Classifiers are cached per
content-named file (a store's new version is a new key), so a task is read once. One forward pass
per request; calls are serialized by a lock (the model is shared with the generation engine's
thread, which only reads it).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from softprompt.io.artifact import ArtifactError
from softprompt.serve.schemas import MAX_INPUTS, ClassifyRequest  # noqa: F401  (the request body lives with the others)
from softprompt.serve.tasks import RequestError, TaskRefused

MAX_CHARS = 20_000  # per text


def default_encoder_loader(card: dict):
    """(model, tokenizer) for an encoder classifier's card: the embedded encoder, or its base directory."""
    from softprompt.io.load import EMBEDDED_ENCODER_NAME, load_encoder

    name = (card.get("base_model") or {}).get("name")
    if name and name != EMBEDDED_ENCODER_NAME and Path(name).is_dir():
        return load_encoder(name)
    return load_encoder(None)


class ClassifyService:
    """`classify(task, texts)` -> one `{"label", "probabilities": {label: p}}` per text."""

    def __init__(self, model, tokenizer, resolve: Callable[[str], object],
                 encoder_loader: Callable[[dict], tuple] = default_encoder_loader, max_cached: int = 32):
        self.model, self.tokenizer, self.resolve = model, tokenizer, resolve
        self.encoder_loader = encoder_loader
        self._encoders: dict[str, tuple] = {}  # base name -> (model, tokenizer)
        self._cache: OrderedDict[str, tuple] = OrderedDict()  # file key -> (classifier, model, tokenizer)
        self.max_cached = max_cached
        self._lock = threading.Lock()

    def _load(self, name: str):
        from softprompt.classify.model import Classifier
        from softprompt.io.classifier import is_classifier_card, load_classifier, read_classifier_card

        source = self.resolve(name)  # raises UnknownTask
        if isinstance(source, Classifier):
            tok = self.tokenizer if source.kind == "verbalizer" else getattr(source, "tokenizer", None)
            model = self.model if source.kind == "verbalizer" else getattr(source, "encoder", None)
            if model is None or tok is None:
                raise TaskRefused(f"task {name!r}: an in-memory encoder classifier needs .encoder and .tokenizer")
            return source, model, tok
        where = getattr(source, "path", source)
        if not isinstance(where, (str, os.PathLike)):  # an in-memory prompt for generation (found by the fuzzer)
            raise TaskRefused(f"task {name!r} is a {getattr(source, 'method', 'prompt')} for generation, not a "
                              "classifier: use /v1/completions for it")
        path = Path(where)
        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            if hasattr(source, "verify"):  # a store entry: the file must match its index
                source.verify()
            card = read_classifier_card(path)
            if not is_classifier_card(card):
                raise ArtifactError(f"it is a {card.get('method')} prompt for generation, not a classifier: use "
                                    "/v1/completions for it")
            if card["classifier"].get("kind") == "head":
                base = (card.get("base_model") or {}).get("name") or ""
                if base not in self._encoders:
                    self._encoders[base] = self.encoder_loader(card)
                model, tok = self._encoders[base]
            else:
                model, tok = self.model, self.tokenizer
            clf = load_classifier(path, model)
        except (ArtifactError, OSError) as e:
            raise TaskRefused(f"task {name!r} cannot classify: {e}") from e
        self._cache[key] = (clf, model, tok)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return clf, model, tok

    def classify(self, task: str, texts: list[str]) -> list[dict]:
        from softprompt.io.classifier import classify_texts

        if not texts:
            raise RequestError("input must hold at least one text")
        if len(texts) > MAX_INPUTS:
            raise RequestError(f"at most {MAX_INPUTS} texts per request, got {len(texts)}")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise RequestError("every input must be a non-empty string")
            if len(t) > MAX_CHARS:
                raise RequestError(f"an input is longer than {MAX_CHARS} characters")
            if not t.isascii():
                try:  # a lone surrogate (a JSON "\\ud800" escape) makes the tokenizer raise
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError("an input is not valid Unicode text (it holds a lone surrogate)") from None
        with self._lock:
            clf, model, tok = self._load(task)
            probs = classify_texts(clf, model, tok, texts)
        return [{"label": clf.labels[int(p.argmax())], "probabilities": dict(zip(clf.labels, map(float, p)))}
                for p in probs]
