"""softprompt: prompt tuning, prefix tuning and P-tuning on a frozen language model.

    softprompt info [--base PATH] [--json]
    softprompt init OUT [--method prompt_tuning] [--init text --text "..."]
    softprompt generate "prompt" [--adapter DIR] [--max-new-tokens N] [--chat]
    softprompt export-peft ADAPTER OUT
    softprompt train DATA OUT [--method prefix_tuning] [--template "{mr} ||" --target ref] [--resume]
    softprompt eval --adapter DIR --data PATH [--num-beams 4]
    softprompt demo
    softprompt store add|ls|show|rm|export|import|gc|verify ...  [--store DIR]
"""

from __future__ import annotations

import argparse
import inspect
import json as jsonlib
import os
import sys
import types
import typing

# How this file works: a `{name: function}` map; flags come from each function's typed signature
# and its docstring's `Args:` section; a parameter without a default is positional; a
# `{name: function}` dict in the map is a command group (`softprompt store add ...`). Nothing heavy
# is imported before a command runs, so `--help` answers at once.

# Options whose values are a fixed set: listed in --help and checked by argparse. The library's own
# constants are the source; tests/test_cli_help.py checks that these agree with them.
CHOICES = {
    "method": ("prefix_tuning", "prompt_tuning", "p_tuning", "prefix", "prompt", "ptuning", "p-tuning"),
    "schedule": ("linear", "cosine", "constant"),
    "task": ("generate", "classify"),
    "pooling": ("mean", "cls"),
}

# -------------------------------------------------------------------------------------------
# Commands


def info(base: str | None = None, num_virtual_tokens: int = 20, projection_dim: int = 512, json: bool = False):
    """Show the base model's geometry and, per method, trainable parameters and artifact size.

    Args:
        base: a local HuggingFace model directory (default: the embedded SmolLM2-135M-Instruct)
        num_virtual_tokens: prompt length P used for the size figures
        projection_dim: width of prefix tuning's reparameterization MLP
        json: print JSON instead of a table
    """
    from softprompt import methods
    from softprompt.core.geometry import geometry, model_fingerprint
    from softprompt.core.int8_kernels import describe

    model, _ = _load(base)
    geo = geometry(model)
    rows = [
        methods.create("prompt_tuning", model, num_virtual_tokens=num_virtual_tokens).sizes(model),
        methods.create("prefix_tuning", model, num_virtual_tokens=num_virtual_tokens,
                       projection_dim=projection_dim).sizes(model) | {"variant": f"MLP {projection_dim} (training)"},
        methods.create("prefix_tuning", model, num_virtual_tokens=num_virtual_tokens,
                       projection_dim=0).sizes(model) | {"variant": "direct"},
        methods.create("p_tuning", model, num_virtual_tokens=num_virtual_tokens).sizes(model) | {"variant": "MLP"},
    ]
    report = {"base_model": getattr(model, "name_or_path", base), "fingerprint": model_fingerprint(model),
              "parameters": sum(p.numel() for p in model.parameters()), "geometry": geo.to_dict(),
              "kv_prefix_bytes_per_token": geo.num_layers * 2 * geo.kv_dim * 4, "methods": rows,
              "precision": getattr(model, "softprompt_quantize", None) or str(next(model.parameters()).dtype)[6:],
              "machine": describe()}
    if json:
        print(jsonlib.dumps(report, indent=2))
        return
    print(f"base model   {report['base_model']}  ({report['parameters']:,} parameters)")
    print(f"fingerprint  {report['fingerprint']}")
    print(f"geometry     {geo.model_type}: {geo.num_layers} layers, {geo.num_attention_heads} query heads, "
          f"{geo.num_key_value_heads} KV heads x {geo.head_dim}, hidden {geo.hidden_size}, vocab {geo.vocab_size}")
    print(f"precision    {report['precision']}")
    print(f"machine      {report['machine']}")
    print(f"KV prefix    {report['kv_prefix_bytes_per_token']:,} bytes per virtual token (float32)\n")
    print(f"{'method':<15}{'variant':<28}{'P':>4}{'trainable':>14}{'artifact bytes':>16}")
    for r in rows:
        print(f"{r['method']:<15}{r.get('variant', ''):<28}{r['num_virtual_tokens']:>4}"
              f"{r['trainable_parameters']:>14,}{r['artifact_bytes']:>16,}")


def _refuse_existing(path: str, overwrite: bool, what: str = "artifact") -> None:
    """No command replaces what is at its destination unless told to (--overwrite); checked before
    the model loads, so a refusal is immediate."""
    if not overwrite and (os.path.exists(path) or os.path.islink(path)):
        raise ValueError(f"{path} already exists; pass --overwrite to replace the {what}, or choose a new path")


def init(out: str, method: str = "prompt_tuning", num_virtual_tokens: int = 20, init: str | None = None,
         text: str | None = None, projection_dim: int = 512, seed: int = 0, base: str | None = None,
         overwrite: bool = False):
    """Create a freshly initialized (untrained) prompt and save it as an artifact.

    Args:
        out: artifact path: a directory, or a file ending in .safetensors
        method: prompt_tuning, prefix_tuning or p_tuning
        num_virtual_tokens: prompt length P
        init: prompt tuning: random, vocab, text or tokens; prefix tuning: random or text
        text: the string for init=text
        projection_dim: prefix tuning's MLP width (0: direct)
        seed: random seed for the initialization
        base: a local HuggingFace model directory (default: the embedded model)
        overwrite: replace an existing artifact at OUT (refused by default)
    """
    from softprompt import methods
    from softprompt.io.artifact import save_artifact

    _refuse_existing(out, overwrite)
    model, tok = _load(base)
    name = methods.canonical(method)
    opts: dict = {"num_virtual_tokens": num_virtual_tokens, "seed": seed}
    if init is not None:
        opts["init"] = init
    elif text is not None and name != "p_tuning":
        opts["init"] = "text"
    if text is not None:
        opts["init_text"] = text
    if name == "prefix_tuning":
        opts["projection_dim"] = projection_dim
    prompt = methods.create(name, model, tok, **opts)
    path = save_artifact(prompt, out, model)
    sizes = prompt.sizes(model)
    print(f"saved {name} (P={num_virtual_tokens}, {sizes['artifact_bytes']:,} bytes) to {path}", file=sys.stderr)


def generate(prompt: str, adapter: str | None = None, base: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None, chat: bool = False, allow_other_base: bool = False,
             lora: str | None = None, merge_lora: bool = True):
    """Continue a prompt with an adapter (ours or a PEFT adapter directory) and print the continuation.

    Greedy by default, so the same input gives the same output. The prompt is used as given.

    Args:
        prompt: the text to continue
        adapter: artifact path (directory or .safetensors) or PEFT adapter directory; none: the bare model
        base: a local HuggingFace model directory (default: the embedded model)
        max_new_tokens: at most this many new tokens
        temperature: 0 is greedy; above 0 samples
        top_k: sample only among the k most likely tokens (0: all)
        top_p: sample only within this much probability mass (1: all)
        seed: seed for sampling
        stop: stop when the continuation contains this string (repeatable)
        chat: wrap the prompt in the base model's chat template as a user turn
        allow_other_base: load an artifact even if it was made for other base weights
        lora: a PEFT LoRA adapter directory (safetensors) applied to the base model first
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
    """
    from softprompt.families import family_of
    from softprompt.io.lora import load_prompt
    from softprompt.loops.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    model, tok = _load(base, lora, merge_lora)
    kv = None
    if adapter is not None:  # load_prompt: a refusal for the base also names the --lora flag that fits
        kv = load_prompt(adapter, model, lora, merge_lora, allow_other_base).to_kv_prefix(model)
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    print(family_of(model).generate(model, tok, [prompt], kv, params)[0])


def export_peft(adapter: str, out: str, base: str | None = None, overwrite: bool = False,
                base_model_name_or_path: str | None = None):
    """Export an artifact as a PEFT adapter directory (PeftModel.from_pretrained loads it).

    Args:
        adapter: our artifact (directory or .safetensors)
        out: the PEFT adapter directory to write
        base: a local HuggingFace model directory (default: the embedded model)
        overwrite: replace an existing PEFT adapter directory at OUT (refused by default)
        base_model_name_or_path: where PEFT's AutoPeftModel finds the base: a Hub id or a path (default: HuggingFaceTB/SmolLM2-135M-Instruct for the embedded model, else the absolute --base path)
    """
    from pathlib import Path

    from softprompt.io.artifact import load_artifact
    from softprompt.io.load import EMBEDDED_HUB_ID
    from softprompt.io.peft import export_peft as run

    _refuse_existing(out, overwrite, "PEFT adapter")
    model, _ = _load(base)
    # a name PEFT can load: the embedded model's Hub id, or the base's absolute path (a bare directory
    # name such as "SmolLM2-135M-Instruct" is neither, and AutoPeftModel could not find the base)
    where = base_model_name_or_path or (EMBEDDED_HUB_ID if base is None else str(Path(base).resolve()))
    path = run(load_artifact(adapter, model), out, model, base_model_name_or_path=where)
    print(f"wrote PEFT adapter to {path}", file=sys.stderr)


def train(data: str, out: str, method: str = "prefix_tuning", base: str | None = None, template: str | None = None,
          target: str | None = None, chat_template: bool = False, eval_data: str | None = None,
          eval_fraction: float = 0.0, num_virtual_tokens: int = 20, init: str | None = None,
          init_text: str | None = None, projection_dim: int | None = None, steps: int = 200, batch_size: int = 8,
          micro_batch_size: int = 0, lr: float | None = None, weight_decay: float = 0.0, warmup_steps: int = 0,
          schedule: str = "linear", max_grad_norm: float = 1.0, seed: int = 0, eval_every: int = 0,
          eval_generate: int = 0, metric: str = "eval_loss", patience: int = 0, checkpoint_every: int = 50,
          keep_checkpoints: int = 2, resume: bool = False, gradient_checkpointing: bool = False,
          max_length: int = 512, max_rows: int = 0, skip_bad_rows: bool = False, progress: bool = True,
          lora: str | None = None, merge_lora: bool = True, task: str = "generate", labels: str | None = None,
          label_words: str | None = None, pooling: str = "mean", overwrite: bool = False,
          report_to: list[str] | None = None):
    """Train a prompt on a dataset; writes OUT/best and OUT/last (artifacts), metrics.jsonl, plot.png, checkpoints/.

    Runs data-parallel unchanged under `torchrun --nproc-per-node N -m softprompt.cli train ...`
    (or `accelerate launch`); --batch-size is the global batch.

    Args:
        data: training data: .jsonl ({input,output} / {prompt,completion} / {messages}), .csv/.tsv, or hf:NAME[:SPLIT]
        out: run directory
        method: prompt_tuning, prefix_tuning or p_tuning
        base: a local HuggingFace model directory (default: the embedded model)
        template: prompt template over a row's fields, e.g. "{mr} ||" (CSV needs it)
        target: the target field (or a template with {field})
        chat_template: wrap each prompt in the base model's chat template as a user turn
        eval_data: held-out data in the same format (default: --eval-fraction of the training inputs)
        eval_fraction: hold out this fraction of the distinct training inputs for evaluation
        num_virtual_tokens: prompt length P
        init: prompt tuning: vocab, random, text, tokens; prefix tuning: text or random (default: the method's best, see README)
        init_text: the text for init=text (default: a generic task description)
        projection_dim: prefix tuning's reparameterization MLP width (0: optimize the prefix directly; default 512, and 0 for an encoder classifier)
        steps: optimizer steps
        batch_size: rows per optimizer step, over all processes
        micro_batch_size: rows per forward pass (gradient accumulation when smaller; 0: the whole batch)
        lr: peak learning rate (default: per method, see README)
        weight_decay: AdamW weight decay
        warmup_steps: linear warmup steps
        schedule: linear, cosine or constant decay after warmup
        max_grad_norm: clip the gradient norm to this (0: no clipping)
        seed: seed for initialization and data order
        eval_every: evaluate every N steps (0: at the end only)
        eval_generate: also generate for this many held-out inputs and score BLEU/ROUGE-L/exact match/accuracy
        metric: eval_loss, bleu, rouge_l, exact_match or accuracy: picks OUT/best and drives early stopping
        patience: stop after this many evaluations without improvement (0: never)
        checkpoint_every: write a checkpoint every N steps (0: never)
        keep_checkpoints: keep this many newest checkpoints
        resume: continue from the newest good checkpoint in OUT/checkpoints
        gradient_checkpointing: recompute activations in backward (less memory; works with prefix tuning)
        max_length: rows longer than this many tokens (prompt + target) are bad rows
        max_rows: read at most this many rows (0: all)
        skip_bad_rows: skip and count bad rows instead of stopping at the first
        progress: show a progress bar
        lora: train on top of this PEFT LoRA adapter (directory, safetensors); the artifact is then refused on the bare base
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
        task: generate, or classify (needs --labels; --template renders the text, --target names the label column; default base: the embedded encoder all-MiniLM-L6-v2 with a head; --base smollm2 or a decoder directory: label words; --method head_only: the linear probe)
        labels: classify: the class names, comma-separated (data labels are names or 0-based indices)
        label_words: classify on a decoder: the word the model predicts per class (default: the label names)
        pooling: classify on an encoder: mean or cls
        overwrite: start afresh in an OUT that already holds files: the earlier run's files are removed (refused by default; --resume continues it instead)
        report_to: experiment trackers: tensorboard, mlflow, wandb (repeat, or comma-separate); needs softprompt[tracking]
    """
    _prepare_run_dir(out, resume, overwrite)
    args = dict(locals())
    args.pop("overwrite")
    if task != "generate":
        from softprompt.runs.classify import train_from_cli

        return train_from_cli(args)
    for key in ("task", "labels", "label_words", "pooling"):
        args.pop(key)
    if args["projection_dim"] is None:
        args["projection_dim"] = 512
    from softprompt.runs.train import run_train

    if args.pop("lora") is not None:  # load the adapted model here; run_train then uses it
        args["model"], args["tokenizer"] = _load(base, lora, args.pop("merge_lora"))
    args.pop("merge_lora", None)

    run_train(**args)


RUN_FILES = ("best", "last", "checkpoints", "metrics.jsonl", "run.json", "plot.png")


def _prepare_run_dir(out: str, resume: bool, overwrite: bool) -> None:
    """A run directory that holds anything is refused unless --resume (continue it) or --overwrite
    (remove the earlier run's own files; other files are left alone)."""
    import shutil

    if resume or not os.path.isdir(out) or not os.listdir(out):
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{out} is a file; a training run needs a directory")
        return
    if not overwrite:
        raise ValueError(f"{out} already holds files; pass --resume to continue its run, --overwrite to start "
                         "afresh there (the earlier run's artifacts are removed), or choose a new OUT")
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def eval(adapter: str | None = None, data: str | None = None, base: str | None = None, template: str | None = None,
         target: str | None = None, chat_template: bool = False, max_new_tokens: int = 64, num_beams: int = 1,
         batch_size: int = 16, max_inputs: int = 0, skip_bad_rows: bool = False, predictions: str | None = None,
         allow_other_base: bool = False, json: bool = False, lora: str | None = None, merge_lora: bool = True):
    """Score an adapter on a dataset: BLEU, ROUGE-L, exact match, accuracy (references grouped per input).

    Args:
        adapter: artifact path or PEFT adapter directory (omit: the bare model)
        data: evaluation data (required; same formats as train)
        base: a local HuggingFace model directory (default: the embedded model)
        template: prompt template over a row's fields, e.g. "{mr} ||"
        target: the reference field
        chat_template: wrap each prompt in the base model's chat template
        max_new_tokens: at most this many new tokens per output
        num_beams: 1: greedy; more: beam search
        batch_size: inputs per generation batch (greedy)
        max_inputs: score only the first N distinct inputs (0: all)
        skip_bad_rows: skip and count bad rows instead of stopping
        predictions: write one JSON line per input (prompt, output, references) here
        allow_other_base: load an artifact even if it was made for other base weights
        json: print the metrics as JSON
        lora: a PEFT LoRA adapter directory (safetensors) applied to the base first, for prompts trained with --lora
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
    """
    args = dict(locals())
    if adapter and adapter != "none":
        from softprompt.runs.classify import eval_from_cli, is_classifier_path

        if is_classifier_path(adapter):  # a classifier: accuracy and macro-F1 instead of generation scores
            return eval_from_cli(args)
    from softprompt.runs.train import run_eval

    run_eval(**args)


def demo(out: str = "out/demo", steps: int = 30, base: str | None = None, method: str = "prefix_tuning",
         seed: int = 0):
    """Train a prompt on the bundled demo task (records -> one-line weather reports), show outputs before and after.

    Args:
        out: run directory (artifact in OUT/best, plot in OUT/plot.png)
        steps: training steps
        base: a local HuggingFace model directory (default: the embedded model)
        method: prompt_tuning, prefix_tuning or p_tuning
        seed: random seed
    """
    from softprompt.runs.demo import run_demo

    run_demo(out=out, steps=steps, base=base, method=method, seed=seed)


# -------------------------------------------------------------------------------------------
# The prompt store: `softprompt store SUBCOMMAND` (a dict in COMMANDS becomes nested subcommands)


def _store(path):
    from softprompt.store.core import Store

    return Store(path)


def _metrics(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metric {item!r}: write KEY=VALUE, e.g. --metric bleu=52.1")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _model_for(src, base):
    """The base model, loaded only when a PEFT adapter directory has to be converted or `--base` names
    it (then the store also compiles the task's serving form for it at once)."""
    from softprompt.io.peft import is_peft_dir

    return _load(base)[0] if is_peft_dir(src) or base is not None else None


def store_add(name: str, artifact: str, tag: list[str] | None = None, metric: list[str] | None = None,
              base: str | None = None, store: str | None = None):
    """Add an artifact to the store as the next version of NAME.

    Args:
        name: task name (letters, digits, '.', '_', '-')
        artifact: our artifact (directory or .safetensors) or a PEFT adapter directory
        tag: a tag for the task (repeatable)
        metric: a metric KEY=VALUE recorded with the task (repeatable)
        base: base model for a PEFT adapter (default: the embedded model); given, the task is compiled for it
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    ref = _store(store).add(name, artifact, _model_for(artifact, base), tags=tag or (), metrics=_metrics(metric))
    print(ref)


def store_import(src: str, name: str | None = None, tag: list[str] | None = None, base: str | None = None,
                 store: str | None = None):
    """Import an artifact or a PEFT adapter directory into the store.

    Args:
        src: our artifact (directory or .safetensors) or a PEFT adapter directory
        name: task name (default: the file or directory name)
        tag: a tag for the task (repeatable)
        base: base model for converting a PEFT adapter (default: the embedded model)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    print(_store(store).import_(src, name, _model_for(src, base), tags=tag or ()))


def store_ls(tag: str | None = None, base_fingerprint: str | None = None, all_versions: bool = False,
             json: bool = False, store: str | None = None):
    """List the store's tasks (the latest version of each, unless --all-versions).

    Args:
        tag: only tasks with this tag
        base_fingerprint: only tasks for this base model (see `softprompt info`)
        all_versions: list every version, not only the latest
        json: print JSON
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    rows = _store(store).ls(tag=tag, base_fingerprint=base_fingerprint, all_versions=all_versions)
    if json:
        print(jsonlib.dumps(rows, indent=2))
        return
    print(f"{'task':<32}{'method':<15}{'P':>4}{'bytes':>10}  {'created':<21}tags")
    for r in rows:
        print(f"{r['name'] + '@' + str(r['version']):<32}{r['method']:<15}{r['num_virtual_tokens'] or 0:>4}"
              f"{r['size']:>10,}  {r['created']:<21}{','.join(r['tags'])}")


def store_show(ref: str, store: str | None = None):
    """Show a task's index row and card as JSON (REF: NAME for the latest, NAME@N for a version).

    Args:
        ref: NAME or NAME@VERSION
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    print(jsonlib.dumps(_store(store).show(ref), indent=2))


def store_rm(ref: str, store: str | None = None):
    """Remove a version (NAME@N) or every version of a task (NAME).

    Args:
        ref: NAME or NAME@VERSION
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    for r in _store(store).rm(ref):
        print(f"removed {r}")


def store_export(ref: str, dest: str, store: str | None = None, overwrite: bool = False):
    """Write a task out as an artifact (DEST ending in .safetensors: one file; otherwise a directory).

    Args:
        ref: NAME or NAME@VERSION
        dest: the artifact path to write (must not exist unless --overwrite)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
        overwrite: replace an existing artifact at DEST
    """
    print(_store(store).export(ref, dest, overwrite=overwrite))


def store_gc(store: str | None = None):
    """Remove files that no index row names (left by a writer killed mid-add) and dead temp files.

    Args:
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    removed = _store(store).gc()
    print(f"removed {len(removed)} orphan file(s)")


def store_verify(store: str | None = None):
    """Check every indexed file against its sha256; exit status 2 on any problem.

    Args:
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    from softprompt.store.core import StoreError

    problems = _store(store).verify()
    if problems:
        raise StoreError(f"{len(problems)} problem(s): " + "; ".join(problems))
    print("ok")


def store_compile(task: list[str] | None = None, base: str | None = None, store: str | None = None):
    """Compile tasks' serving form (the KV prefix) for a base model and keep it in the store, so their
    first serve is a file read, not a forward pass. Tasks published without a model are otherwise
    compiled on their first serve; tasks made for another base are skipped.

    Args:
        task: NAME or NAME@VERSION to compile (repeatable; default: the latest version of every task)
        base: the base model that will serve them (default: the embedded model)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    from softprompt.core.geometry import model_fingerprint
    from softprompt.io.artifact import ArtifactError

    s, model = _store(store), _load(base)[0]
    fp = model_fingerprint(model)
    for ref in task or [f"{r['name']}@{r['version']}" for r in s.ls()]:
        row = s.show(ref)
        if row["base_fingerprint"] != fp:
            print(f"skipped {ref}: made for another base model ({row['base_name']})")
            continue
        try:
            s.compile(ref, model)
        except ArtifactError as e:  # a classifier, or a prompt for another model family
            print(f"skipped {ref}: {e}")
            continue
        print(f"compiled {row['name']}@{row['version']}")


from softprompt.serve.main import serve  # noqa: E402  (its flags come from its signature, like every command)


def store_migrate(src: str, dst: str, objects: str | None = None):
    """Copy a store into another, every version with its number, dates, tags and sha256, and the
    compiled forms (e.g. a SQLite store into PostgreSQL: DST postgresql://USER@HOST/DB?objects=s3://B/P).
    Run again after an interruption, it copies what is missing.

    Args:
        src: the source store (a directory, or a postgresql:// DSN)
        dst: the destination store (a postgresql:// DSN, or a directory)
        objects: where DST keeps its bytes, if its DSN does not say (a shared directory or s3://bucket/prefix)
    """
    from softprompt.store.backends.migrate import migrate
    from softprompt.store.core import Store

    target = Store(dst, objects)
    n = migrate(_store(src), target)
    print(f"migrated {n['versions']} version(s) of {n['tasks']} task(s) and {n['compiled']} compiled form(s) "
          f"into {target.where} ({n['already_there']} already there)")


STORE_COMMANDS = {"add": store_add, "ls": store_ls, "show": store_show, "rm": store_rm, "export": store_export,
                  "import": store_import, "gc": store_gc, "verify": store_verify, "compile": store_compile,
                  "migrate": store_migrate}

COMMANDS = {"info": info, "init": init, "generate": generate, "export-peft": export_peft, "train": train,
            "eval": eval, "demo": demo, "store": STORE_COMMANDS, "serve": serve}


# -------------------------------------------------------------------------------------------
# Seeing inside: inspect, card


def inspect_(adapter: str, data: str | None = None, out: str | None = None, examples: int = 4, top_k: int = 5,
             base: str | None = None, lora: str | None = None, merge_lora: bool = True,
             allow_other_base: bool = False, json: bool = False):
    """Look inside an artifact: nearest vocabulary tokens and norms of virtual tokens (prompt/P-tuning),
    per-layer K/V norms, and with --data the share of attention real tokens give the prefix per layer and head.

    Writes OUT.json and OUT.png (a layer x head heatmap and the K/V norms); prints a summary.

    Args:
        adapter: artifact path (directory or .safetensors) or PEFT adapter directory
        data: a few rows of this dataset (same formats as train) measure the attention share
        out: output path stem (default: ADAPTER.inspect, giving ADAPTER.inspect.json and .png)
        examples: rows of --data to use
        top_k: nearest vocabulary tokens listed per virtual token
        base: a local HuggingFace model directory (default: the embedded model)
        lora: a PEFT LoRA adapter directory applied to the base first (for prompts trained on it)
        merge_lora: merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)
        allow_other_base: load an artifact even if it was made for other base weights
        json: print the JSON report instead of the summary
    """
    from softprompt.runs.inspect import run_inspect, summary

    model, tok = _load(base, lora, merge_lora)
    report, jpath, ppath = run_inspect(adapter, model, tok, data=data, out=out, examples=examples, top_k=top_k,
                                       allow_other_base=allow_other_base)
    print(jsonlib.dumps(report, indent=2) if json else summary(report))
    print(f"wrote {jpath} and {ppath}", file=sys.stderr)


def card(adapter: str, out: str | None = None):
    """Print (or write) an artifact's model card as markdown: base model and fingerprint, method and sizes,
    data, hyperparameters, metrics, date, library version.

    Args:
        adapter: artifact path (directory or .safetensors)
        out: write the markdown to this file instead of printing it
    """
    from softprompt.io.card import model_card

    text = model_card(adapter)
    if out is None:
        print(text)
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)


def compare(data: str | None = None, out: str = "out/compare", base: str | None = None, template: str | None = None,
            target: str | None = None, eval_data: str | None = None, eval_fraction: float = 0.2, steps: int = 50,
            batch_size: int = 8, num_virtual_tokens: int = 20, lora_r: int = 8, lora_lr: float = 1e-3, seed: int = 0,
            max_new_tokens: int = 16, tasks: int = 16, eval_inputs: int = 50, eval_max_new_tokens: int = 64,
            progress: bool = True):
    """Train prefix tuning, prompt tuning and LoRA (PEFT) on the same data and budget; report them side by side.

    Writes OUT/compare.json, OUT/compare.md (a markdown table) and OUT/compare.png, and prints the table.

    Args:
        data: training data (required; same formats as train)
        out: output directory
        base: a local HuggingFace model directory (default: the embedded model)
        template: prompt template over a row's fields
        target: the target field
        eval_data: held-out data (default: --eval-fraction of the training data)
        eval_fraction: held-out fraction when --eval-data is not given
        steps: optimizer steps for every method
        batch_size: rows per step for every method
        num_virtual_tokens: P for the prompt methods
        lora_r: LoRA rank (q_proj and v_proj)
        lora_lr: LoRA learning rate (the prompt methods use their defaults)
        seed: random seed
        max_new_tokens: tokens generated per row when measuring tokens/s
        tasks: rows (and distinct tasks, when mixed) in the tokens/s measurement
        eval_inputs: distinct held-out inputs scored (eval_loss over all their references; BLEU and ROUGE-L of greedy outputs); 0: all
        eval_max_new_tokens: at most this many new tokens per scored output
        progress: a progress bar (with ETA) for each method's training, and a line per stage
    """
    if data is None:
        raise ValueError("--data is required (training data; same formats as train)")
    args = dict(locals())
    from softprompt.runs.compare import run_compare

    model, tok = _load(base)
    report = run_compare(**args, model=model, tokenizer=tok)
    print(open(os.path.join(out, "compare.md")).read(), end="")
    print(f"wrote {out}/compare.json, compare.md and compare.png ({len(report['rows'])} methods)", file=sys.stderr)


COMMANDS.update({"inspect": inspect_, "card": card, "compare": compare})


# Where and how a command's model runs: every command that loads a model takes these flags; `main`
# applies them once (softprompt.core.device.set_defaults, set_threads), so every loader below it, also in
# the jobs that load their own model (train, eval, demo, classify), picks them up.
MODEL_FLAGS = {
    "device": (str, "auto", "auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps"),
    "dtype": (str, "float32", "the base model's precision: float32, bfloat16 or float16 (prompts stay float32)"),
    "quantize": (str, "none", "none, or int8: the base's Linear layers in int8 (CPU only; for serving and eval)"),
    "threads": (int, 0, "torch CPU threads (0: the cores not busy with other processes; see docs/devices.md)"),
}
LOADS_MODEL = {"info", "init", "generate", "export-peft", "train", "eval", "demo", "serve", "inspect", "compare",
               "store add", "store import"}


def _apply_model_flags(flags: dict) -> None:
    from softprompt.core.device import set_defaults, set_threads

    set_defaults(flags.get("device"), flags.get("dtype"), flags.get("quantize"))
    if "threads" in flags:
        set_threads(flags["threads"])


def _load(base, lora=None, merge_lora=True):
    from softprompt.io.load import load_base

    if base is None:
        print("loading the embedded SmolLM2-135M-Instruct ...", file=sys.stderr)
    if lora is not None:
        from softprompt.io.lora import load_base_with_lora

        return load_base_with_lora(base, lora, merge=merge_lora)
    return load_base(base)


# -------------------------------------------------------------------------------------------
# Signature -> argparse


def _doc_args(fn) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    head, _, rest = doc.partition("Args:")
    helps = {}
    for line in rest.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier():
            helps[name] = text.strip()
    return head.strip(), helps


def _base_type(tp):
    """(callable to convert a string, is_list) for an annotation like `int | None` or `list[str]`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (`softprompt train: error: ...`, exit 2); --help has the usage."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not when the help text already says it, nor when there is none (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False \
                or action.default == [] or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {action.default})" if text else f"(default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    from softprompt import __version__

    parser = _Parser(prog="softprompt", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        if isinstance(fn, dict):  # a command group: `softprompt store add ...`
            group = sub.add_parser(name, help=f"{name} commands: {', '.join(fn)}").add_subparsers(
                dest="_sub", required=True)
            for subname, subfn in fn.items():
                _add_command(group, subname, subfn, f"{name} {subname}")
        else:
            _add_command(sub, name, fn, name)
    return parser


def _add_command(sub, name: str, fn, full_name: str) -> None:
    summary, helps = _doc_args(fn)
    p = sub.add_parser(name, help=summary.splitlines()[0], description=summary, formatter_class=_HelpFormatter)
    p.add_argument("--config", dest="_config", metavar="FILE",
                   help="a YAML or JSON file of this command's options (names as in Python, e.g. num_virtual_tokens); "
                        "flags given on the command line override it")
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        tp, is_list = _base_type(hints[pname])
        h = helps.get(pname, "")
        if param.default is inspect.Parameter.empty:
            p.add_argument(pname, type=tp, help=h)
        elif tp is bool:
            p.add_argument(f"--{pname.replace('_', '-')}", dest=pname, action=argparse.BooleanOptionalAction,
                           default=param.default, help=h)
        elif is_list:
            p.add_argument(f"--{pname.replace('_', '-')}", dest=pname, type=tp, action="append",
                           default=param.default, help=h)
        else:
            p.add_argument(f"--{pname.replace('_', '-')}", dest=pname, type=tp, default=param.default, help=h,
                           choices=CHOICES.get(pname))
    if full_name in LOADS_MODEL:  # the shared model flags, unless the command has its own
        for flag, (tp, default, h) in MODEL_FLAGS.items():
            if flag not in inspect.signature(fn).parameters:
                p.add_argument(f"--{flag}", dest=flag, type=tp, default=default, help=h)
    p.set_defaults(_fn=fn, _name=full_name)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = vars(build_parser().parse_args(argv))
        if args.get("_config"):  # the file's values become the defaults, then the flags are read again
            args = vars(_with_config(argv, args))
    except SystemExit as e:  # --help, --version (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    except ValueError as e:
        return _fail(args["_name"], str(e))
    args.pop("_config", None)
    fn, name = args.pop("_fn"), args.pop("_name")
    args.pop("command")
    args.pop("_sub", None)
    flags = {k: args.pop(k) for k in MODEL_FLAGS if k in args and k not in inspect.signature(fn).parameters}
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from softprompt.core.geometry import BaseModelError
    from softprompt.io.artifact import ArtifactError
    from softprompt.io.peft import PeftFormatError

    try:
        _apply_model_flags(flags)
        fn(**args)
    except (ArtifactError, BaseModelError, PeftFormatError, ValueError) as e:
        return _fail(name, str(e))
    except OSError as e:  # a path that cannot be written or read: the OS's reason and the path
        where = f"{e.filename}: " if e.filename else ""
        return _fail(name, f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail(name, "interrupted", 130)
    except Exception as e:  # a bug: still one line (SOFTPROMPT_DEBUG=1 shows the traceback)
        if os.environ.get("SOFTPROMPT_DEBUG"):
            raise
        return _fail(name, f"internal error: {type(e).__name__}: {e} (set SOFTPROMPT_DEBUG=1 for the traceback)")
    return 0


def _with_config(argv, args: dict) -> argparse.Namespace:
    """Parse `argv` again with the options of `--config FILE` (YAML or JSON) as defaults: the same
    names and types as the flags (checked by the same parser), the command line overriding."""
    path, fn = args["_config"], args["_fn"]
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    try:
        if path.endswith(".json"):
            values = jsonlib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # a parse error names the line
        raise ValueError(f"--config {path} does not parse: {' '.join(str(e).split())}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values")
    known = inspect.signature(fn).parameters
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: no option {', '.join(map(repr, unknown))} for `softprompt {args['_name']}` "
                         f"(options: {', '.join(sorted(known))})")
    # Values go through argparse as strings, so the file gets the same conversions and choices as flags.
    flags = []
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            for v in value:
                flags += [flag, str(v)]
        elif known[key].default is inspect.Parameter.empty:
            raise ValueError(f"--config {path}: {key!r} is positional; give it on the command line")
        else:
            flags += [flag, str(value)]
    argv = list(sys.argv[1:] if argv is None else argv)
    words = args["_name"].split()  # the command (and group) words; what follows them comes last and wins
    return build_parser().parse_args(words + flags + argv[len(words):])


def _fail(name: str, message: str, status: int = 2) -> int:
    """One line on stderr and the exit status: the whole of what a failed command prints."""
    line = " ".join(message.split())  # messages that quote multi-line errors stay one line
    print(f"softprompt {name}: error: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
