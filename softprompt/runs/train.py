"""The jobs behind `softprompt train` and `softprompt eval`: data -> model -> loop -> artifact.

Library code (data.py, train.py, evaluate.py) stays free of printing and argument handling;
this file is the glue the command line calls.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from softprompt.core.defaults import default_lr


def method_options(method: str, num_virtual_tokens: int, init: str | None, init_text: str | None,
                   projection_dim: int, seed: int) -> dict:
    """Options for `methods.create`; what is left None takes the config's default (config.py)."""
    opts: dict = {"num_virtual_tokens": num_virtual_tokens, "seed": seed}
    if init is not None:
        opts["init"] = init
    if init_text is not None:
        opts["init_text"] = init_text
    if method == "prefix_tuning":
        opts["projection_dim"] = projection_dim
    return opts


def _say(msg: str, main: bool = True) -> None:
    if main:
        print(msg, file=sys.stderr, flush=True)


def run_train(data, out, method="prefix_tuning", base=None, template=None, target=None, chat_template=False,
              eval_data=None, eval_fraction=0.0, num_virtual_tokens=20, init=None, init_text=None,
              projection_dim=512, steps=200, batch_size=8, micro_batch_size=0, lr=None, weight_decay=0.0,
              warmup_steps=0, schedule="linear", max_grad_norm=1.0, seed=0, eval_every=0, eval_generate=0,
              metric="eval_loss", patience=0, checkpoint_every=50, keep_checkpoints=2, resume=False,
              gradient_checkpointing=False, max_length=512, max_rows=0, skip_bad_rows=False, progress=True,
              model=None, tokenizer=None, report_to=None):
    """Train and save; returns the `TrainResult`. `model`/`tokenizer` skip loading (tests, demo).
    `report_to`: experiment trackers (tracking.py: tensorboard, mlflow, wandb)."""
    from softprompt import methods
    from softprompt.families import family_of
    from softprompt.loops.data import BadRows, DataConfig, group_references, read_examples, split_heldout
    from softprompt.loops.tracking import Reporters, parse_report_to
    from softprompt.loops.train import TrainConfig, Trainer, init_distributed

    parse_report_to(report_to)  # a bad name fails before the data and the model load
    dist = init_distributed()
    name = methods.canonical(method)
    lr = lr if lr is not None else default_lr(name, projection_dim)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
                      max_grad_norm=max_grad_norm, seed=seed, eval_every=eval_every, eval_generate=eval_generate,
                      metric=metric, patience=patience, checkpoint_every=checkpoint_every,
                      keep_checkpoints=keep_checkpoints, gradient_checkpointing=gradient_checkpointing)
    dcfg = DataConfig(template=template, target=target, chat_template=chat_template, max_length=max_length,
                      skip_bad_rows=skip_bad_rows, max_rows=max_rows)
    out = Path(out)
    if out.exists() and not resume and ((out / "checkpoints").exists() or (out / "metrics.jsonl").exists()):
        raise ValueError(f"{out} holds an earlier run; pass --resume to continue it, or choose a new --out")
    if dist.world > 1:  # every process has checked before any of them writes
        import torch.distributed

        torch.distributed.barrier()
    bad = BadRows()
    train_ex = read_examples(data, dcfg, bad)
    eval_ex = None
    if eval_data:
        eval_ex = read_examples(eval_data, DataConfig(**{**dcfg.__dict__, "max_rows": 0}), bad)
    elif eval_fraction > 0:
        train_ex, eval_ex = split_heldout(train_ex, eval_fraction, seed)
    if model is None:
        if base is None:
            _say("loading the embedded SmolLM2-135M-Instruct ...", dist.main)
        from softprompt.io.load import load_base

        model, tokenizer = load_base(base)  # --device auto: CUDA when present
        if dist.world > 1 and _cuda():
            import torch

            torch.cuda.set_device(dist.rank % torch.cuda.device_count())
            model.to(f"cuda:{dist.rank % torch.cuda.device_count()}")
    family = family_of(model)  # how this base tokenizes, trains and creates prompts
    tokenize, objective = family.tokenize, family.objective()
    train_tok = tokenize(train_ex, tokenizer, dcfg, bad)
    eval_tok = tokenize(eval_ex, tokenizer, dcfg, bad) if eval_ex else None
    groups = group_references(eval_tok.examples) if eval_tok else None
    _say(f"data: {len(train_tok)} training rows, {len(eval_tok) if eval_tok else 0} held-out rows"
         f" ({len(groups) if groups else 0} distinct inputs); {bad.report()}", dist.main)
    prompt = family.create(name, model, tokenizer,
                    **method_options(name, num_virtual_tokens, init, init_text, projection_dim, seed))
    prompt.to(next(model.parameters()).device)
    run_config = {"method": name, "method_options": method_options(name, num_virtual_tokens, init, init_text,
                                                                   projection_dim, seed),
                  "train": cfg.__dict__, "data": dcfg.__dict__, "data_path": str(data), "eval_data": eval_data,
                  "world": dist.world, "bad_rows": bad.count}
    reporter = Reporters(report_to, out, json.loads(json.dumps(run_config, default=str))) if dist.main else None
    from softprompt.io.artifact import save_artifact

    trainer = Trainer(model, tokenizer, prompt, train_tok, cfg, out=out, save=save_artifact, eval_data=eval_tok, eval_groups=groups,
                      dist=dist, progress=progress, card={"dataset": str(data)}, objective=objective,
                      reporter=reporter or None)
    if resume:
        if trainer.resume():
            _say(f"resumed from step {trainer.step}", dist.main)
        else:
            _say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from step 0", dist.main)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(run_config, indent=2, default=str))
    t0 = time.perf_counter()
    try:
        result = trainer.run()
    except BaseException:
        if reporter:
            reporter.close(None, failed=True)
        raise
    if reporter:
        reporter.close(out / "best")
    if dist.main:
        best = ", ".join(f"{k}={v:.4g}" for k, v in (result.best or {}).items() if isinstance(v, float))
        _say(f"done: {result.step} steps in {time.perf_counter() - t0:.0f} s ({result.stopped}); "
             f"last train loss {result.train_loss:.4f}{'; best ' + best if best else ''}\n"
             f"artifact: {out / 'best'} (last step: {out / 'last'}); metrics: {out / 'metrics.jsonl'}; "
             f"plot: {out / 'plot.png'}")
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_eval(adapter=None, data=None, base=None, template=None, target=None, chat_template=False, max_new_tokens=64,
             num_beams=1, batch_size=16, max_inputs=0, skip_bad_rows=False, predictions=None,
             allow_other_base=False, json=False, lora=None, merge_lora=True, model=None, tokenizer=None):
    """Generate for every distinct input and score it against all its references.

    `lora`: a PEFT LoRA adapter applied to the base first (merged unless `merge_lora` is False), for
    prompts trained on that adapted model; a prompt trained on the bare base is then refused by its
    fingerprint (and one trained with LoRA is refused without it), with a hint naming the flag.
    `model`/`tokenizer` skip loading (tests); `lora` is applied to a given model too, in place.
    """
    import json as jsonlib

    from softprompt.families import family_of
    from softprompt.loops.data import BadRows, DataConfig, group_references, read_examples

    if not data:
        raise ValueError("--data PATH is required")
    bad = BadRows()
    dcfg = DataConfig(template=template, target=target, chat_template=chat_template, skip_bad_rows=skip_bad_rows,
                      max_length=10**9)
    groups = group_references(read_examples(data, dcfg, bad))
    if max_inputs:
        groups = groups[:max_inputs]
    from softprompt.io.lora import apply_lora, load_base_with_lora, load_prompt

    if model is None:
        if base is None:
            _say("loading the embedded SmolLM2-135M-Instruct ...")
        model, tokenizer = load_base_with_lora(base, lora, merge=merge_lora)
    elif lora is not None:
        model = apply_lora(model, lora, merge=merge_lora)
    kv = None
    if adapter and adapter != "none":
        kv = load_prompt(adapter, model, lora, merge_lora, allow_other_base).to_kv_prefix(model)
    t0 = time.perf_counter()
    res = family_of(model).evaluate_groups(model, tokenizer, groups, kv, chat_template=chat_template, max_new_tokens=max_new_tokens,
                          num_beams=num_beams, batch_size=batch_size)
    preds = res.pop("predictions")
    res["seconds"] = time.perf_counter() - t0
    res["references"] = sum(len(r) for _, r in groups)
    if predictions:
        with open(predictions, "w") as f:
            for (p, refs), h in zip(groups, preds):
                f.write(jsonlib.dumps({"prompt": p if isinstance(p, str) else p[1], "output": h,
                                       "references": refs}) + "\n")
    if bad.count:
        _say(bad.report())
    if json:
        print(jsonlib.dumps(res, indent=2))
    else:
        print(f"{res['n']} inputs ({res['references']} references), {'greedy' if num_beams == 1 else f'beam {num_beams}'}: "
              f"BLEU {res['bleu']:.2f}  ROUGE-L {res['rouge_l']:.2f}  exact match {res['exact_match']:.1f}%  "
              f"accuracy {res['accuracy']:.1f}%  ({res['seconds']:.0f} s)")
    return res
