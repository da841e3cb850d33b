"""softprompt: prompt tuning, prefix tuning and P-tuning on a frozen language model.

    softprompt info [--base PATH] [--json]
    softprompt init OUT [--method prompt_tuning] [--init text --text "..."]
    softprompt generate "prompt" [--adapter DIR] [--max-new-tokens N] [--chat]
    softprompt export-peft ADAPTER OUT
    softprompt train DATA OUT [--method prefix_tuning] [--template "{mr} ||" --target ref] [--resume]
    softprompt eval --adapter DIR --data PATH [--num-beams 4]
    softprompt demo
    softprompt inspect ADAPTER [--data PATH]      softprompt card ADAPTER
    softprompt audit TASK[@VERSION] | ARTIFACT [--inputs FILE] [--out DIR]
    softprompt compare --data PATH [--methods prefix_tuning,prompt_tuning,lora]
    softprompt serve [--store DIR]
    softprompt store add|ls|show|rm|export|import|gc|verify|compile|migrate|approve|revoke|keygen|history ...

Every command and option is documented in docs/cli.md (tests/test_docs_cli.py keeps the two equal).
"""

from __future__ import annotations

import argparse
import inspect
import json as jsonlib
import os
import sys
import types
import typing
from pathlib import Path

from softprompt.core.defaults import ModelConfig

# How this file works: a `{name: function}` map; flags come from each function's typed signature
# and its docstring's `Args:` section; a parameter without a default is positional; a
# `{name: function}` dict in the map is a command group (`softprompt store add ...`). A string in
# the map names a command whose flags come from a config dataclass instead (train, compare: the run's
# configs; serve, eval, generate: FLAT below), built with jsonargparse when that command runs. Nothing
# heavy is imported before a command runs, so `--help` answers at once.

# Options whose values are a fixed set: listed in --help and checked by argparse. The library's own
# constants are the source; tests/test_cli_help.py checks that these agree with them.
CHOICES = {
    "method": ("prefix_tuning", "prompt_tuning", "p_tuning", "prefix", "prompt", "ptuning", "p-tuning"),
    "schedule": ("linear", "cosine", "constant"),
    "task": ("generate", "classify"),
    "pooling": ("mean", "cls"),
    "off_task": ("warn", "reject", "base", "off"),
}

# -------------------------------------------------------------------------------------------
# Commands


def info(base: str | None = None, num_virtual_tokens: int | None = None, projection_dim: int | None = None,
         json: bool = False):
    """Show the base model's geometry and, per method, trainable parameters and artifact size.

    Args:
        base: a local HuggingFace model directory (default: the embedded SmolLM2-135M-Instruct)
        num_virtual_tokens: prompt length P used for the size figures (default: the methods' own)
        projection_dim: width of prefix tuning's reparameterization MLP (default: prefix tuning's own)
        json: print JSON instead of a table
    """
    from softprompt import methods

    num_virtual_tokens = num_virtual_tokens or methods.PrefixTuningConfig.num_virtual_tokens
    projection_dim = methods.PrefixTuningConfig.projection_dim if projection_dim is None else projection_dim
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


def init(out: str, method: str = "prompt_tuning", num_virtual_tokens: int | None = None, init: str | None = None,
         text: str | None = None, projection_dim: int | None = None, seed: int = 0, base: str | None = None,
         overwrite: bool = False):
    """Create a freshly initialized (untrained) prompt and save it as an artifact.

    Args:
        out: artifact path: a directory, or a file ending in .safetensors
        method: prompt_tuning, prefix_tuning or p_tuning
        num_virtual_tokens: prompt length P (default: the method's)
        init: prompt tuning: random, vocab, text or tokens; prefix tuning: random or text
        text: the string for init=text
        projection_dim: prefix tuning's MLP width (0: direct; default: prefix tuning's)
        seed: random seed for the initialization
        base: a local HuggingFace model directory (default: the embedded model)
        overwrite: replace an existing artifact at OUT (refused by default)
    """
    from softprompt import methods
    from softprompt.io.artifact import save_artifact

    _refuse_existing(out, overwrite)
    name = methods.canonical(method)
    given = {"num_virtual_tokens": num_virtual_tokens, "init": init, "init_text": text,
             "projection_dim": projection_dim, "seed": seed}
    if init is None and text is not None:
        given["init"] = "text"
    options = {k: v for k, v in given.items() if v is not None and hasattr(methods.CONFIGS[name], k)}
    config = methods.CONFIGS[name](**options)  # checked before the model loads
    model, tok = _load(base)
    from dataclasses import asdict

    opts = {k: v for k, v in asdict(config).items() if v is not None}
    num_virtual_tokens = config.num_virtual_tokens
    prompt = methods.create(name, model, tok, **opts)
    path = save_artifact(prompt, out, model)
    sizes = prompt.sizes(model)
    print(f"saved {name} (P={num_virtual_tokens}, {sizes['artifact_bytes']:,} bytes) to {path}", file=sys.stderr)


def _generate(cfg) -> None:
    """`softprompt generate`, from its GenerateConfig (runs/config.py): print the continuation."""
    from softprompt.families import family_of
    from softprompt.io.lora import load_prompt
    from softprompt.loops.generate import SamplingParams

    m, prompt = cfg.model, cfg.prompt
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, seed=cfg.seed, stop=tuple(cfg.stop))
    model, tok = _load(m.base, m.lora, m.merge_lora)
    kv = None
    if cfg.adapter is not None:  # load_prompt: a refusal for the base also names the --lora flag that fits
        kv = load_prompt(cfg.adapter, model, m.lora, m.merge_lora, cfg.allow_other_base).to_kv_prefix(model)
    if cfg.chat:
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


def _eval(cfg) -> None:
    """`softprompt eval`, from its EvalConfig (runs/config.py): a classifier artifact is scored by
    accuracy and macro-F1, anything else by generating."""
    if cfg.adapter and cfg.adapter != "none":
        from softprompt.runs.classify import is_classifier_path, run_eval_classify

        if is_classifier_path(cfg.adapter):
            run_eval_classify(cfg)
            return
    from softprompt.runs.train import run_eval

    run_eval(cfg)


def demo(out: str = "out/demo", steps: int = 30, base: str | None = None, method: str = "prefix_tuning",
         seed: int = 0):
    """Train a prompt on the bundled demo task and show the outputs before and after.

    The task: weather records in, one-line reports in a house style out.

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
              base: str | None = None, store: str | None = None, allow_duplicate: bool = False):
    """Add an artifact to the store as the next version of NAME.

    Args:
        name: task name (letters, digits, '.', '_', '-')
        artifact: our artifact (directory or .safetensors) or a PEFT adapter directory
        tag: a tag for the task (repeatable)
        metric: a metric KEY=VALUE recorded with the task (repeatable)
        base: base model for a PEFT adapter (default: the embedded model); given, the task is compiled for it
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
        allow_duplicate: add it even if the latest version of NAME holds the same tensors (refused by default)
    """
    ref = _store(store).add(name, artifact, _model_for(artifact, base), tags=tag or (), metrics=_metrics(metric),
                            allow_duplicate=allow_duplicate)
    print(ref)


def store_import(src: str, name: str | None = None, tag: list[str] | None = None, base: str | None = None,
                 store: str | None = None, allow_duplicate: bool = False):
    """Import an artifact or a PEFT adapter directory into the store.

    Args:
        src: our artifact (directory or .safetensors) or a PEFT adapter directory
        name: task name (default: the file or directory name)
        tag: a tag for the task (repeatable)
        base: base model for converting a PEFT adapter (default: the embedded model)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
        allow_duplicate: import it even if the latest version of NAME holds the same tensors (refused by default)
    """
    print(_store(store).import_(src, name, _model_for(src, base), tags=tag or (), allow_duplicate=allow_duplicate))


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
    print(f"{'task':<32}{'state':<10}{'method':<15}{'P':>4}{'bytes':>10}  {'created':<21}tags")
    for r in rows:
        print(f"{r['name'] + '@' + str(r['version']):<32}{r['state']:<10}{r['method']:<15}"
              f"{r['num_virtual_tokens'] or 0:>4}{r['size']:>10,}  {r['created']:<21}{','.join(r['tags'])}")


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


def store_verify(store: str | None = None, trust_key: list[str] | None = None):
    """Check every indexed file against its sha256 and that it loads; exit status 2 on any problem.

    Loads: every tensor's bytes agree with its safetensors header, the card lists those tensors, and
    their shapes are what the card's method needs on the base geometry the card records. With
    --trust-key, every approved version's approval must also be signed by one of those keys over the
    artifact as stored (what `serve --require-approved --trust-key` checks per request).

    Args:
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
        trust_key: a PEM Ed25519 public key (repeatable): check approved versions' signatures against these
    """
    from softprompt.store.core import StoreError

    problems = _store(store).verify(trust_key or ())
    if problems:
        raise StoreError(f"{len(problems)} problem(s): " + "; ".join(problems))
    print("ok")


def store_compile(task: list[str] | None = None, base: str | None = None, store: str | None = None):
    """Compile tasks' serving form (the KV prefix) for a base model ahead of serving.

    Kept in the store, so a task's first serve is a file read, not a forward pass. Tasks published
    without a model are otherwise compiled on their first serve; tasks made for another base are skipped.

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


def store_migrate(src: str, dst: str, objects: str | None = None):
    """Copy a store into another (e.g. a SQLite store into PostgreSQL and S3).

    Every version keeps its number, dates, tags and sha256, and the compiled forms come along (DST
    e.g. postgresql://USER@HOST/DB?objects=s3://B/P). Run again after an interruption, it copies what
    is missing.

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


def store_approve(ref: str, by: str = "", note: str = "", key: str | None = None, store: str | None = None):
    """Approve one version of a task (NAME@N) for serving: `serve --require-approved` serves only these.

    With --key (an Ed25519 private key from `softprompt store keygen`) the approval is signed over the
    artifact's checksums, so a server with --trust-key refuses the version if the artifact changes.

    Args:
        ref: NAME@VERSION
        by: who approves (required)
        note: why (e.g. the review it passed)
        key: sign the approval with this private key file (PEM)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    _print_decision(_store(store).approve(ref, by, note, key))


def store_revoke(ref: str, by: str = "", note: str = "", key: str | None = None, store: str | None = None):
    """Revoke one version of a task (NAME@N): servers with --require-approved stop serving it at once.

    Args:
        ref: NAME@VERSION
        by: who revokes (required)
        note: why
        key: sign the revocation with this private key file (PEM)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    _print_decision(_store(store).revoke(ref, by, note, key))


def _print_decision(d: dict) -> None:
    signed = f", signed by key {d['key_id']}" if d["signed"] else ""
    print(f"{d['name']}@{d['version']} {d['state']} by {d['by']} at {d['time']}{signed}")


def store_keygen(out: str):
    """Make an Ed25519 key pair for signing approvals: OUT (private, PEM) and OUT.pub (public, PEM).

    Neither file may exist. Keep OUT secret (it is written readable by its owner only); give OUT.pub
    to servers (`serve --require-approved --trust-key OUT.pub`).

    Args:
        out: the private key file to write (the public key goes to OUT.pub)
    """
    from softprompt.store.approvals import key_id, keygen, load_private

    priv, pub = keygen(out)
    ident = key_id(load_private(priv).public_key())
    print(f"wrote {priv} (private: keep it secret) and {pub} (public), key id {ident}")


def store_history(task: str, limit: int = 100, json: bool = False, store: str | None = None):
    """Show the audit trail of a task (or of NAME@N): the requests it served, newest first.

    Each row: time, request id, API key name, task@version, artifact sha256, status, tokens in/out.
    No prompt or completion text is stored. The base model's requests are under its served name.

    Args:
        task: a task name, NAME@N for one version, or the base model's served name (for its requests)
        limit: at most this many rows
        json: print JSON (to export the trail)
        store: store directory (default: $SOFTPROMPT_STORE or ~/.cache/softprompt/store)
    """
    # a task name, or the base's served name (which may hold '/', '+' or ':'): matched exactly
    if not task or len(task) > 256 or not task.isprintable():
        raise ValueError("TASK must be a task name or the base model's served name (1 to 256 printable characters)")
    rows = _store(store).history(task, limit)
    if json:
        print(jsonlib.dumps(rows, indent=2))
        return
    print(f"{'time':<25}{'request id':<20}{'key':<14}{'task':<32}{'sha256':<14}{'status':>6}{'in':>7}{'out':>7}")
    for r in rows:
        ref = r["task"] + (f"@{r['version']}" if r["version"] is not None else "")
        print(f"{r['time']:<25}{str(r['request_id'])[:19]:<20}{str(r['key_name'])[:13]:<14}{ref[:31]:<32}"
              f"{(r['sha256'] or '-')[:12]:<14}{str(r['status']):>6}{r['tokens_in']:>7}{r['tokens_out']:>7}")


STORE_COMMANDS = {"add": store_add, "ls": store_ls, "show": store_show, "rm": store_rm, "export": store_export,
                  "import": store_import, "gc": store_gc, "verify": store_verify, "compile": store_compile,
                  "migrate": store_migrate, "approve": store_approve, "revoke": store_revoke, "keygen": store_keygen,
                  "history": store_history}

COMMANDS = {"info": info, "init": init, "generate": "generate", "export-peft": export_peft, "train": "train",
            "eval": "eval", "demo": demo, "store": STORE_COMMANDS, "serve": "serve"}


# -------------------------------------------------------------------------------------------
# Seeing inside: inspect, card


def inspect_(adapter: str, data: str | None = None, out: str | None = None, examples: int = 4, top_k: int = 5,
             base: str | None = None, lora: str | None = None, merge_lora: bool = True,
             allow_other_base: bool = False, json: bool = False):
    """Look inside an artifact: its nearest tokens, K/V norms and the attention the prefix gets.

    Nearest vocabulary tokens and norms of virtual tokens (prompt/P-tuning), per-layer K/V norms, and
    with --data the share of attention real tokens give the prefix per layer and head. Writes OUT.json
    and OUT.png (a layer x head heatmap and the K/V norms); prints a summary.

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
    """Print (or write) an artifact's model card as markdown.

    The card: base model and fingerprint, method and sizes, data, hyperparameters, metrics, date,
    library version.

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


COMMANDS.update({"inspect": inspect_, "card": card, "compare": "compare", "distill": "distill",
                 "compile-text": "compile-text"})

# `softprompt audit`: its function (flags from its signature) lives with the audit; importing it is light.
from softprompt.auditing.command import audit as audit_  # noqa: E402

COMMANDS["audit"] = audit_


# -------------------------------------------------------------------------------------------
# train and compare: flags generated from the run's configs (softprompt/runs/config.py) by jsonargparse.
# Every field has its nested flag (--train.steps, --data.template, --prompt.num_virtual_tokens,
# --model.base, --output.resume, --classify.labels) and, where the name is unambiguous, the short one
# (--steps, --template, --num-virtual-tokens, --base, --resume, --labels). jsonargparse is imported
# only when one of these commands' parser is built, so `softprompt --help` stays light.

HELP = {
    "train_data": "training data: .jsonl ({input,output} / {prompt,completion} / {messages}), .csv/.tsv, or "
                  "hf:NAME[:SPLIT]",
    "out": "run directory",
    "task": "generate, or classify (needs --labels; --template renders the text, --target names the label column; "
            "default base: the embedded encoder all-MiniLM-L6-v2 with a head; --base smollm2 or a decoder directory: "
            "label words; --method head_only: the linear probe)",
    "method": "prefix_tuning, prompt_tuning or p_tuning (or prefix, prompt, ptuning); with --task classify on an "
              "encoder also head_only (no prompt: the head alone, a linear probe)",
    "eval_data": "held-out data in the same format (default: --eval-fraction of the training inputs)",
    "eval_fraction": "hold out this fraction of the distinct training inputs for evaluation",
    "base": "a local HuggingFace model directory (default: the embedded model)",
    "device": "auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps",
    "dtype": "the base model's precision: float32, bfloat16 or float16 (prompts stay float32)",
    "quantize": "none, or int8: the base's Linear layers in int8 (CPU only; for serving and eval)",
    "threads": "torch CPU threads (0: the cores not busy with other processes; see docs/devices.md)",
    "lora": "train on top of this PEFT LoRA adapter (directory, safetensors); the artifact is then refused on the "
            "bare base",
    "merge_lora": "merge the LoRA weights into the base (--no-merge-lora keeps LoRA layers)",
    "template": "prompt template over a row's fields, e.g. \"{mr} ||\" (CSV needs it)",
    "target": "the target field (or a template with {field}); classify: the label column",
    "chat_template": "wrap each prompt in the base model's chat template as a user turn",
    "max_length": "rows longer than this many tokens (prompt + target) are bad rows",
    "skip_bad_rows": "skip and count bad rows instead of stopping at the first",
    "max_rows": "read at most this many rows (0: all)",
    "delimiter": "CSV delimiter (default: \",\", or a tab for .tsv)",
    "num_virtual_tokens": "prompt length P",
    "projection_dim": "prefix tuning's reparameterization MLP width (0: optimize the prefix directly; an encoder "
                      "classifier: 0 unless given)",
    "init": "prompt tuning: vocab, random, text, tokens; prefix tuning: text or random (default: the method's best, "
            "see README)",
    "init_text": "the text for init=text (default: a generic task description)",
    "init_tokens": "prompt tuning, init=tokens: the token ids, e.g. [12, 7, 99]",
    "residual_dim": "prompt tuning's residual reparameterization width (Razdaibiedina et al. 2023; training only; "
                    "0: none)",
    "encoder": "P-tuning's prompt encoder: mlp or lstm",
    "encoder_hidden_size": "P-tuning's encoder width (default: the model's hidden size)",
    "seed": "seed for initialization and data order",
    "steps": "optimizer steps",
    "batch_size": "rows per optimizer step, over all processes",
    "micro_batch_size": "rows per forward pass (gradient accumulation when smaller; 0: the whole batch)",
    "lr": "peak learning rate (default: per method, see README)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warmup steps",
    "schedule": "linear, cosine or constant decay after warmup",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "eval_every": "evaluate every N steps (0: at the end only)",
    "eval_generate": "also generate for this many held-out inputs and score BLEU/ROUGE-L/exact match/accuracy",
    "eval_max_new_tokens": "at most this many new tokens per generated output when scoring",
    "metric": "eval_loss, bleu, rouge_l, exact_match or accuracy (classify: accuracy or f1): picks OUT/best and "
              "drives early stopping",
    "patience": "stop after this many evaluations without improvement (0: never)",
    "checkpoint_every": "write a checkpoint every N steps (0: never)",
    "keep_checkpoints": "keep this many newest checkpoints",
    "gradient_checkpointing": "recompute activations in backward (less memory; works with prefix tuning)",
    "log_every": "log a metrics row every N steps",
    "overwrite": "start afresh in an OUT that already holds files: the earlier run's files are removed (refused by "
                 "default; --resume continues it instead)",
    "resume": "continue from the newest good checkpoint in OUT/checkpoints",
    "report_to": "experiment trackers: tensorboard, mlflow, wandb (repeat, or comma-separate); needs "
                 "softprompt[track]",
    "progress": "show a progress bar",
    "labels": "classify: the class names, comma-separated (data labels are names or 0-based indices)",
    "label_words": "classify on a decoder: the word the model predicts per class, comma-separated (default: the "
                   "label names)",
    "pooling": "classify on an encoder: mean or cls",
    # compare's own
    "lora_r": "LoRA rank (q_proj and v_proj)",
    "lora_lr": "LoRA learning rate (the prompt methods use their defaults)",
    "max_new_tokens": "tokens generated per row when measuring tokens/s",
    "tasks": "rows (and distinct tasks, when mixed) in the tokens/s measurement",
    "eval_inputs": "distinct held-out inputs scored (eval_loss over all their references; BLEU and ROUGE-L of greedy "
                   "outputs); 0: all",
    "methods": "the methods compared, comma-separated, any of prefix_tuning, prompt_tuning, p_tuning, lora, full "
               "(full fine-tuning: every weight of a copy of the base)",
    "full_lr": "full fine-tuning's learning rate",
    "num_beams": "beam search with this many beams, scored beside greedy (5: the papers' decoding; 1: greedy only)",
    "length_penalty": "beam search: a hypothesis scores logprob / length**length_penalty",
    "bootstrap_samples": "paired bootstrap resamples (sacrebleu) for BLEU's 95%% interval and the p-value against "
                         "prefix tuning",
    "train_sizes": "data-efficiency curve: train every method on subsets of this many distinct training inputs "
                   "(comma-separated, e.g. 50,100,200,500; drawn per seed, each with all its rows, smaller inside "
                   "larger); writes the curve as OUT/compare.png",
    "seeds": "with --train-sizes: one subset draw and training run per seed, comma-separated (default: --seed)",
    "epochs": "with --train-sizes: steps per run = ceil(epochs x rows / batch size), at least --steps, at most "
              "--max-steps",
    "max_steps": "with --train-sizes: the most steps per run (0: no cap)",
}
SUMMARY = {
    "train": "Train a prompt (or a classifier, --task classify) on a dataset.\n\nWrites OUT/best and OUT/last "
             "(artifacts), metrics.jsonl, plot.png, checkpoints/ and run.json. Runs data-parallel unchanged under "
             "`torchrun --nproc-per-node N -m softprompt.cli train ...` (or `accelerate launch`); --batch-size is the "
             "global batch. Options are the run's config (RunConfig): --config FILE reads one (YAML or JSON, e.g. an "
             "earlier run's run.json), flags override it.",
    "compare": "Train the prompt methods and LoRA on the same data and budget, and compare them.\n\nPrefix "
               "tuning, prompt tuning and LoRA (PEFT) by default (--methods adds P-tuning and full fine-tuning), "
               "reported side by side: BLEU with a 95% interval and the p-value against prefix tuning (paired "
               "bootstrap). Writes OUT/compare.json, OUT/compare.md (a markdown table) and OUT/compare.png, and "
               "prints the table. --train-sizes 50,200 --seeds 0,1 draws a data-efficiency curve instead: every "
               "method per training size and seed, mean and spread per point.",
}
# compare takes these of the run's options, under their short names (as it always has)
COMPARE_RUN_OPTIONS = ("base", "device", "dtype", "quantize", "threads", "template", "target", "eval_data",
                       "eval_fraction", "steps", "batch_size", "num_virtual_tokens", "seed", "progress")
# serve, eval, generate: one flat flag per option of their config (softprompt/serve/config.py's
# ServeConfig, softprompt/runs/config.py's EvalConfig and GenerateConfig), in the order and with the
# names of the config's OPTIONS (a field, or a section's field such as model.base -> --base); the
# config's docstring gives the summary and each flag's help.
FLAT = {"serve": ("softprompt.serve.config", "ServeConfig"), "eval": ("softprompt.runs.config", "EvalConfig"),
        "generate": ("softprompt.runs.config", "GenerateConfig"),
        "distill": ("softprompt.runs.distill_config", "DistillConfig"),
        "compile-text": ("softprompt.runs.distill_config", "CompileTextConfig")}
RENAMED = {}  # flags that no longer exist: old -> the new one (each named in a one-line error)


class _Accumulate(argparse.Action):
    """A repeatable, comma-separable list flag (--report-to a,b --report-to c)."""

    def __call__(self, parser, namespace, values, option_string=None):
        held = namespace.get(self.dest) if hasattr(namespace, "get") else getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, list(held or []) + [v.strip() for v in values.split(",") if v.strip()])


class _Append(argparse.Action):
    """A repeatable flag whose dest is a dotted name (jsonargparse's Namespace): each value whole."""

    def __call__(self, parser, namespace, values, option_string=None):
        held = namespace.get(self.dest) if hasattr(namespace, "get") else getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, list(held or []) + [values])


def _run_options() -> list[tuple[str, str | None, object, object]]:
    """(dest, short name or None, type, default) for every option of a training run."""
    from dataclasses import fields

    from softprompt.runs.config import SECTIONS, RunConfig, flat_names, prompt_fields

    hints = typing.get_type_hints(RunConfig)
    flat = flat_names()
    opts = [(name, name, hints[name], getattr(RunConfig, name)) for name in ("task", "method", "eval_data",
                                                                              "eval_fraction")]
    for section, cls in SECTIONS.items():
        h = typing.get_type_hints(cls)
        for f in fields(cls):
            short = f.name if flat.get(f.name) == (section, f.name) else None
            opts.append((f"{section}.{f.name}", short, h[f.name], f.default))
    for name, (tp, per_method) in prompt_fields().items():
        short = name if flat.get(name) == ("prompt", name) else None
        opts.append((f"prompt.{name}", short, tp, None))  # None: the chosen method's default
    return opts


def _method_default(name: str) -> str:
    from softprompt.runs.config import prompt_fields

    per = prompt_fields()[name][1]
    values = {v for v in per.values()}
    if len(values) == 1:
        return f"the method's; {next(iter(values))}" if None not in values else "the method's"
    return "the method's; " + ", ".join(f"{m}: {v}" for m, v in per.items())


def _add_option(p, dest: str, flags: list[str], tp, default, help_text: str) -> None:
    base, is_list = _base_type(tp)
    name = dest.rsplit(".", 1)[-1]
    if dest.startswith("prompt.") and "default" not in help_text.lower():
        help_text = f"{help_text} (default: {_method_default(name)})"
    if base is bool:
        p.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    elif typing.get_origin(base) is tuple or is_list:
        if name == "init_tokens":
            p.add_argument(*flags, dest=dest, type=tp, default=default, help=help_text)
        else:
            p.add_argument(*flags, dest=dest, action=_Accumulate, default=None if not default else list(default),
                           help=help_text, metavar=name.upper())
    else:
        extra = {"choices": CHOICES[name]} if name in CHOICES else {"metavar": name.upper()}
        if name == "method":  # train's: with --task classify also head_only, in the run config's spellings
            from softprompt.runs.config import HEAD_ONLY, HEAD_ONLY_ALIASES

            extra = {"choices": CHOICES["method"] + HEAD_ONLY_ALIASES,
                     "metavar": "{" + ",".join(CHOICES["method"][:3] + (HEAD_ONLY,)) + "}"}
        p.add_argument(*flags, dest=dest, type=typing.Optional[base] if default is None else base, default=default,
                       help=help_text, **extra)


def _flat_class(command: str):
    import importlib

    module, name = FLAT[command]
    return getattr(importlib.import_module(module), name)


def _summary(command: str) -> str:
    return _doc_args(_flat_class(command))[0] if command in FLAT else SUMMARY[command]


def _flat_options(cls):
    """(dest, flag name, type, default) for each of a flat command's options (cls.OPTIONS)."""
    from dataclasses import fields

    own = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    for dest in cls.OPTIONS:
        section, _, name = dest.rpartition(".")
        if section:
            part = own[section].default
            tp, default = typing.get_type_hints(type(part))[name], getattr(part, name)
        else:
            tp, default = hints[name], own[name].default
        yield dest, cls.FLAG_NAMES.get(dest, name), tp, default


def _add_flat_options(p, cls) -> None:
    helps = _doc_args(cls)[1]
    for name in cls.POSITIONAL:
        p.add_argument(name, help=helps.get(name, ""))
    for dest, flag, tp, default in _flat_options(cls):
        text = helps.get(flag) or HELP.get(flag, "")
        if typing.get_origin(_base_type(tp)[0]) is tuple:  # repeatable, each value whole (a stop string may hold ",")
            # a section's field (server.trust_keys) is a dotted name argparse's "append" cannot read back
            p.add_argument(f"--{flag.replace('_', '-')}", dest=dest, action=_Append if "." in dest else "append",
                           default=None, help=text, metavar=flag.upper())
        else:
            _add_option(p, dest, [f"--{flag.replace('_', '-')}"], tp, default, text)
            if p._actions[-1].metavar:  # the flag's name, not the field's (--data DATA, not EVAL_DATA)
                p._actions[-1].metavar = flag.upper()


def config_parser(command: str):
    """The parser of `train` or `compare`, built from the run's configs, or of a FLAT command (serve,
    eval, generate), built from its config (jsonargparse)."""
    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, _HelpFormatter):
        def _get_help_string(self, action):
            return _HelpFormatter._get_help_string(self, action)

    class Parser(ArgumentParser):
        def error(self, message, *args, **kwargs):
            _Parser.error(self, str(message))

    p = Parser(prog=f"softprompt {command}", description=_summary(command), formatter_class=Formatter,
               exit_on_error=False)
    if command in FLAT:
        p.add_argument("--config", dest="_config", metavar="FILE",
                       help="a YAML or JSON file of this command's options (names as in Python, e.g. "
                            "max_new_tokens); flags given on the command line override it")
        _add_flat_options(p, _flat_class(command))
        return p
    p.add_argument("--config", dest="_config", metavar="FILE",
                   help="a YAML or JSON file of this command's options (a run's run.json, or flat names such as "
                        "num_virtual_tokens); flags given on the command line override it")
    options = _run_options()
    if command == "train":
        p.add_argument("train_data", nargs="?", metavar="DATA", help=HELP["train_data"])
        p.add_argument("output.out", nargs="?", metavar="OUT", help=HELP["out"])
        for dest, short, tp, default in options:
            if dest == "output.out":
                continue
            flags = [f"--{dest}"] + ([f"--{short.replace('_', '-')}"] if short else [])
            if dest in ("task", "method", "eval_data", "eval_fraction"):
                flags = [f"--{dest.replace('_', '-')}"]
            _add_option(p, dest, flags, tp, default, HELP.get(short or dest.rsplit(".", 1)[-1], ""))
        return p
    from dataclasses import fields

    from softprompt.runs.config import RUN_DEFAULTS, CompareConfig

    p.add_argument("--data", dest="train_data", type=typing.Optional[str], default=None,
                   help="training data (required; same formats as train)")
    p.add_argument("--out", dest="out", type=str, default=RUN_DEFAULTS["out"], help="output directory")
    for dest, short, tp, default in options:  # flat names: compare's flags are the ones it always had
        if short in COMPARE_RUN_OPTIONS:
            _add_option(p, short, [f"--{short.replace('_', '-')}"], tp, RUN_DEFAULTS.get(short, default), HELP[short])
    hints = typing.get_type_hints(CompareConfig)
    for f in fields(CompareConfig):
        if f.name != "run":  # a list flag replaces its default (the default is in its help)
            listed = isinstance(f.default, tuple)
            _add_option(p, f.name, [f"--{f.name.replace('_', '-')}"], hints[f.name], () if listed else f.default,
                        HELP[f.name] + (f" (default: {','.join(map(str, f.default))})" if listed and f.default
                                        else ""))
    return p


def _file_flags(parser, command: str, path: str) -> list[str]:
    """The options of `--config FILE` as flags (checked by the same parser as the command line's);
    the positionals DATA and OUT become the parser's defaults."""
    from softprompt.runs.config import nest

    values = _read_config(path)
    if command in FLAT:  # the flags' own names (max_batch_size for --max-batch-size -> server.max_batch_size)
        cls = _flat_class(command)
        dest_of = {flag: dest for dest, flag, _, _ in _flat_options(cls)} | {n: n for n in cls.POSITIONAL}
        flat = {dest_of.get(k, k): v for k, v in values.items()}
    elif command == "compare":  # compare's options are flat, as its flags
        flat = {("train_data" if k == "data" else k): v for k, v in values.items()}
    else:
        try:
            nested = nest(values)
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
        flat = {}
        for key, value in nested.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
    dests = {a.dest: a for a in parser._actions}
    flags, defaults = [], {}
    for dest, value in flat.items():
        action = dests.get(dest)
        if action is None:
            if value in (None, False, [], {}):
                continue  # an option this command does not take, left at nothing: no harm
            raise ValueError(f"--config {path}: no option {dest!r} for `softprompt {command}`")
        if not action.option_strings or dest in ("output.out", "train_data"):
            defaults[dest] = value
        elif value is not None and isinstance(action, argparse._AppendAction):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                flags += [action.option_strings[0], str(v)]
        elif value is None:
            continue
        elif isinstance(action, argparse.BooleanOptionalAction):
            flags.append(action.option_strings[0] if value else f"--no-{action.option_strings[0][2:]}")
        elif isinstance(action, _Accumulate):
            flags += [action.option_strings[0], ",".join(map(str, value if isinstance(value, (list, tuple))
                                                              else [value]))]
        elif isinstance(value, (list, tuple, dict)):
            flags += [action.option_strings[0], jsonlib.dumps(value)]
        else:
            flags += [action.option_strings[0], str(value)]
    if defaults:
        parser.set_defaults(defaults)
    return flags


def _read_config(path: str) -> dict:
    """The options of `--config FILE` (YAML, or JSON for .json): a mapping, else a one-line ValueError."""
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
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values")
    return values


def _config_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config FILE, the rest) from a command's words."""
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return path, rest


def parse_config_command(command: str, argv: list[str]):
    """`softprompt train|compare|serve|eval|generate ...` -> its config: a RunConfig (train), a
    CompareConfig (compare), a ServeConfig, EvalConfig or GenerateConfig (FLAT)."""
    parser = config_parser(command)
    path, rest = _config_argv(argv)
    for word in rest:
        old = word.split("=", 1)[0]
        if old in RENAMED:
            raise ValueError(f"{old} is now {RENAMED[old]}")
    flags = _file_flags(parser, command, path) if path else []
    ns = parser.parse_args(flags + rest).as_dict()
    ns.pop("_config", None)
    return build_config(command, ns)


def build_config(command: str, d: dict):
    if command in FLAT:
        from softprompt.core.defaults import config_of

        return config_of(_flat_class(command), {k: v for k, v in d.items() if v is not None and v != {}})
    from softprompt.runs.config import RunConfig

    if command == "compare":
        from softprompt.runs.config import CompareConfig

        own = {k: d.pop(k) for k in list(d) if k in CompareConfig.__dataclass_fields__}
        own = {k: v for k, v in own.items() if v is not None}  # a list flag not given: the config's default
        return CompareConfig(run=RunConfig.from_dict({k: v for k, v in d.items() if v is not None}), **own)
    from softprompt.runs.config import HEAD_ONLY_ALIASES

    if d.get("method") in HEAD_ONLY_ALIASES and d.get("task") != "classify":
        raise ValueError(f"--method {d['method']} trains a classifier's head alone: it needs --task classify "
                         "(and an encoder base)")
    if d.get("train_data") is None or (d.get("output") or {}).get("out") is None:
        raise ValueError("DATA and OUT are required (or --config FILE naming them, e.g. a run's run.json)")
    d["prompt"] = {k: v for k, v in (d.get("prompt") or {}).items() if v is not None}
    if d.get("task") != "classify":
        d.pop("classify", None)
    return RunConfig.from_dict(d)


def run_config_command(command: str, cfg) -> None:
    if command in FLAT:
        from softprompt.runs.train import apply_model_config

        apply_model_config(cfg.model)  # where the base runs, for every loader below the command
        if command == "serve":
            from softprompt.serve.main import serve

            serve(cfg)
        elif command in ("distill", "compile-text"):
            from softprompt.runs.distill import run_compile_text, run_distill

            (run_distill if command == "distill" else run_compile_text)(cfg)
        else:
            (_eval if command == "eval" else _generate)(cfg)
        return
    if command == "train":
        from softprompt.runs.train import run_train

        run_train(cfg)
        return
    from softprompt.runs.compare import run_compare

    out = cfg.run.output.out
    report = run_compare(cfg)
    print(open(os.path.join(out, "compare.md")).read(), end="")
    what = f"{len(cfg.methods)} methods" + (f" x {len(report['train_sizes'])} sizes x {len(report['seeds'])} seeds"
                                             if report.get("mode") == "curve" else "")
    print(f"wrote {out}/compare.json, compare.md and compare.png ({what})", file=sys.stderr)


# Where and how a command's model runs: every command that loads a model takes these flags; `main`
# applies them once (softprompt.core.device.set_defaults, set_threads), so every loader below it, also in
# the jobs that load their own model (train, eval, demo, classify), picks them up.
MODEL_FLAGS = {name: (type(getattr(ModelConfig, name)), getattr(ModelConfig, name), HELP[name])
               for name in ("device", "dtype", "quantize", "threads")}
LOADS_MODEL = {"info", "init", "generate", "export-peft", "train", "eval", "demo", "serve", "inspect", "compare",
               "store add", "store import", "audit"}


# The paths a command reads, checked before anything heavy loads (torch, the model: seconds), so a
# mistyped path is a one-line error at once. Per command: option (a parameter, or a config field such
# as model.lora; compare's run options under run.) -> what it names. A base model is checked only when
# written as a path (./x, /x): other names are Hub ids or aliases (minilm, smollm2), as in load_base.
_ARTIFACT, _DATA, _LORA, _BASE = "artifact", "data file", "LoRA adapter", "base model directory"
INPUT_PATHS = {
    "info": {"base": _BASE}, "init": {"base": _BASE}, "demo": {"base": _BASE},
    "export-peft": {"adapter": _ARTIFACT, "base": _BASE}, "card": {"adapter": _ARTIFACT},
    "inspect": {"adapter": _ARTIFACT, "data": _DATA, "lora": _LORA, "base": _BASE},
    "store add": {"artifact": _ARTIFACT, "base": _BASE}, "store import": {"src": _ARTIFACT, "base": _BASE},
    "store compile": {"base": _BASE},
    "generate": {"adapter": _ARTIFACT, "model.lora": _LORA, "model.base": _BASE},
    "eval": {"adapter": _ARTIFACT, "eval_data": _DATA, "model.lora": _LORA, "model.base": _BASE},
    "serve": {"api_keys_file": "API keys file", "model.lora": _LORA, "model.base": _BASE},
    "train": {"train_data": _DATA, "eval_data": _DATA, "model.lora": _LORA, "model.base": _BASE},
    "compare": {"run.train_data": _DATA, "run.eval_data": _DATA, "run.model.base": _BASE},
    "distill": {"prompt_file": "prompt file", "inputs": _DATA, "model.base": _BASE},
    "compile-text": {"prompt_file": "prompt file", "model.base": _BASE},
    "audit": {"inputs": _DATA, "base": _BASE},
}


def check_paths(command: str, options) -> None:
    """ValueError (one line) for the first path `command` would refuse: train's OUT holding an earlier
    run (unless --resume or --overwrite; the run's own rule, which removes nothing when not told to
    overwrite), then each path it would read that does not exist. `options`: the parsed flags (a
    dict) or the command's config."""
    if command == "train" and options.output.out is not None and not options.output.overwrite:
        from softprompt.runs.train import prepare_run_dir  # torch-free at import

        prepare_run_dir(Path(options.output.out), options.output.resume, overwrite=False)
    if command in ("distill", "compile-text") and options.out is not None and not options.overwrite:
        out = Path(options.out)  # compile-text writes an artifact; distill a run directory (an empty one is fine)
        if (out.is_symlink() or out.exists()) and (command == "compile-text" or not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose a new path")
    for dotted, what in INPUT_PATHS.get(command, {}).items():
        value = options
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        path = None if value is None else str(value)
        if path is None or (what == _ARTIFACT and path == "none") or (what == _DATA and path.startswith("hf:")) \
                or (what == _BASE and not path.startswith((".", "/"))):
            continue
        if not os.path.lexists(path):
            raise ValueError(f"no {what} at {path}: the path does not exist")


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


def headline(description: str) -> str:
    """A command's line in the list of `softprompt --help`: its description's first paragraph, whole
    (one short sentence; the rest is in `softprompt COMMAND --help`)."""
    return " ".join(description.strip().split("\n\n")[0].split())


def build_parser() -> argparse.ArgumentParser:
    from softprompt import __version__

    parser = _Parser(prog="softprompt", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        if isinstance(fn, dict):  # a command group: `softprompt store add ...`
            text = "Manage the prompt store: tasks and versions, approvals, the audit trail."
            group = sub.add_parser(name, help=text, description=text).add_subparsers(dest="_sub", required=True,
                                                                                      metavar="SUBCOMMAND")
            for subname, subfn in fn.items():
                _add_command(group, subname, subfn, f"{name} {subname}")
        elif isinstance(fn, str):  # built from a config when the command runs (config_parser)
            summary = headline(_summary(name)).replace("%", "%%")  # argparse %-formats help
            p = sub.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
            p.add_argument("_argv", nargs=argparse.REMAINDER)
            p.set_defaults(_fn=fn, _name=name)
        else:
            _add_command(sub, name, fn, name)
    return parser


def _add_command(sub, name: str, fn, full_name: str) -> None:
    summary, helps = _doc_args(fn)
    p = sub.add_parser(name, help=headline(summary), description=summary, formatter_class=_HelpFormatter)
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
    if isinstance(fn, str):  # train, compare, serve, eval, generate: a config's options, parsed before anything heavy
        try:
            cfg = parse_config_command(name, args["_argv"])
            check_paths(name, cfg)
        except SystemExit as e:  # --help (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else 2
        except ValueError as e:
            return _fail(name, str(e))
        return _run(name, run_config_command, name, cfg)
    args.pop("command")
    args.pop("_sub", None)
    flags = {k: args.pop(k) for k in MODEL_FLAGS if k in args and k not in inspect.signature(fn).parameters}
    try:
        check_paths(name, args)
    except ValueError as e:
        return _fail(name, str(e))
    return _run(name, _call, fn, args, flags)


def _call(fn, args: dict, flags: dict) -> None:
    _apply_model_flags(flags)
    fn(**args)


def _run(name: str, fn, *args) -> int:
    """Run a command; every failure is one line on stderr and exit status 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from softprompt.core.geometry import BaseModelError
    from softprompt.io.artifact import ArtifactError
    from softprompt.io.peft import PeftFormatError

    try:
        fn(*args)
    except SystemExit as e:  # --help (0) or a usage error (2) of a command's own parser, already printed
        return e.code if isinstance(e.code, int) else 2
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
    values = _read_config(path)
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
