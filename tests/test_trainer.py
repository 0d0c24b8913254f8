"""The trainer against real parts: accelerate launch (2 CPU processes, gloo), moto S3, real corpora."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import make_gmm_corpus as make_corpus
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TRAJFLOW = str(BIN / "trajflow")
# accelerate 1.x runs `launch --cpu --num_processes 2` as ONE process unless MPI is set up; on a machine
# without CUDA, `--multi_gpu --num_processes 2` starts 2 torchrun processes that Accelerator(cpu=True)
# joins as DistributedType.MULTI_CPU over gloo: real 2-process CPU DDP (the test asserts both ranks ran).
ACCELERATE = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trajflow"]


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--stages", "8,4", "--batch-size", "32", "--init", "scratch",
            "--student-width", "64", "--student-depth", "2", "--no-progress", "--log-every", "1", *extra]


def read_consumed(log_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(log_dir.glob("rank-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def run(cmd, env=None, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return r


def test_two_process_training_on_moto_uses_each_sample_once(s3_bucket, s3_env, tmp_path):
    data = make_corpus(f"s3://{s3_bucket}/latent10", 512, 64)
    env = {**os.environ, **s3_env}
    log = tmp_path / "consumed"
    # 2 ranks x 32 = 64 per step -> 8 steps is exactly one epoch; 2 DataLoader workers per rank
    r = run([*ACCELERATE, *train_args(data, f"s3://{s3_bucket}/runs/r1", "--max-steps", "8", "--num-workers", "2",
                                      "--consumed-log", str(log), "--cache-dir", str(tmp_path / "cache"))], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_consumed(log)
    assert {row["rank"] for row in rows} == {0, 1} and len(rows) == 16
    indices = [i for row in rows for i in row["indices"]]
    assert sorted(indices) == list(range(512))  # every sample of the epoch exactly once, across ranks and workers
    ranks = {rk: sum(len(row["indices"]) for row in rows if row["rank"] == rk) for rk in (0, 1)}
    assert ranks == {0: 256, 1: 256}
    import s3fs

    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{s3_bucket}/runs/r1/student/student.safetensors")
    assert fs.exists(f"{s3_bucket}/runs/r1/checkpoints/latest.json")


def test_kill_and_resume_replays_the_same_order_and_weights(tmp_path, gmm_corpus):
    data = gmm_corpus(512, 64)
    common = ["--max-steps", "24", "--checkpoint-every", "4"]
    ra = run([TRAJFLOW, *train_args(data, str(tmp_path / "a"), *common, "--consumed-log", str(tmp_path / "la"))])
    assert ra.returncode == 0, ra.stderr[-3000:]
    # run B is killed after its step-8 checkpoint, then resumed by the same command
    cmd_b = [TRAJFLOW, *train_args(data, str(tmp_path / "b"), *common, "--consumed-log", str(tmp_path / "lb"))]
    proc = subprocess.Popen(cmd_b, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    latest = tmp_path / "b" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 8:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 8 <= killed_at < 24
    rb = run(cmd_b)
    assert rb.returncode == 0, rb.stderr[-3000:]
    assert f"at step {killed_at}" in rb.stdout
    a_rows = {row["step"]: row for row in read_consumed(tmp_path / "la")}
    b_rows = {}
    for row in read_consumed(tmp_path / "lb"):
        b_rows[row["step"]] = row  # the resumed run's record of a step wins over the killed run's
    assert sorted(a_rows) == sorted(b_rows) == list(range(24))
    for s in range(24):
        assert a_rows[s]["positions"] == b_rows[s]["positions"] and a_rows[s]["epoch"] == b_rows[s]["epoch"]
    wa = load_file(tmp_path / "a" / "checkpoints" / "step-00000024" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoints" / "step-00000024" / "model.safetensors")
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


def test_resume_with_a_different_world_size_covers_the_epoch_once(tmp_path, gmm_corpus):
    data = gmm_corpus(512, 64)
    log = tmp_path / "log"
    out = str(tmp_path / "run")
    # 1 process x 32: 4 steps consume positions 0..127; then 2 processes x 32 finish the epoch in 6 steps
    r1 = run([TRAJFLOW, *train_args(data, out, "--max-steps", "4", "--consumed-log", str(log))])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run([*ACCELERATE, *train_args(data, out, "--max-steps", "10", "--consumed-log", str(log))])
    assert r2.returncode == 0, r2.stderr[-3000:]
    rows = read_consumed(log)
    assert all(row["epoch"] == 0 for row in rows)
    indices = [i for row in rows for i in row["indices"]]
    assert sorted(indices) == list(range(512))


def test_corrupt_shard_stops_by_default_and_is_counted_under_skip(tmp_path):
    data = make_corpus(str(tmp_path / "corpus"), 256, 64)
    shard = tmp_path / "corpus" / "shards" / "shard-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[5000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = run([TRAJFLOW, *train_args(data, str(tmp_path / "a"), "--max-steps", "8", "--cache-dir", str(tmp_path / "c1"))])
    assert r.returncode == 1 and "shard-000002" in r.stderr, r.stderr[-3000:]
    r = run([TRAJFLOW, *train_args(data, str(tmp_path / "b"), "--max-steps", "8", "--on-corrupt", "skip",
                                   "--cache-dir", str(tmp_path / "c2"))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped samples 64" in r.stdout


def test_bad_flags_exit_2(tmp_path):
    r = run([TRAJFLOW, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--stages", "8,3"])
    assert r.returncode == 2 and "divide" in r.stderr
    r = run([TRAJFLOW, "train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.returncode == 1 and "nothing" in r.stderr


def _train_in_process(data, out, **kw):
    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    cfg = TrainConfig(data=data, out=str(out), stages=(4,), init="scratch", student_width=64, student_depth=2,
                      progress=False, log_every=1, num_workers=0, checkpoint_every=2, **kw)
    t = Trainer(cfg).build()
    try:
        t.train()
        t.export_student()
    finally:
        t.close()
    return load_file(str(out / "student" / "student.safetensors"))


def test_gradient_accumulation_matches_the_larger_batch_and_resumes_on_a_step_boundary(tmp_path, gmm_corpus):
    """K=2 micro-batches of 32 = one batch of 64: the same samples per optimizer step, the same windows,
    the same weights (float tolerance); a run stopped after step 2 and resumed equals an uninterrupted one."""
    import torch

    data = gmm_corpus(512, 64)
    big = _train_in_process(data, tmp_path / "big", batch_size=64, max_steps=4, consumed_log=str(tmp_path / "lb"))
    acc = _train_in_process(data, tmp_path / "acc", batch_size=32, gradient_accumulation_steps=2, max_steps=4,
                            consumed_log=str(tmp_path / "la"))
    steps_big = {r["step"]: r["indices"] for r in read_consumed(tmp_path / "lb")}
    steps_acc: dict[int, list[int]] = {}
    for r in read_consumed(tmp_path / "la"):
        steps_acc.setdefault(r["step"], []).extend(r["indices"])
    assert steps_big == steps_acc and len(steps_acc) == 4 and all(len(v) == 64 for v in steps_acc.values())
    assert big.keys() == acc.keys()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-5)
    # stopped after its step-2 checkpoint, then resumed to step 4: the same weights as the uninterrupted run
    _train_in_process(data, tmp_path / "resumed", batch_size=32, gradient_accumulation_steps=2, max_steps=2)
    resumed = _train_in_process(data, tmp_path / "resumed", batch_size=32, gradient_accumulation_steps=2,
                                max_steps=4)
    assert all(torch.equal(resumed[k], acc[k]) for k in acc)


def test_a_checkpoint_from_before_partitioned_streaming_resumes_with_default_flags(tmp_path, gmm_corpus):
    """A run saved with the global order and a version-1 stream state (trajflow before partitioned streaming)
    resumes with no new flag: the order comes from the checkpoint, and the run equals an uninterrupted one."""
    import torch

    data = gmm_corpus(256, 64)
    whole = _train_in_process(data, tmp_path / "whole", batch_size=32, max_steps=4, stream_order="global")
    _train_in_process(data, tmp_path / "old", batch_size=32, max_steps=2, stream_order="global")
    state_file = tmp_path / "old" / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["data"] = {k: v for k, v in state["data"].items() if k not in ("order", "partitions")} | {"version": 1}
    state_file.write_text(json.dumps(state))  # as the previous release wrote it
    resumed = _train_in_process(data, tmp_path / "old", batch_size=32, max_steps=4)  # no --stream-order
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
