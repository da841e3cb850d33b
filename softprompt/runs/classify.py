"""The jobs behind `softprompt train --task classify` and `softprompt eval` of a classifier.

The base model decides the kind: an encoder (the default for classification: the embedded
all-MiniLM-L6-v2, `--base minilm`) gets a head; a causal LM (`--base smollm2` for the embedded
SmolLM2, or a path) gets label words. Methods: prefix_tuning (deep prompt), prompt_tuning,
p_tuning, and head_only (encoder: the linear probe).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DECODER_ALIASES = ("smollm2", "SmolLM2-135M-Instruct")
# Measured on SST-2 (bench/quality_sst2.py): the head and the deep prompt train at the same rate.
DEFAULT_LR = {"head_only": 1e-2, "prefix_tuning": 1e-2, "prefix_tuning_mlp": 1e-3, "prompt_tuning": 3e-2,
              "p_tuning": 1e-3}
HEAD_LR = 1e-2  # the head's own rate in every encoder run (the linear probe's best), whatever the prompt's lr
DEFAULT_DECODER_SUFFIX = "\nAnswer:"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def default_lr(method: str, projection_dim: int, encoder: bool = True) -> float:
    if not encoder and method == "prefix_tuning":  # label words: 1e-3 (generation's rate) collapsed to one class
        return 1e-4
    if method == "prefix_tuning" and projection_dim:
        return DEFAULT_LR["prefix_tuning_mlp"]
    return DEFAULT_LR[method]


def build_classifier(model, tokenizer, encoder: bool, method: str, labels: list[str], *, template: str = "{text}",
                     num_virtual_tokens: int = 20, init: str | None = None, init_text: str | None = None,
                     projection_dim: int = 0, pooling: str = "mean", label_words: list[str] | None = None,
                     seed: int = 0):
    """A fresh classifier. Encoder deep prompts start from the encoder's own K/V over `init_text`
    (init "text", the default) or N(0, 1) (init "random", PEFT's default)."""
    from softprompt import methods
    from softprompt.classify.model import HEAD_ONLY, EncoderClassifier, VerbalizerClassifier
    from softprompt.core.geometry import geometry
    from softprompt.runs.train import DEFAULT_INIT_TEXT, method_options

    method = method.replace("-", "_")
    if method in (HEAD_ONLY, "head", "linear_probe"):
        method = HEAD_ONLY
        if not encoder:
            raise ValueError("head_only needs an encoder (a decoder classifies through label words, with a prompt)")
        prompt = None
    elif encoder and methods.canonical(method) == "prefix_tuning":
        from softprompt.families.encoder import text_prefix
        from softprompt.methods import PrefixTuning

        init = init or "text"
        if init not in ("text", "random"):
            raise ValueError(f"prefix tuning init must be text or random, got {init!r}")
        prompt = PrefixTuning.create(model, None, methods.PrefixTuningConfig(
            num_virtual_tokens=num_virtual_tokens, projection_dim=projection_dim, init="random", seed=seed))
        if init == "text":  # the same as PrefixTuning's own text init, with the encoder's K/V
            kv = text_prefix(model, tokenizer, init_text or DEFAULT_INIT_TEXT, num_virtual_tokens)
            with __import__("torch").no_grad():
                if projection_dim:
                    prompt.base.copy_(kv)
                    prompt.transform[2].weight.zero_()
                    prompt.transform[2].bias.zero_()
                else:
                    prompt.prefix.copy_(kv)
            prompt._config.update(init="text", init_text=init_text or DEFAULT_INIT_TEXT)
    else:
        name = methods.canonical(method)
        if encoder and name == "prompt_tuning" and init is None:
            init = "vocab"
        prompt = methods.create(name, model, tokenizer,
                                **method_options(name, num_virtual_tokens, init, init_text, projection_dim, seed))
    if encoder:
        clf = EncoderClassifier(prompt, geometry(model).hidden_size, labels, pooling, template, seed=seed)
    else:
        words = label_words or labels
        clf = VerbalizerClassifier(prompt, labels, words, VerbalizerClassifier.label_tokens(tokenizer, template, words),
                                   template)
    return clf.to(next(model.parameters()).device)


def run_train_classify(data, out, labels, method="prefix_tuning", base=None, template=None, label_field=None,
                       label_words=None, pooling="mean", eval_data=None, eval_fraction=0.0, num_virtual_tokens=20,
                       init=None, init_text=None, projection_dim=None, steps=200, batch_size=8, micro_batch_size=0,
                       lr=None, weight_decay=0.0, warmup_steps=0, schedule="linear", max_grad_norm=1.0, seed=0,
                       eval_every=0, metric="accuracy", patience=0, checkpoint_every=50, keep_checkpoints=2,
                       resume=False, max_length=256, max_rows=0, skip_bad_rows=False, progress=True, model=None,
                       tokenizer=None, encoder=None):
    """Train a classifier and save it (OUT/best, OUT/last); returns the TrainResult."""
    import random as _random

    from softprompt.classify.data import parse_labels, read_classification, tokenize_classification
    from softprompt.classify.objective import ClassificationObjective
    from softprompt.io.artifact import save_artifact
    from softprompt.loops.data import BadRows
    from softprompt.loops.train import TrainConfig, Trainer

    labels = parse_labels(labels)
    words = parse_labels(label_words) if label_words else None
    if words is not None and len(words) != len(labels):
        raise ValueError(f"--label-words needs one word per label ({len(labels)}), got {len(words)}")
    if model is None:
        model, tokenizer, encoder = load_classification_base(base)
    elif encoder is None:
        from softprompt.families.encoder import is_encoder_config

        encoder = is_encoder_config(model.config)
    bad = BadRows()
    train_ex, tmpl = read_classification(data, labels, template, label_field, max_rows, skip_bad_rows, bad)
    if not encoder and template is None:  # a bare text gives a decoder no cue where the answer goes
        tmpl += DEFAULT_DECODER_SUFFIX
        train_ex = [type(e)(e.prompt + DEFAULT_DECODER_SUFFIX, e.target, e.where) for e in train_ex]
    eval_ex = None
    if eval_data:
        eval_ex, _ = read_classification(eval_data, labels, tmpl, label_field, 0, skip_bad_rows, bad)
    elif eval_fraction > 0:
        idx = list(range(len(train_ex)))
        _random.Random(seed).shuffle(idx)
        n = max(1, round(len(idx) * eval_fraction))
        held = set(idx[:n])
        eval_ex = [train_ex[i] for i in sorted(held)]
        train_ex = [e for i, e in enumerate(train_ex) if i not in held]
    train_tok = tokenize_classification(train_ex, tokenizer, encoder, max_length, skip_bad_rows, bad)
    eval_tok = tokenize_classification(eval_ex, tokenizer, encoder, max_length, skip_bad_rows, bad) if eval_ex else None
    _say(f"data: {len(train_tok)} training rows, {len(eval_tok) if eval_tok else 0} held-out rows; {bad.report()}")
    if projection_dim is None:  # what bench/quality_sst2.py measured: a direct deep prompt on an encoder
        projection_dim = 0 if encoder else 512
    clf = build_classifier(model, tokenizer, encoder, method, labels, template=tmpl,
                           num_virtual_tokens=num_virtual_tokens, init=init, init_text=init_text,
                           projection_dim=projection_dim, pooling=pooling, label_words=words, seed=seed)
    lr = lr if lr is not None else default_lr(clf.method, projection_dim, encoder)
    if encoder:
        clf.head_lr = HEAD_LR
    metric = metric if eval_tok is not None else "eval_loss"
    cfg = TrainConfig(steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
                      max_grad_norm=max_grad_norm, seed=seed, eval_every=eval_every, metric=metric, patience=patience,
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
    out = Path(out)
    if out.exists() and not resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise ValueError(f"{out} holds an earlier run; pass --resume to continue it, or choose a new --out")
    trainer = Trainer(model, tokenizer, clf, train_tok, cfg, out=out, save=save_artifact, eval_data=eval_tok, progress=progress,
                      card={"dataset": str(data)}, objective=ClassificationObjective())
    if resume and trainer.resume():
        _say(f"resumed from step {trainer.step}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({
        "task": "classify", "method": clf.method, "kind": clf.kind, "labels": labels, "label_words": words,
        "template": tmpl, "pooling": pooling, "num_virtual_tokens": num_virtual_tokens, "init": init,
        "projection_dim": projection_dim, "train": cfg.__dict__, "data_path": str(data), "eval_data": eval_data,
        "bad_rows": bad.count}, indent=2, default=str))
    t0 = time.perf_counter()
    result = trainer.run()
    best = ", ".join(f"{k}={v:.4g}" for k, v in (result.best or {}).items() if isinstance(v, float))
    _say(f"done: {result.step} steps in {time.perf_counter() - t0:.0f} s ({result.stopped}); last train loss "
         f"{result.train_loss:.4f}{'; best ' + best if best else ''}\nartifact: {out / 'best'}")
    return result


def run_eval_classify(adapter, data, base=None, template=None, label_field=None, batch_size=32, max_rows=0,
                      skip_bad_rows=False, predictions=None, allow_other_base=False, json=False, max_length=512,
                      model=None, tokenizer=None):
    """Accuracy and macro-F1 of a classifier artifact on labelled data; returns the metrics dict."""
    import json as jsonlib

    from softprompt.classify.data import read_classification, tokenize_classification
    from softprompt.classify.objective import accuracy_f1, predict
    from softprompt.io.classifier import load_classifier, read_classifier_card
    from softprompt.loops.data import BadRows

    card = read_classifier_card(adapter)
    spec = card.get("classifier") or {}
    if model is None:
        name = (card.get("base_model") or {}).get("name") or ""
        if base is None:  # the base the card names: an embedded model, or a directory that still exists
            base = ("minilm" if spec.get("kind") == "head" else "smollm2") if not Path(name).is_dir() else name
        model, tokenizer, _ = load_classification_base(base)
    clf = load_classifier(adapter, model, allow_other_base=allow_other_base)
    bad = BadRows()
    # The card's template names the training file's text column; other data may name it otherwise.
    tmpl = template or clf.template
    try:
        exs, _ = read_classification(data, clf.labels, tmpl, label_field, max_rows, skip_bad_rows, bad)
    except ValueError:
        if template is not None:
            raise
        from softprompt.classify.data import default_text_field

        field = default_text_field(data)
        import string

        old = next(f for _, f, _, _ in string.Formatter().parse(tmpl) if f)
        exs, _ = read_classification(data, clf.labels, tmpl.replace("{" + old + "}", "{" + field + "}"), label_field,
                                     max_rows, skip_bad_rows, bad)
    tok = tokenize_classification(exs, tokenizer, clf.kind == "head", max_length, skip_bad_rows, bad)
    t0 = time.perf_counter()
    probs = predict(clf, model, tok, batch_size, tokenizer.pad_token_id or 0)
    preds = probs.argmax(-1).tolist()
    res = accuracy_f1(preds, tok.labels, len(clf.labels))
    res["seconds"] = time.perf_counter() - t0
    if predictions:
        with open(predictions, "w") as f:
            for ex, p, pr in zip(tok.examples, preds, probs.tolist()):
                f.write(jsonlib.dumps({"text": ex.prompt, "label": clf.labels[int(ex.target)],
                                       "prediction": clf.labels[p],
                                       "probabilities": dict(zip(clf.labels, pr))}) + "\n")
    if bad.count:
        _say(bad.report())
    if json:
        print(jsonlib.dumps(res, indent=2))
    else:
        print(f"{res['n']} rows, {len(clf.labels)} classes ({', '.join(clf.labels)}): accuracy {res['accuracy']:.2f}%  "
              f"macro-F1 {res['f1']:.2f}  ({res['seconds']:.0f} s)")
    return res


def is_classifier_path(adapter) -> bool:
    from softprompt.io.artifact import ArtifactError
    from softprompt.io.classifier import is_classifier_card, read_classifier_card

    try:
        return is_classifier_card(read_classifier_card(adapter))
    except (ArtifactError, OSError):
        return False  # not ours (a PEFT directory) or damaged: the generation path reports it


def train_from_cli(a: dict):
    """`softprompt train --task classify`: the generation flags mapped onto the classification job."""
    if a["task"] != "classify":
        raise ValueError(f"--task must be generate or classify, got {a['task']!r}")
    if not a["labels"]:
        raise ValueError("--task classify needs --labels (e.g. --labels negative,positive)")
    for flag in ("lora", "chat_template", "eval_generate", "gradient_checkpointing", "report_to"):
        if a.get(flag):
            raise ValueError(f"--{flag.replace('_', '-')} is not supported with --task classify")
    metric = "accuracy" if a["metric"] == "eval_loss" else a["metric"]
    if metric not in ("accuracy", "f1"):
        raise ValueError(f"--task classify picks the best by accuracy or f1, not {metric}")
    return run_train_classify(
        a["data"], a["out"], a["labels"], method=a["method"], base=a["base"], template=a["template"],
        label_field=a["target"], label_words=a["label_words"], pooling=a["pooling"], eval_data=a["eval_data"],
        eval_fraction=a["eval_fraction"], num_virtual_tokens=a["num_virtual_tokens"], init=a["init"],
        init_text=a["init_text"], projection_dim=a["projection_dim"], steps=a["steps"], batch_size=a["batch_size"],
        micro_batch_size=a["micro_batch_size"], lr=a["lr"], weight_decay=a["weight_decay"],
        warmup_steps=a["warmup_steps"], schedule=a["schedule"], max_grad_norm=a["max_grad_norm"], seed=a["seed"],
        eval_every=a["eval_every"], metric=metric, patience=a["patience"], checkpoint_every=a["checkpoint_every"],
        keep_checkpoints=a["keep_checkpoints"], resume=a["resume"], max_length=a["max_length"],
        max_rows=a["max_rows"], skip_bad_rows=a["skip_bad_rows"], progress=a["progress"])


def eval_from_cli(a: dict):
    if not a.get("data"):
        raise ValueError("--data PATH is required")
    return run_eval_classify(a["adapter"], a["data"], base=a["base"], template=a["template"], label_field=a["target"],
                             batch_size=a["batch_size"], max_rows=a["max_inputs"], skip_bad_rows=a["skip_bad_rows"],
                             predictions=a["predictions"], allow_other_base=a["allow_other_base"], json=a["json"])
