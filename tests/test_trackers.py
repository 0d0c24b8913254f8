"""--report-to: the same scalars as logs/metrics.jsonl reach TensorBoard, Weights & Biases (offline mode)
and MLflow (a local file store), through accelerate's trackers. No network."""

from __future__ import annotations

import json

import pytest
from test_trainer import make_corpus

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
    from trainer.loop import tracker_names

    with pytest.raises(ValueError, match="choose from tensorboard, wandb, mlflow, all, none"):
        tracker_names("neptune")
    assert tracker_names("none") == [] and tracker_names("tensorboard,tensorboard") == ["tensorboard"]
