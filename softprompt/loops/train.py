"""One training loop for every prompt method (prompt tuning, prefix tuning, P-tuning).

The loop only sees the `PromptMethod` protocol: `prompt(model, ids, mask, logits_to_keep=K)`.
Per step, over a global batch of `batch_size` rows (split over processes and micro-batches):

    loss = sum_{target tokens t} -log p(x_t | x_<t) / (target tokens in the global batch)

AdamW, linear warmup then linear or cosine decay, gradient clipping, evaluation every N steps
on a held-out split, early stopping, the best artifact kept, atomic checkpoints that resume
bit-exactly, and data parallelism over `torchrun` / `accelerate launch` processes (gradients
summed with all_reduce; every process normalizes by the global token count, so N processes give
the same update as one process with the same global batch).

Speed: the LM head (576 x 49152 for the default model, the largest matmul per token) runs only
at the positions that predict a target token, and batches group rows of similar length.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from softprompt import hf
from softprompt.hf import gradient_checkpointing, lm_head_at  # noqa: F401  (gradient_checkpointing: public here)
from softprompt.hf.prefix import check_prefix_support
from softprompt.loops import checkpoint as ckpt
from softprompt.loops.config import HIGHER_IS_BETTER, SCHEDULES, TrainConfig  # noqa: F401  (public here too)
from softprompt.loops.data import TokenizedData, collate, length_grouped_batches

class TrainingError(ValueError):  # a ValueError so the CLI prints it as a one-line error
    """Training cannot go on; the message says why and what to do."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - frac)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------------------------
# The loss, computed at target positions only


def target_loss(prompt, model, input_ids, attention_mask, target_mask) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens and their count.

    input_ids, attention_mask, target_mask: (B, T), left-padded. Position t predicts token t+1,
    so the logits needed are at `pred[:, t] = target_mask[:, t+1]`; with left padding they all
    sit in the last K columns, and of those only the selected ones reach the LM head.
    """
    B, T = input_ids.shape
    pred = torch.zeros_like(target_mask)
    pred[:, :-1] = target_mask[:, 1:]  # (B, T)
    cols = pred.any(0).nonzero()
    if not len(cols):
        raise ValueError("batch has no target tokens")
    K = T - int(cols[0])
    sel = pred[:, T - K:]  # (B, K)
    labels = torch.roll(input_ids, -1, dims=1)[:, T - K:][sel]  # (N,)
    hf.once(model, check_prefix_support)  # before the head is hooked: the check needs whole logits
    with lm_head_at(model, sel.to(input_ids.device)):
        logits = prompt(model, input_ids, attention_mask, logits_to_keep=K).logits  # (N, V)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


# --------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _all_reduce_(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    step: int
    train_loss: float
    best: dict | None
    history: list[dict]
    stopped: str  # "steps", "early_stopping"
    out: Path | None


class CausalLMObjective:
    """What the loop optimizes, for decoder LMs: cross-entropy on the target tokens only.

    The loop asks an objective three things, so other model families and tasks (encoder-decoder,
    classification) plug in without a branch here:
      count(data, i)  -> the units row i adds to the normalizer (target tokens here)
      loss(prompt, model, data, rows, pad_id, device) -> (summed loss, units) over those rows
      metrics(trainer) -> extra eval metrics (here: generation scores with --eval-generate)
    """

    no_generation_metrics: frozenset = frozenset()  # metrics this objective gives without eval_generate

    def count(self, data: TokenizedData, i: int) -> int:
        return data.n_target[i]

    def loss(self, prompt, model, data: TokenizedData, rows: list[int], pad_id: int, device) -> tuple[torch.Tensor, int]:
        ids, mask, tmask = collate([data.ids[i] for i in rows], [data.n_target[i] for i in rows], pad_id)
        return target_loss(prompt, model, ids.to(device), mask.to(device), tmask.to(device))

    def evaluate_groups(self):
        """The multi-reference generate-and-score function for this model family."""
        from softprompt.loops.evaluate import evaluate_groups

        return evaluate_groups

    def metrics(self, trainer: "Trainer", batch_size: int) -> dict:
        cfg = trainer.cfg
        if not (cfg.eval_generate and trainer.eval_groups):
            return {}
        scores = self.evaluate_groups()(trainer.model, trainer.tok, trainer.eval_groups[:cfg.eval_generate],
                                 trainer.prompt.to_kv_prefix(trainer.model), max_new_tokens=cfg.eval_max_new_tokens,
                                 batch_size=batch_size)
        return {k: v for k, v in scores.items() if k != "predictions"}


@torch.no_grad()
def eval_loss(prompt, model, data: TokenizedData, batch_size: int, pad_id: int, objective=None) -> float:
    objective = objective or CausalLMObjective()
    order = sorted(range(len(data)), key=lambda i: -len(data.ids[i]))
    total, n = 0.0, 0
    dev = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        loss, k = objective.loss(prompt, model, data, order[s:s + batch_size], pad_id, dev)
        total, n = total + float(loss), n + k
    return total / max(n, 1)


@dataclass(frozen=True)
class TrainerOutput:
    """What a run hands the loop besides the model, data and config: where it writes and who else
    hears of it. The defaults: nothing written, one process, no bar."""

    out: str | os.PathLike | None = None  # checkpoints, metrics.jsonl, plot.png, best/ and last/ here
    # Writes the best and last artifacts under `out` (softprompt.io.artifact.save_artifact, handed
    # down by the run: the loop sits below the artifact format); None: checkpoints and metrics only.
    save: object = None
    card: dict | None = None  # extra card fields for the artifacts (e.g. {"dataset": path})
    reporter: object = None  # experiment trackers (tracking.Reporters): the rows metrics.jsonl gets
    progress: bool = False
    dist: Dist = Dist()


class Trainer:
    """Holds the state of one run; `run()` trains to `cfg.steps` or early stopping."""

    def __init__(self, model, tokenizer, prompt, train_data: TokenizedData, cfg: TrainConfig,
                 eval_data: TokenizedData | None = None, eval_groups: list | None = None, objective=None,
                 output: TrainerOutput | None = None):
        if cfg.lr is None:  # the method's measured learning rate, which its config knows
            from dataclasses import replace

            from softprompt.methods.config import default_lr_of

            cfg = replace(cfg, lr=default_lr_of(prompt))
        self.objective = objective or CausalLMObjective()
        if getattr(model, "softprompt_quantize", None):  # int8 matmuls have no gradient
            raise ValueError(f"cannot train on a {model.softprompt_quantize}-quantized base: it is for serving and "
                             "evaluation; train without --quantize (the artifact then serves on either)")
        if cfg.metric not in ("eval_loss", *self.objective.no_generation_metrics) and not cfg.eval_generate:
            raise ValueError(f"metric {cfg.metric} needs --eval-generate N (inputs to generate for)")
        self.model, self.tok, self.prompt, self.data, self.cfg = model, tokenizer, prompt, train_data, cfg
        self.eval_data, self.eval_groups = eval_data, eval_groups
        output = output or TrainerOutput()
        self.dist = output.dist
        self.out = Path(output.out) if output.out is not None else None
        self.progress, self.card = output.progress, dict(output.card or {})
        self.reporter = output.reporter
        self.save = output.save
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {self.dist.world} processes")
        self.params = [p for p in prompt.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the prompt has no trainable parameters")
        # A prompt may split its parameters into groups whose lr is a fixed multiple of the schedule's
        # (`lr_scale`): a classifier's head learns at the linear probe's rate whatever the prompt's lr.
        groups = prompt.param_groups(cfg.lr) if hasattr(prompt, "param_groups") else [{"params": self.params}]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        self.step = 0
        self.best: dict | None = None
        self.bad_evals = 0
        self.history: list[dict] = []
        self._epoch_cache: tuple[int, list] | None = None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    # --- data position: a pure function of the step, so resuming needs only the step --------
    def global_batch(self, step: int) -> list[int]:
        n = len(self.data)
        per_epoch = math.ceil(n / self.cfg.batch_size)
        epoch, j = divmod(step, per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = length_grouped_batches(self.data.lengths, self.cfg.batch_size, self.cfg.seed, epoch)
            self._epoch_cache = (epoch, batches)
        batch = self._epoch_cache[1][j]
        return sorted(batch, key=lambda i: -len(self.data.ids[i]))

    def _my_micro_batches(self, batch: list[int]) -> list[list[int]]:
        w, r = self.dist.world, self.dist.rank
        per = math.ceil(len(batch) / w)
        mine = batch[r * per:(r + 1) * per]
        m = self.cfg.micro_batch_size or max(len(mine), 1)
        return [mine[s:s + m] for s in range(0, len(mine), m)]

    # --- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, dev = self.cfg, next(self.model.parameters()).device
        batch = self.global_batch(self.step)
        n_global = sum(self.objective.count(self.data, i) for i in batch)
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), dtype=torch.float64)
        self.prompt.train()
        with gradient_checkpointing(self.model, cfg.gradient_checkpointing):
            for mb in self._my_micro_batches(batch):
                loss, _ = self.objective.loss(self.prompt, self.model, self.data, mb, self.pad_id, dev)
                (loss / n_global).backward()
                loss_sum += loss.detach().double().cpu()
        for p in self.params:  # a process whose share of the batch was empty has no grads
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.world > 1:
            total = loss_sum.to(self.params[0].grad.device)  # one all-reduce for grads and loss (NCCL: on GPU)
            _all_reduce_([p.grad for p in self.params] + [total])
            loss_sum = total.cpu()
        loss_val = float(loss_sum) / n_global
        if not math.isfinite(loss_val):
            where = self._last_checkpoint_note()
            raise TrainingError(f"loss is {loss_val} at step {self.step + 1} (lr {lr:.3g}); training stopped "
                                f"before the update. {where} Lower --lr or --max-grad-norm and resume.")
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not math.isfinite(float(gnorm)):  # a finite loss can still overflow in the backward pass
            where = self._last_checkpoint_note()
            raise TrainingError(f"gradient norm is {float(gnorm)} at step {self.step + 1} (lr {lr:.3g}, loss "
                                f"{loss_val:.4g}); training stopped before the update. {where} Lower --lr or "
                                "--max-grad-norm and resume.")
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": loss_val, "lr": lr, "grad_norm": float(gnorm),
                "target_tokens": n_global, "tokens": sum(len(self.data.ids[i]) for i in batch)}

    def _last_checkpoint_note(self) -> str:
        if self.out is None:
            return ""
        found = ckpt.list_checkpoints(self.out / "checkpoints")
        return f"The last good checkpoint is {found[-1]}." if found else "No checkpoint was written yet."

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.prompt.eval()
        row: dict = {"step": self.step}
        bs = max(self.cfg.micro_batch_size or self.cfg.batch_size, 1)
        if self.eval_data is not None:
            row["eval_loss"] = eval_loss(self.prompt, self.model, self.eval_data, bs, self.pad_id, self.objective)
        row.update(self.objective.metrics(self, bs))
        self.prompt.train()
        return row

    def _improved(self, row: dict) -> bool:
        m = self.cfg.metric
        if m not in row:
            return False
        if self.best is None:
            return True
        return row[m] > self.best[m] if m in HIGHER_IS_BETTER else row[m] < self.best[m]

    # --- checkpoints --------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict, dict]:
        tensors = {f"prompt/{k}": v for k, v in self.prompt.state_dict().items()}
        ot, ometa = ckpt.optimizer_to_flat(self.opt)
        rt, rmeta = ckpt.rng_to_flat()
        state = {"optimizer": ometa, "rng": rmeta, "best": self.best, "bad_evals": self.bad_evals,
                 "config": asdict(self.cfg), "world": self.dist.world, "n_train": len(self.data),
                 "data_sha256": self.data_fingerprint()}
        return tensors | ot | rt, state

    def data_fingerprint(self) -> str:
        """sha256 of the training rows' tokens (and targets or labels): a resume on other data is refused."""
        if not hasattr(self, "_data_sha"):
            import hashlib

            h = hashlib.sha256()
            for field in ("ids", "n_target", "labels"):
                h.update(json.dumps(getattr(self.data, field, None)).encode())
            self._data_sha = h.hexdigest()
        return self._data_sha

    def save_checkpoint(self) -> Path | None:
        if self.out is None or not self.dist.main:
            return None
        tensors, state = self.state_tensors()
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, tensors, state, self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the newest good checkpoint in OUT/checkpoints; False if there is none."""
        found = ckpt.latest_checkpoint(self.out / "checkpoints") if self.out is not None else None
        if found is None:
            return False
        path, tensors, state = found
        saved = state["config"]
        for key in ("batch_size", "seed", "lr", "schedule", "warmup_steps", "steps"):
            if saved.get(key) != getattr(self.cfg, key):
                raise TrainingError(f"--resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                                    f"{getattr(self.cfg, key)!r}; use the same options, or a new --out")
        if state.get("n_train") != len(self.data):
            raise TrainingError(f"--resume: {path} was trained on {state.get('n_train')} rows, this data has "
                                f"{len(self.data)}; use the same data, or a new --out")
        if state.get("data_sha256", self.data_fingerprint()) != self.data_fingerprint():  # older: no digest
            raise TrainingError(f"--resume: {path} was trained on other data (same {len(self.data)} rows, other "
                                "tokens or labels); use the same data, or a new --out")
        self.prompt.load_state_dict({k.removeprefix("prompt/"): v for k, v in tensors.items() if k.startswith("prompt/")})
        ckpt.optimizer_from_flat(self.opt, tensors, state["optimizer"])
        ckpt.rng_from_flat(tensors, state["rng"])
        self.step, self.best, self.bad_evals = int(state["step"]), state["best"], int(state["bad_evals"])
        self.history = [r for r in _read_jsonl(self.out / "metrics.jsonl") if r.get("step", 0) <= self.step]
        if self.dist.main:
            _write_jsonl(self.out / "metrics.jsonl", self.history)
        return True

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.main
        if self.out is not None and main:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        stopped, t0, tok_window = "steps", time.perf_counter(), 0
        last = None
        try:
            while self.step < cfg.steps:
                row = self.train_step()
                tok_window += row["target_tokens"]
                now = time.perf_counter()
                row["target_tokens_per_s"] = tok_window / max(now - t0, 1e-9)
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['target_tokens_per_s']:.0f}")
                do_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps
                if do_eval and (self.eval_data is not None or (cfg.eval_generate and self.eval_groups)):
                    ev = self.evaluate()
                    row.update(ev)
                    if self._improved(ev):
                        self.best, self.bad_evals = dict(ev), 0
                        self._save_artifact("best", ev)
                    else:
                        self.bad_evals += 1
                    if bar is not None:
                        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in ev.items()))
                self._log(row)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.patience and self.bad_evals >= cfg.patience:
                    stopped = "early_stopping"
                    break
        finally:
            if bar is not None:
                bar.close()
        if self.best is None:  # no evaluation: the last prompt is the best we know
            self._save_artifact("best", {})
        self._save_artifact("last", {"train_loss": last["loss"]} if last else {})
        if self.out is not None and main:
            plot_history(self.history, self.out / "plot.png", cfg.metric if cfg.metric != "eval_loss" else None)
        return TrainResult(self.step, last["loss"] if last else float("nan"), self.best, self.history, stopped, self.out)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.out is not None and self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.reporter is not None and self.dist.main:
            self.reporter.log(row, row.get("step", self.step))

    def _save_artifact(self, name: str, metrics: dict) -> None:
        if self.out is None or self.save is None or not self.dist.main:
            return
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"trained_steps": self.step}
        # The plot is drawn when the run ends, at a known place: the card names it now (absolute, so
        # a copy of the artifact in a store still finds it) for the playground and `softprompt card`.
        extra = {"plot": str((self.out / "plot.png").resolve())}
        self.save(self.prompt, self.out / name, self.model, metrics=metrics, dataset=self.card.get("dataset"),
                  extra=extra)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill: everything after it is gone too
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_history(history: list[dict], path: Path, metric: str | None = None) -> Path | None:
    """PNG: train loss (and its running mean) and eval loss per step; the eval metric on the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in history if "loss" in r]
    loss = [r["loss"] for r in history if "loss" in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    w = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - w + 1):i + 1]) / len(loss[max(0, i - w + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss (mean of {w})")
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    handles, labels = ax.get_legend_handles_labels()
    metric = metric or next((m for m in ("bleu", "rouge_l", "accuracy", "exact_match")
                             if any(m in r for r in history)), None)
    mv = [(r["step"], r[metric]) for r in history if metric and metric in r]
    if mv:
        ax2 = ax.twinx()
        ax2.plot(*zip(*mv), "s--", color="tab:green", label=f"eval {metric}")
        ax2.set_ylabel(metric)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# `softprompt.loops.train(...)` calls the public API's train (softprompt/runs/api.py): see softprompt._CallableModule.
