"""benchmarks/fsdp_memory.py runs its whole path (tiny SD3 pipeline and corpus built from configs, 2 accelerate-
launched gloo processes per side) and prints one JSON object: FSDP2 holds about half of DDP's per-rank parameter +
gradient + optimizer bytes, its shards add up to the full parameters, and both sides train the same first step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp2_holds_half_of_ddp_per_rank(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--steps", "1",
                        "--keep", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["benchmark"] == "fsdp_memory" and out["conditions"]["world_size"] == 2
    assert out["target_met"] and 0.49 < out["ratio_fsdp2_over_ddp"] <= 0.6
    assert out["shards_cover_params"]
    for side, sharded in (("ddp", 0), ("fsdp2", None)):
        rows = out[side]["per_rank"]
        assert [row["rank"] for row in rows] == [0, 1]
        for row in rows:
            s = row["student"]
            assert s["grad_bytes"] == s["param_bytes"] > 0  # every trainable parameter had its gradient
            assert s["optimizer_bytes"] >= 2 * s["param_bytes"]  # AdamW's exp_avg and exp_avg_sq
            assert s["sharded_params"] == (s["num_params"] if sharded is None else 0)
    assert out["losses"]["ddp"] == pytest.approx(out["losses"]["fsdp2"], rel=1e-4)
