"""Experiment tracking: `softprompt train --report-to tensorboard,mlflow,wandb`.

Each tracker gets, through its own client, the same rows as metrics.jsonl (every number in a row,
at the row's step), the run's config (what run.json holds) when the run starts, and the final
artifact (OUT/best) when it ends. The libraries are optional extras (`pip install
'softprompt[track]'`); a missing one is a one-line error before training starts.

Where each writes: TensorBoard event files in OUT/tensorboard; MLflow to $MLFLOW_TRACKING_URI
(a server, `sqlite:///mlflow.db`, or a `file://` folder with MLFLOW_ALLOW_FILE_STORE=true), experiment $MLFLOW_EXPERIMENT_NAME or "softprompt"; W&B to project
$WANDB_PROJECT or "softprompt", with files under OUT (WANDB_MODE=offline keeps it local).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(values) -> list[str]:
    """`--report-to` values (repeatable, each comma-separated) -> tracker names, in order, once each."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for v in values or ():
        for name in (x.strip().lower() for x in v.split(",")):
            if not name or name == "none":
                continue
            if name not in TRACKERS:
                raise ValueError(f"--report-to takes {', '.join(TRACKERS)} (comma-separated or repeated), got {name!r}")
            if name not in names:
                names.append(name)
    return names


def numbers(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row (what trackers plot); `step` is the x axis, not a series."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _missing(name: str) -> ValueError:
    return ValueError(f"--report-to {name} needs the {PACKAGE[name]} package: pip install "
                      f"'softprompt[track]' (or pip install {PACKAGE[name]})")


class TensorBoard:
    def __init__(self, out: Path, config: dict, run_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, row: dict, step: int) -> None:
        for k, v in numbers(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self, artifact: Path | None, failed: bool) -> None:
        # TensorBoard keeps no files: the artifact's place is recorded beside the numbers
        if artifact is not None and not failed:
            self.writer.add_text("artifact", str(artifact.resolve()))
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, config: dict, run_name: str):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow") from None
        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "softprompt")
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))[:6000]
                           for k, v in flatten(config).items()})
        mlflow.log_dict(config, "run.json")

    def log(self, row: dict, step: int) -> None:
        self.mlflow.log_metrics(numbers(row), step=step)

    def close(self, artifact: Path | None, failed: bool) -> None:
        if artifact is not None and not failed and artifact.exists():
            if artifact.is_dir():
                self.mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
            else:
                self.mlflow.log_artifact(str(artifact))
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class WandB:
    def __init__(self, out: Path, config: dict, run_name: str):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "softprompt", name=run_name, config=config,
                              dir=str(out), reinit="finish_previous")

    def log(self, row: dict, step: int) -> None:
        self.run.log(numbers(row), step=step)

    def close(self, artifact: Path | None, failed: bool) -> None:
        if artifact is not None and not failed and artifact.exists():
            art = self.wandb.Artifact(f"{self.run.name or 'softprompt'}-best".replace("/", "-"), type="model")
            art.add_dir(str(artifact)) if artifact.is_dir() else art.add_file(str(artifact))
            self.run.log_artifact(art)
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1} (MLflow's params are flat)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Reporters:
    """The trackers of one run: `log(row, step)` where metrics.jsonl gets a row, `close(...)` at the end."""

    def __init__(self, names, out: str | os.PathLike, config: dict):
        self.names = parse_report_to(names)
        out = Path(out)
        run_name = out.resolve().name
        self.backends = []
        try:
            for name in self.names:  # a missing package or a refused setting fails here, before any training
                try:
                    self.backends.append(BACKENDS[name](out, config, run_name))
                except ValueError:
                    raise
                except Exception as e:  # the tracker's own refusal (e.g. MLflow's about its store): one line
                    raise ValueError(f"--report-to {name}: {type(e).__name__}: {e}") from e
        except BaseException:
            self.close(None, failed=True)
            raise

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log(self, row: dict, step: int) -> None:
        for b in self.backends:
            b.log(row, step)

    def close(self, artifact: Path | None, failed: bool = False) -> None:
        backends, self.backends = self.backends, []
        for b in backends:
            b.close(artifact, failed)
