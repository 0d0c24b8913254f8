"""Issue 25, finding 6 (the loss half): a finite flag that makes training diverge (``--lr 1e30``) stops the run at the
first non-finite loss or gradient with exit 1 and one line naming the step, and never exports non-finite weights;
the checkpoint written before stays finite and resumable."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.loop import NonFiniteLossError, Trainer

TRAJFLOW = str(Path(sys.executable).parent / "trajflow")


@pytest.fixture(scope="module")
def corpus(gmm_corpus):
    return gmm_corpus(64, 32, stages=(4,))


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(corpus, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([TRAJFLOW, "train", "--data", corpus, "--out", str(out), "--stages", "4", "--batch-size", "16",
                        "--max-steps", "6", "--checkpoint-every", "1", "--eval-every", "0", "--num-workers", "0",
                        "--no-progress", "--lr", "1e30", "--warmup-steps", "0", "--init", "scratch",
                        "--student-width", "64", "--student-depth", "2", "--objective", "windows"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and "training stopped at step" in lines[0] and "non-finite" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (out / "student").exists()  # nothing exported
    for ck in (out / "checkpoints").glob("step-*"):  # what was saved before the stop is finite
        for name in ("model.safetensors", "ema.safetensors"):
            for k, v in load_file(ck / name).items():
                assert bool(torch.isfinite(v).all()), f"{ck.name}/{name}:{k}"


def test_the_trainer_stops_before_the_step_that_would_make_the_weights_non_finite(corpus, tmp_path):
    cfg = TrainConfig(data=corpus, out=str(tmp_path / "t"), stages=(4,), max_steps=5, batch_size=16, init="scratch",
                      student_width=64, student_depth=2, progress=False, num_workers=0, eval_every=0,
                      objective="windows", lr=1e30, warmup_steps=0)
    t = Trainer(cfg).build()
    try:
        with pytest.raises(NonFiniteLossError, match=r"training stopped at step \d+"):
            t.train()
        weights = t.student.trainable_state_dict()
        assert all(bool(torch.isfinite(v).all()) for v in weights.values())
        assert 0 < t.step < 5
        assert all(math.isfinite(float(v.abs().max())) for v in t.ema.state_dict().values())
    finally:
        t.close()
