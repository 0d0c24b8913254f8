"""The validation split (issue 14): generated as the plan's last shards, marked in the card and the manifest,
never trained on, evaluated while training, and the best weights exported by default."""

from __future__ import annotations

import json

from fixtures import make_gmm_corpus as make_corpus

from models.flownet import load_flow_net
from storage_schemas import manifest_validation_ids
from trainer.config import TrainConfig
from trainer.data import open_corpus
from trainer.loop import Trainer
from trainer.validation import load_validation


def _train(data, out, **kw):
    cfg = TrainConfig(data=data, out=str(out), stages=(4,), init="scratch", student_width=64, student_depth=2,
                      batch_size=32, progress=False, log_every=1, num_workers=0, checkpoint_every=100, **kw)
    t = Trainer(cfg).build()
    try:
        t.train()
        t.export_student()
    finally:
        t.close()
    _, extra = load_flow_net(out / "student" / "student.safetensors")
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return extra, rows


def test_split_is_marked_never_trained_on_evaluated_and_the_best_is_exported(tmp_path):
    data = make_corpus(str(tmp_path / "corpus"), 512, 64, stages=(8, 4), validation=64)
    card = open_corpus(data, split="all").card
    assert card.validation_shard_ids == ["shard-000007"] and card.run["validation_shards"] == 1
    assert manifest_validation_ids((tmp_path / "corpus" / "manifest.parquet").read_bytes()) == ["shard-000007"]
    assert [c.shard_id for c in open_corpus(data, split="validation").shards] == ["shard-000007"]
    assert "shard-000007" not in {c.shard_id for c in open_corpus(data).shards}
    val = load_validation(data)
    assert val.size == 64 and sorted(val.batch["index"].tolist()) == list(range(448, 512))

    extra, rows = _train(data, tmp_path / "run", max_steps=30, eval_every=10,
                         consumed_log=str(tmp_path / "log"))
    consumed = [i for line in (tmp_path / "log" / "rank-0.jsonl").read_text().splitlines()
                for i in json.loads(line)["indices"]]
    assert consumed and max(consumed) < 448  # not one validation trajectory was trained on
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["val_steps"] == 4 and r["val_coupling_error"] > 0 and len(
        [k for k in r if k.startswith("val_window_")]) == 4 for r in evals)
    best = min(evals, key=lambda r: r["val_coupling_error"])
    assert extra["selected"] == "best" and extra["best_step"] == best["step"]
    assert extra["validation"]["coupling_error"] == best["val_coupling_error"]
    assert extra["num_inference_steps"] == 4

    extra_last, _ = _train(data, tmp_path / "run-last", max_steps=30, eval_every=10, export="last")
    assert extra_last["selected"] == "last" and "best_step" not in extra_last


def test_a_corpus_without_a_split_trains_on_everything_and_exports_the_last_weights(tmp_path, capsys):
    data = make_corpus(str(tmp_path / "corpus"), 256, 64, stages=(8, 4), validation=0)
    assert load_validation(data) is None and len(open_corpus(data).shards) == 4
    extra, rows = _train(data, tmp_path / "run", max_steps=8)
    assert extra["selected"] == "last" and not any(r.get("eval") for r in rows)
    assert "no validation split" in capsys.readouterr().err


def test_eval_defaults_to_the_students_step_count_and_reports_the_teacher_there(tmp_path, capsys):
    from trajflow.cli import main

    data = make_corpus(str(tmp_path / "corpus"), 256, 64, stages=(8, 4, 2), validation=64)
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), stages=(4, 2), init="scratch", student_width=32,
                      student_depth=1, batch_size=32, max_steps=6, progress=False, num_workers=0)
    t = Trainer(cfg).build()
    try:
        t.train()
        t.export_student()
    finally:
        t.close()
    capsys.readouterr()
    assert main(["eval", "--student", str(tmp_path / "run"), "--num-samples", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["student"]) == ["2_steps"]  # the 8,4,2-style schedule's last stage: a 2-step student
    assert {"2_steps", "2_steps_diffusers_default_grid", "32_steps"} <= set(report["teacher"])
