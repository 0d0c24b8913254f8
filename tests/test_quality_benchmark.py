"""benchmarks/quality.py on a GMM spec it has never seen: the whole harness (pipeline corpus, every method
trained by the real trainer, exact evaluation) at a tiny budget, and its errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.slow
def test_quality_benchmark_runs_on_an_unseen_gmm_and_prints_the_table(tmp_path):
    g = torch.Generator().manual_seed(11)
    spec = {"name": "unseen3", "sample_shape": [3], "means": (torch.randn(4, 3, generator=g) * 2).tolist(),
            "stds": [0.3, 0.2, 0.4, 0.25], "weights": [1, 1, 2, 1], "classes": [0, 1, 1, 2]}
    path = tmp_path / "unseen3.json"
    path.write_text(json.dumps(spec))
    r = _run("--teacher", f"gmm:{path}", "--methods", "2-rectified-flow,perflow,trajflow-2step,trajflow", "--steps", "20",
             "--batch-size", "64", "--trajectories", "512", "--num-samples", "300", "--out", str(tmp_path / "b"),
             "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    cells = {(row["method"], row["steps"]) for row in out["rows"]}
    for method in ("teacher (corrected grid)", "teacher (diffusers default grid)", "2-rectified-flow", "perflow"):
        for steps in (1, 2, 4):
            assert (method, steps) in cells, (method, steps)
    # trajflow's students at their own step count only: the 4-step one (8 -> 4) and the 2-step one (8 -> 4 -> 2)
    assert {s for m, s in cells if m == "trajflow"} == {4} and {s for m, s in cells if m == "trajflow-2step"} == {2}
    assert ("teacher (corrected grid)", 32) in cells
    for row in out["rows"]:
        assert all(row[m] is not None and row[m] == row[m] for m in ("coupling_error", "swd", "nll_per_dim"))
        assert 0.0 <= row["class_accuracy"] <= 1.0
    assert set(out["targets"]) >= {"trajflow_4_swd_within_1.05x_teacher_32", "trajflow_beats_perflow_swd_at_4",
                                   "trajflow_2_beats_teacher_2_coupling", "trajflow_beats_2-rectified-flow_swd_at_2"}
    assert out["training"]["perflow"]["ota_samples"] > 0  # PeRFlow-style windows are all online


def test_quality_benchmark_rejects_bad_input(tmp_path):
    r = _run("--teacher", f"gmm:{tmp_path / 'missing.json'}")
    assert r.returncode != 0 and "quality.py: error" in r.stderr
    r = _run("--teacher", "flownet:/x.safetensors")
    assert r.returncode != 0 and "needs a GMM teacher" in r.stderr
    r = _run("--methods", "nope")
    assert r.returncode != 0 and "unknown methods" in r.stderr
