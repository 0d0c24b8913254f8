"""benchmarks/sd3_scale.py (the GPU-scale SD3 benchmark) runs its whole code path at tiny size on CPU
and prints one JSON object with every part: bare solves, pipeline vs bare, LoRA and full trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_prints_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sd3_scale.py"), "--size", "tiny", "--device", "cpu",
                        "--resolution", "16", "--num-steps", "4", "--stages", "2", "--batch-sizes", "1,2",
                        "--num-trajectories", "8", "--shard-size", "4", "--gen-batch-size", "4",
                        "--train-batch-size", "2", "--train-steps", "1", "--lora-rank", "2", "--threads", "1",
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "sd3_scale" and out["latent_shape"] == [4, 8, 8] and out["shift"] == 3.0
    assert [row["batch_size"] for row in out["bare_solves"]] == [1, 2]
    assert all(row["trajectories_per_s"] > 0 for row in out["bare_solves"])
    assert out["pipeline_vs_bare"]["ratio_pipeline_over_bare"] > 0
    lora, full, ratio = out["trainer"]
    assert lora["lora_rank"] == 2 and lora["trainable_parameters"] < lora["parameters"]
    assert full["lora_rank"] is None and full["trainable_parameters"] == full["parameters"]
    assert ratio["ratio_lora_over_full_step_time"] > 0
    assert (tmp_path / "work" / "corpus" / "manifest.parquet").exists()
