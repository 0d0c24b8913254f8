"""The live teacher pool on a real local Ray cluster (Ray Serve), and training that mixes in its rollouts."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(gmm_corpus):
    return gmm_corpus(256, 64)


def _train_cfg(data, out, **kw):
    from trainer.config import TrainConfig

    base = dict(data=data, out=out, stages=(8, 4), max_steps=30, batch_size=32, init="scratch", student_width=64,
                student_depth=2, progress=False, log_every=1, checkpoint_every=1000, ota_ratio=0.25, ota_timeout=20)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def _wait_running(pool, name, replicas, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = pool.pool_status(name)
        if st["running_replicas"] >= replicas and len(pool.replica_actor_names(name)) >= replicas:
            return st
        time.sleep(0.5)
    raise AssertionError(f"pool {name} did not get back to {replicas} replicas: {pool.pool_status(name)}")


def test_pool_up_status_down_serves_exact_rollouts(ray_cluster, capsys):
    from flowcore.rollout import LocalRollout
    from models.registry import build_teacher
    from pipeline import pool
    from trajflow.cli import main

    assert main(["pool", "up", "--teacher", "gmm:latent10", "--replicas", "2", "--cpus-per-replica", "0.5",
                 "--name", "p-basic"]) == 0
    assert "RUNNING, 2 running replicas" in capsys.readouterr().out
    client = pool.PoolClient("p-basic")
    local = LocalRollout(build_teacher("gmm:latent10"))
    assert client.fingerprint() == local.fingerprint()
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    grid = torch.linspace(1, 0, 9, dtype=torch.float64).expand(8, -1)
    cls, guid = torch.arange(8) % 10, torch.linspace(1, 3, 8)
    futures = [client.submit(x, grid, [0, 4, 8], cls, guid) for _ in range(6)]  # concurrent: batched by Serve
    ref = local.submit(x, grid, [0, 4, 8], cls, guid).result(60)
    for f in futures:
        torch.testing.assert_close(f.result(60), ref, rtol=0, atol=0)
    assert main(["pool", "status", "--name", "p-basic", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["status"] == "RUNNING" and st["running_replicas"] == 2 and st["rollouts"] >= 1
    assert main(["pool", "down", "--name", "p-basic"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["pool", "status", "--name", "p-basic"]) == 1
    assert "NOT_RUNNING" in capsys.readouterr().out
    with pytest.raises(pool.PoolError, match="no teacher pool named"):
        pool.PoolClient("p-basic")
    assert main(["pool", "up", "--name", "p-basic"]) == 2  # no --teacher
    assert main(["pool", "up", "--teacher", "nope:x"]) == 2
    client.close()


def test_training_mixes_rollouts_in_both_modes_and_survives_a_killed_replica(ray_cluster, corpus, tmp_path):
    import ray

    from pipeline import pool
    from trainer.loop import Trainer

    pool.pool_up("gmm:latent10", name="p-train", replicas=2, cpus_per_replica=0.5)
    client = pool.PoolClient("p-train", timeout_s=20)
    for mode in ("fresh", "student"):
        out = tmp_path / mode
        t = Trainer(_train_cfg(corpus, str(out), ota_mode=mode, max_steps=120 if mode == "fresh" else 30),
                    client).build()
        killed = {}
        if mode == "fresh":
            def kill_one(t=t, killed=killed):  # once rollouts flow, kill a replica under the running trainer
                while t.part("online").stats["ota_samples"] == 0:
                    time.sleep(0.05)
                killed["at_samples"] = t.part("online").stats["ota_samples"]
                ray.kill(ray.get_actor(pool.replica_actor_names("p-train")[0], namespace="serve"))

            killer = threading.Thread(target=kill_one, daemon=True)
            killer.start()
        last = t.train()
        t.close()
        rows = _metrics(out)
        assert t.step == t.total_steps and last["stage"] == 4
        assert rows[-1]["ota_samples"] > 0, rows[-1]
        if mode == "fresh":
            killer.join(10)
            assert "at_samples" in killed
            assert rows[-1]["ota_samples"] > killed["at_samples"]  # mixing went on after the kill
    st = _wait_running(pool, "p-train", 2)  # Serve replaced the killed replica
    assert st["status"] == "RUNNING"
    x = torch.randn(2, 4, 8, 8)
    assert client.submit(x, torch.tensor([[1.0, 0.5, 0.0]] * 2, dtype=torch.float64), [0, 2],
                         torch.tensor([0, 1]), 1.0).result(60).shape == (2, 2, 4, 8, 8)
    client.close()
    pool.pool_down("p-train")


def test_pool_stopped_mid_run_training_finishes_on_the_corpus_with_shortfall(ray_cluster, corpus, tmp_path):
    from pipeline import pool
    from trainer.loop import Trainer

    pool.pool_up("gmm:latent10", name="p-stop", replicas=1, cpus_per_replica=0.5)
    client = pool.PoolClient("p-stop", timeout_s=5)
    out = tmp_path / "stop"
    t = Trainer(_train_cfg(corpus, str(out), max_steps=400, batch_size=64, student_width=256), client).build()
    # the pool goes down right after the first step that mixed in rollouts, inside the run (a thread racing the
    # loop lost whenever the 400 steps finished before the shutdown reached the trainer)
    after_step, stopped = t._after_step, []

    def stop_after_first_rollouts(last, bar, samples):
        after_step(last, bar, samples)
        if not stopped and last.get("ota_samples", 0) > 0:
            pool.pool_down("p-stop")
            stopped.append(t.step)

    t._after_step = stop_after_first_rollouts
    with pytest.warns(UserWarning, match="training continues on the corpus"):
        last = t.train()
    t.close()
    assert stopped and stopped[0] < 400 and t.step == 400
    assert last["ota_samples"] > 0 and last["ota_shortfall"] > 0
    assert last["ota_failures"] + last["ota_timeouts"] >= 1
    client.close()


def test_cli_train_with_an_embedded_pool(corpus, tmp_path, capsys):
    """No --address: `trajflow train` starts a pool on an embedded local Ray for the run (own process)."""
    import subprocess
    import sys

    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "trajflow", "train", "--data", corpus, "--out", str(out), "--stages", "8,4",
                        "--batch-size", "32", "--init", "scratch", "--student-width", "64", "--student-depth", "2",
                        "--max-steps", "20", "--ota-ratio", "0.25", "--ota-mode", "student", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "online samples" in r.stdout
    assert (out / "student" / "student.safetensors").exists()
    assert _metrics(out)[-1]["ota_samples"] > 0
