"""`softprompt train --report-to`: TensorBoard, MLflow and W&B get, through their own clients, the
numbers metrics.jsonl gets, the run's config and the final artifact (all offline)."""

import json

import pytest
from test_train import _jsonl, _save_tiny

from softprompt.cli import main
from softprompt.loops.tracking import numbers, parse_report_to


def test_report_to_takes_repeated_and_comma_separated_names():
    assert parse_report_to(["tensorboard,mlflow", "wandb", "mlflow"]) == ["tensorboard", "mlflow", "wandb"]
    assert parse_report_to(None) == [] and parse_report_to(["none"]) == []
    with pytest.raises(ValueError, match="got 'comet'"):
        parse_report_to(["tensorboard,comet"])
    assert numbers({"step": 3, "loss": 1.5, "ok": True, "note": "x", "tokens": 4}) == {"loss": 1.5, "tokens": 4.0}


def test_train_reports_to_tensorboard_mlflow_and_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database; a folder suffices here
    base, data, out = _save_tiny(tmp_path), _jsonl(tmp_path), tmp_path / "run"
    assert main(["train", str(data), str(out), "--base", str(base), "--method", "prefix_tuning", "--projection-dim", "0",
                 "--num-virtual-tokens", "2", "--steps", "3", "--batch-size", "4", "--eval-fraction", "0.2",
                 "--eval-every", "2", "--checkpoint-every", "0", "--no-progress",
                 "--report-to", "tensorboard,mlflow", "--report-to", "wandb"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_loss" in rows[1]

    # TensorBoard: every number of every row, at its step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for key in ("loss", "lr", "eval_loss"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx({r["step"]: r[key] for r in rows if key in r}, rel=1e-6), key

    # MLflow: the metrics' history, the config as params, the artifact
    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("softprompt").experiment_id])
    assert run.info.status == "FINISHED"
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert hist == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)
    assert float(run.data.params["train.lr"]) == json.loads((out / "run.json").read_text())["train"]["lr"]
    best = [a.path for a in client.list_artifacts(run.info.run_id, "best")]
    assert best and all(p.startswith("best/") for p in best)

    # W&B (offline): its own log file holds the rows, the config and the artifact
    [log] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    history = {}
    for r in (r.history for r in records if r.WhichOneof("record_type") == "history"):
        history[r.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.item}
    for row in rows:
        assert {k: history[row["step"]][k] for k in numbers(row)} == pytest.approx(numbers(row), rel=1e-6)
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {u.key for u in run_record.config.update} >= {"train", "method", "data"}
    [artifact] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and len(artifact.manifest.contents) >= 1


def wandb_records(path):
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of checksummed chunks
    after a 7-byte header), each a wandb Record protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_a_missing_tracker_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    base, data = _save_tiny(tmp_path), _jsonl(tmp_path)
    assert main(["train", str(data), str(tmp_path / "r"), "--base", str(base), "--steps", "1",
                 "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs the wandb package" in err and "softprompt[track]" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
