"""--report-to: the same scalars as logs/metrics.jsonl reach TensorBoard, Weights & Biases (offline mode)
and MLflow (a local file store), through accelerate's trackers; and no tracker receives the command line or a
secret (issue 25, finding 2). No network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fixtures import make_gmm_corpus as make_corpus

from trainer.config import TrainConfig
from trainer.loop import Trainer


def test_report_to_all_writes_the_metrics_to_every_tracker(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    data = make_corpus(str(tmp_path / "corpus"), 128, 64, stages=(8, 4))
    out = tmp_path / "run"
    cfg = TrainConfig(data=data, out=str(out), stages=(4,), init="scratch", student_width=32, student_depth=1,
                      batch_size=32, max_steps=4, log_every=1, num_workers=0, progress=False, report_to="all")
    t = Trainer(cfg).build()
    try:
        t.train()
    finally:
        t.close()
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4
    # TensorBoard: an event file; W&B: an offline run with its history; MLflow: the loss at every step
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    client = mlflow.tracking.MlflowClient()
    (exp,) = client.search_experiments(filter_string="name = 'trajflow'")
    (run,) = client.search_runs([exp.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(losses)
    assert "storage_options" not in run.data.params  # the config, without secrets


def test_an_unknown_or_missing_tracker_is_a_clear_error(tmp_path):
    from trainer.trackers import tracker_names

    with pytest.raises(ValueError, match="choose from tensorboard, wandb, mlflow, all, none"):
        tracker_names("neptune")
    assert tracker_names("none") == [] and tracker_names("tensorboard,tensorboard") == ["tensorboard"]


# -- secrets: trackers never receive the command line, the storage options or credentials ------------------------

CANARY = "CANARYLOCAL42"
URL_CANARY = "CANARYURLPASS7"
QUERY_CANARY = "CANARYSIG99"


def _offline_trackers(monkeypatch, tmp_path: Path) -> None:
    """W&B offline and MLflow on a file store, every file either writes under ``tmp_path``."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _files_holding(root: Path, *needles: str) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


def _secret_argv(data: str, out: str) -> list[str]:
    return ["trajflow", "train", "--data", data, "--out", out, "--storage-options",
            json.dumps({"secret": CANARY}), "--cache-dir", f"s3://user:{URL_CANARY}@host/c?sig={QUERY_CANARY}",
            "--storage-options=" + json.dumps({"key": CANARY})]


def test_redacted_argv():
    from trainer.trackers import redacted_argv

    argv = _secret_argv("s3://b/c", "s3://b/r")[1:]
    shown = redacted_argv(argv)
    assert len(shown) == len(argv) and not any(c in " ".join(shown) for c in (CANARY, URL_CANARY, QUERY_CANARY))
    assert shown[:5] == ["train", "--data", "s3://b/c", "--out", "s3://b/r"]
    assert shown[5:7] == ["--storage-options", "***"] and shown[-1] == "--storage-options=***"


def test_start_trackers_gives_no_tracker_a_secret(tmp_path, monkeypatch):
    """The whole start of every tracker (TensorBoard, W&B offline, MLflow file store) with a secret in the
    command line, in the storage options and in a URL: no file anywhere under the run, the tracking store or
    the W&B folders holds one, while the W&B run file and MLflow's params are there (the grep can see them)."""
    from accelerate import Accelerator

    from trainer.config import TrainConfig
    from trainer.trackers import start_trackers, tracker_names

    _offline_trackers(monkeypatch, tmp_path)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", _secret_argv(str(tmp_path / "corpus"), str(out)))
    cfg = TrainConfig(data=str(tmp_path / "corpus"), out=str(out), report_to="all",
                      storage_options={"secret": CANARY, "client_kwargs": {"aws_secret_access_key": CANARY}},
                      cache_dir=f"s3://user:{URL_CANARY}@host/c?sig={QUERY_CANARY}")
    acc = Accelerator(cpu=True, log_with=tracker_names("all"), project_dir=str(out / "logs"))
    assert start_trackers(acc, cfg, str(out)) == ["tensorboard", "wandb", "mlflow"]
    acc.log({"loss": 0.5}, step=1)
    acc.end_training()
    assert sys.argv == _secret_argv(str(tmp_path / "corpus"), str(out))  # given back as it was
    (run_file,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"trajflow" in run_file.read_bytes() and b"loss" in run_file.read_bytes()
    assert list(tmp_path.joinpath("mlruns").rglob("params/lr"))
    assert _files_holding(tmp_path, CANARY, URL_CANARY, QUERY_CANARY) == []


def test_train_command_line_secret_reaches_no_tracker(tmp_path, monkeypatch):
    """Finding 2 end to end: `trajflow train --report-to all --storage-options '{"secret": ...}'` (the command
    line as the CLI sees it) leaves the secret in no file of the run, the MLflow store or the W&B folders."""
    from trajflow.cli import main

    _offline_trackers(monkeypatch, tmp_path)
    data = make_corpus(str(tmp_path / "corpus"), 64, 32, stages=(8, 4))
    out = tmp_path / "run"
    argv = ["train", "--data", data, "--out", str(out), "--stages", "4", "--batch-size", "16", "--max-steps", "2",
            "--eval-every", "0", "--num-workers", "0", "--no-progress", "--init", "scratch", "--student-width", "16",
            "--student-depth", "1", "--report-to", "all", "--storage-options", json.dumps({"secret": CANARY})]
    monkeypatch.setattr(sys, "argv", ["trajflow", *argv])
    assert main(argv) == 0
    assert list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert _files_holding(tmp_path, CANARY) == []
