"""The jobs behind `softprompt train --task classify` and `softprompt eval` of a classifier.

The base model decides the kind: an encoder (the default for classification: the embedded
all-MiniLM-L6-v2, `--base minilm`) gets a head; a causal LM (`--base smollm2` for the embedded
SmolLM2, or a path) gets label words. Methods: prefix_tuning (deep prompt), prompt_tuning,
p_tuning, and head_only (encoder: the linear probe).
"""

from __future__ import annotations

import time
from pathlib import Path

DECODER_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")
DEFAULT_DECODER_SUFFIX = "\nAnswer:"


def load_classification_base(base: str | None, device=None):
    """(model, tokenizer, is_encoder): the embedded encoder by default, the embedded decoder for
    `smollm2`, else a local directory of either kind (its config decides)."""
    from softprompt.families.encoder import is_encoder_config
    from softprompt.io.load import ENCODER_ALIASES, load_base, load_encoder

    if base is None or base in ENCODER_ALIASES:
        return (*load_encoder(None, device), True)
    if base in DECODER_ALIASES:
        return (*load_base(None, device=device), False)
    from transformers import AutoConfig

    if is_encoder_config(AutoConfig.from_pretrained(base)):
        return (*load_encoder(base, device), True)
    return (*load_base(base, device=device), False)


def classify_on_encoder(base: str | None) -> bool:
    """Whether a classification run on `base` gets an encoder (a head) or a decoder (label words):
    the embedded encoder by default, the embedded decoder for `smollm2`, else the directory's config."""
    from softprompt.io.load import ENCODER_ALIASES

    if base is None or base in ENCODER_ALIASES:
        return True
    if base in DECODER_ALIASES:
        return False
    import json
    import types
    from pathlib import Path

    from softprompt.families.encoder import is_encoder_config

    try:
        raw = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # not a readable directory: the loader names the problem
    return is_encoder_config(types.SimpleNamespace(**raw))


def build_classifier(model, tokenizer, encoder: bool, method: str, labels: list[str], prompt_cfg=None, *,
                     template: str = "{text}", pooling: str | None = None, label_words: list[str] | None = None):
    """A fresh classifier; `prompt_cfg`: the method's config (None: its defaults). Encoder deep prompts
    start from the encoder's own K/V over `init_text` (init "text", the default) or N(0, 1) (init
    "random", PEFT's default)."""
    from dataclasses import replace

    from softprompt import methods
    from softprompt.classify.model import HEAD_ONLY, EncoderClassifier, VerbalizerClassifier
    from softprompt.core.defaults import INIT_TEXT
    from softprompt.core.geometry import geometry
    from softprompt.runs.config import HEAD_ONLY_ALIASES

    from softprompt.runs.config import ClassifyConfig

    seed = 0 if prompt_cfg is None else prompt_cfg.seed
    pooling = pooling or ClassifyConfig.pooling
    if method in HEAD_ONLY_ALIASES:
        method = HEAD_ONLY
        if not encoder:
            raise ValueError("head_only needs an encoder (a decoder classifies through label words, with a prompt)")
        prompt = None
    else:
        name = methods.canonical(method)
        cfg = prompt_cfg if prompt_cfg is not None else methods.CONFIGS[name]()
        if encoder and isinstance(cfg, methods.PrefixTuningConfig):  # the encoder's own K/V, not a decoder's
            prompt = _encoder_prefix(model, tokenizer, cfg, INIT_TEXT)
        else:
            if getattr(cfg, "init", "") is None:  # the config picks, knowing the base is an encoder
                cfg = replace(cfg, init=cfg.default_init(tokenizer is not None, encoder=encoder))
            prompt = methods.create(name, model, tokenizer, **_options(cfg))
    if encoder:
        clf = EncoderClassifier(prompt, geometry(model).hidden_size, labels, pooling, template, seed=seed)
    else:
        words = label_words or labels
        clf = VerbalizerClassifier(prompt, labels, words, VerbalizerClassifier.label_tokens(tokenizer, template, words),
                                   template)
    return clf.to(next(model.parameters()).device)


def _options(cfg) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if v is not None}


def _encoder_prefix(model, tokenizer, cfg, init_text: str):
    from softprompt.families.encoder import text_prefix
    from softprompt.methods import PrefixTuning, PrefixTuningConfig

    init = cfg.init or "text"
    prompt = PrefixTuning.create(model, None, PrefixTuningConfig(
        num_virtual_tokens=cfg.num_virtual_tokens, projection_dim=cfg.projection_dim, init="random", seed=cfg.seed))
    if init == "text":  # the same as PrefixTuning's own text init, with the encoder's K/V
        kv = text_prefix(model, tokenizer, cfg.init_text or init_text, cfg.num_virtual_tokens)
        with __import__("torch").no_grad():
            if cfg.projection_dim:
                prompt.base.copy_(kv)
                prompt.transform[2].weight.zero_()
                prompt.transform[2].bias.zero_()
            else:
                prompt.prefix.copy_(kv)
        prompt._config.update(init="text", init_text=cfg.init_text or init_text)
    return prompt


class ClassifyTask:
    """`softprompt train --task classify`, for runs/train.py's run_train: an encoder gets a head, a
    decoder label words; the loop optimizes the classification loss and picks the best by accuracy or F1."""

    def load(self, cfg, dist):
        model, tokenizer, self.encoder = load_classification_base(cfg.model.base)
        return model, tokenizer

    def data(self, cfg, model, tokenizer, rows=None, eval_rows=None):
        import random as _random

        from softprompt.classify.data import parse_labels, read_classification, tokenize_classification
        from softprompt.classify.objective import ClassificationObjective
        from softprompt.loops.data import BadRows
        from softprompt.runs.train import Prepared

        if rows is not None or eval_rows is not None:
            raise ValueError("classification reads its data from files (DATA, --eval-data)")
        if not hasattr(self, "encoder"):
            from softprompt.families.encoder import is_encoder_config

            self.encoder = is_encoder_config(model.config)
        d, encoder, labels = cfg.data, self.encoder, parse_labels(list(cfg.classify.labels))
        bad = BadRows()
        train_ex, tmpl = read_classification(cfg.train_data, labels, d.template, d.target, d.max_rows, d.skip_bad_rows,
                                             bad)
        if not encoder and d.template is None:  # a bare text gives a decoder no cue where the answer goes
            tmpl += DEFAULT_DECODER_SUFFIX
            train_ex = [type(e)(e.prompt + DEFAULT_DECODER_SUFFIX, e.target, e.where) for e in train_ex]
        eval_ex = None
        if cfg.eval_data:
            eval_ex, _ = read_classification(cfg.eval_data, labels, tmpl, d.target, 0, d.skip_bad_rows, bad)
        elif cfg.eval_fraction > 0:
            idx = list(range(len(train_ex)))
            _random.Random(cfg.train.seed).shuffle(idx)
            held = set(idx[:max(1, round(len(idx) * cfg.eval_fraction))])
            eval_ex = [train_ex[i] for i in sorted(held)]
            train_ex = [e for i, e in enumerate(train_ex) if i not in held]
        tok = lambda exs: tokenize_classification(exs, tokenizer, encoder, d.max_length, d.skip_bad_rows, bad)  # noqa: E731
        train_tok, eval_tok = tok(train_ex), (tok(eval_ex) if eval_ex else None)
        self.template, self.labels = tmpl, labels
        return Prepared(train_tok, eval_tok, None, ClassificationObjective(), {"bad_rows": bad.count, "classify_template": tmpl},
                        f"data: {len(train_tok)} training rows, {len(eval_tok) if eval_tok else 0} held-out rows; "
                        f"{bad.report()}")

    def prompt(self, cfg, model, tokenizer, prepared):
        from softprompt.core.defaults import HEAD_LR

        words = list(cfg.classify.label_words) if cfg.classify.label_words else None
        clf = build_classifier(model, tokenizer, self.encoder, cfg.method, self.labels, cfg.prompt,
                               template=self.template, pooling=cfg.classify.pooling, label_words=words)
        if self.encoder:
            clf.head_lr = HEAD_LR
        return clf

    def lr(self, cfg, prompt) -> float:
        from softprompt.core.defaults import CLASSIFY_LR

        if cfg.prompt is None:
            return CLASSIFY_LR[prompt.method]
        return cfg.prompt.default_lr("classify", encoder=self.encoder)

    def metric(self, cfg, prepared) -> str:
        return cfg.train.metric if prepared.eval is not None else "eval_loss"


def run_eval_classify(cfg, model=None, tokenizer=None):
    """Accuracy and macro-F1 of a classifier artifact (`cfg.adapter`) on labelled data, per `cfg` (an
    EvalConfig: its data's target is the label column, max_inputs the rows read); returns the metrics."""
    from softprompt.classify.data import read_classification, tokenize_classification
    from softprompt.classify.objective import accuracy_f1, predict
    from softprompt.io.classifier import load_classifier, read_classifier_card
    from softprompt.loops.data import BadRows
    from softprompt.runs.train import report_eval

    if not cfg.eval_data:
        raise ValueError("--data PATH is required")
    card = read_classifier_card(cfg.adapter)
    spec = card.get("classifier") or {}
    d, base = cfg.rows, cfg.model.base
    if model is None:
        name = (card.get("base_model") or {}).get("name") or ""
        if base is None:  # the base the card names: an embedded model, or a directory that still exists
            base = ("minilm" if spec.get("kind") == "head" else "smollm2") if not Path(name).is_dir() else name
        model, tokenizer, _ = load_classification_base(base)
    clf = load_classifier(cfg.adapter, model, allow_other_base=cfg.allow_other_base)
    bad = BadRows()
    # The card's template names the training file's text column; other data may name it otherwise.
    tmpl = d.template or clf.template
    read = lambda t: read_classification(cfg.eval_data, clf.labels, t, d.target, cfg.max_inputs,  # noqa: E731
                                         d.skip_bad_rows, bad)[0]
    try:
        exs = read(tmpl)
    except ValueError:
        if d.template is not None:
            raise
        from softprompt.classify.data import default_text_field

        field = default_text_field(cfg.eval_data)
        import string

        old = next(f for _, f, _, _ in string.Formatter().parse(tmpl) if f)
        exs = read(tmpl.replace("{" + old + "}", "{" + field + "}"))
    tok = tokenize_classification(exs, tokenizer, clf.kind == "head", None, d.skip_bad_rows, bad)
    t0 = time.perf_counter()
    probs = predict(clf, model, tok, cfg.batch_size, tokenizer.pad_token_id or 0)
    preds = probs.argmax(-1).tolist()
    res = accuracy_f1(preds, tok.labels, len(clf.labels))
    res["seconds"] = time.perf_counter() - t0
    rows = ({"text": ex.prompt, "label": clf.labels[int(ex.target)], "prediction": clf.labels[p],
             "probabilities": dict(zip(clf.labels, pr))} for ex, p, pr in zip(tok.examples, preds, probs.tolist()))
    return report_eval(cfg, res, rows, bad,
                       f"{res['n']} rows, {len(clf.labels)} classes ({', '.join(clf.labels)}): accuracy "
                       f"{res['accuracy']:.2f}%  macro-F1 {res['f1']:.2f}  ({res['seconds']:.0f} s)")


def is_classifier_path(adapter) -> bool:
    from softprompt.io.artifact import ArtifactError
    from softprompt.io.classifier import is_classifier_card, read_classifier_card

    try:
        return is_classifier_card(read_classifier_card(adapter))
    except (ArtifactError, OSError):
        return False  # not ours (a PEFT directory) or damaged: the generation path reports it
