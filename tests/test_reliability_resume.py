"""Issue 25 through `trajflow train` (findings 1, 5 and 8 as a user meets them): a damaged checkpoint file falls
back to the previous complete checkpoint with a warning naming the file, damaged best weights are ignored with a
warning, and a run owns its --out (a second live run exits 1 with one line; a killed run's lock does not block)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
TRAJFLOW = str(Path(sys.executable).parent / "trajflow")


@pytest.fixture(scope="module")
def corpus(gmm_corpus):
    return gmm_corpus(96, 32, stages=(4,), validation=32)


def _args(data, out, *extra):
    return [TRAJFLOW, "train", "--data", data, "--out", str(out), "--stages", "4", "--batch-size", "16", "--init",
            "scratch", "--student-width", "32", "--student-depth", "1", "--no-progress", "--num-workers", "0",
            "--objective", "windows", *extra]


def _train(data, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(_args(data, out, *extra), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("trajflow ") and " error: " in ln]


def test_a_truncated_weight_file_of_the_newest_checkpoint_falls_back_to_the_one_before(corpus, tmp_path):
    out = tmp_path / "run"
    r = _train(corpus, out, "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    bad = out / "checkpoints" / "step-00000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    r = _train(corpus, out, "--max-steps", "6", "--checkpoint-every", "2", "--eval-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000002 at step 2" in r.stdout, r.stdout
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    # the run went on from step 2 and re-wrote step 4: every file whole again
    assert set(load_file(bad)) == set(load_file(out / "checkpoints" / "step-00000002" / "model.safetensors"))


def test_every_checkpoint_damaged_stops_with_one_line_naming_the_file(corpus, tmp_path):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-steps", "2", "--checkpoint-every", "2", "--eval-every", "0").returncode == 0
    bad = out / "checkpoints" / "step-00000002" / "optimizer.pt"
    bad.write_bytes(b"\x00" * 10)
    r = _train(corpus, out, "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "0")
    lines = _errors(r.stderr)
    assert r.returncode == 1 and len(lines) == 1 and "optimizer.pt" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["empty", "truncated", "meta"])
def test_damaged_best_weights_are_ignored_with_a_warning_and_rewritten(corpus, tmp_path, damage):
    out = tmp_path / "run"
    assert _train(corpus, out, "--max-steps", "4", "--checkpoint-every", "3", "--eval-every", "1").returncode == 0
    best = out / "checkpoints" / "best" / ("best.json" if damage == "meta" else "weights.safetensors")
    data = best.read_bytes()
    best.write_bytes(b"" if damage == "empty" else (b"[" * 100_000 if damage == "meta" else data[: len(data) - 7]))
    r = _train(corpus, out, "--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(best) in r.stderr and "ignored" in r.stderr and "Traceback" not in r.stderr
    w = load_file(out / "checkpoints" / "best" / "weights.safetensors")  # a later evaluation wrote whole ones
    assert all(bool(torch.isfinite(v).all()) for v in w.values())
    assert json.loads((out / "checkpoints" / "best" / "best.json").read_text())["step"] > 3


def test_a_second_live_run_on_the_same_out_exits_1_and_a_killed_runs_lock_does_not_block(corpus, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_args(corpus, out, "--max-steps", "100000", "--checkpoint-every", "50",
                                   "--eval-every", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        owner = out / "checkpoints" / "owner.json"
        deadline = time.time() + 240
        while not owner.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert owner.exists(), first.communicate(timeout=60)[1][-3000:] if first.poll() is not None else "no lock"
        second = _train(corpus, out, "--max-steps", "3", "--eval-every", "0")
        lines = _errors(second.stderr)
        assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
        assert "owner.json" in lines[0] and str(first.pid) in lines[0], lines[0]
        assert first.poll() is None  # the owner goes on
    finally:
        first.kill()
        first.communicate(timeout=60)
    # the killed run left its lock behind (no release): its pid is dead on this host, so a rerun takes over
    doc = json.loads(owner.read_text())
    assert doc["pid"] == first.pid and doc["host"] == socket.gethostname()
    r = _train(corpus, out, "--max-steps", "3", "--checkpoint-every", "1", "--eval-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not owner.exists()  # released at the end of the run
