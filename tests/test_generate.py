"""Generation pipeline against real parts: moto S3 over HTTP, a real local Ray cluster, plain WebDataset."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import GenerateConfig, build_config, load_config_file
from pipeline.driver import GenerationFailed, run_generation
from pipeline.plan import ShardPlan, sample_seed
from pipeline.worker import GenerationWorker
from storage_schemas import DatasetCard, iter_shard_samples, manifest_from_parquet_bytes

pytestmark = pytest.mark.slow
TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))


def _corpus_files(root: Path) -> dict[str, bytes]:
    """Every shard's bytes plus the manifest rows (without commit times) of a local corpus."""
    out = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}
    rows = manifest_from_parquet_bytes((root / "manifest.parquet").read_bytes())
    out["manifest"] = json.dumps([{k: v for k, v in r.to_dict().items() if k != "committed_at"} for r in rows]).encode()
    out["dataset.json"] = json.dumps({k: v for k, v in json.loads((root / "dataset.json").read_text()).items()
                                      if k != "created_by"}).encode()
    return out


def test_shard_plan_is_pure_and_exact():
    plan = ShardPlan(1000, 64, base_seed=7, guidance=(1.0, 4.0), classes=tuple(range(10)))
    assert plan.num_shards == 16
    indices = [i for n in range(plan.num_shards) for i in plan.shard_indices(n)]
    assert indices == list(range(1000))
    seeds = [plan.sample(i).seed for i in range(1000)]
    assert len(set(seeds)) == 1000 and seeds[5] == sample_seed(7, 5)
    assert plan.sample(3) == ShardPlan(1000, 64, 7, (1.0, 4.0), tuple(range(10))).sample(3)
    g = [plan.sample(i).guidance for i in range(1000)]
    assert 1.0 <= min(g) and max(g) <= 4.0 and len(set(g)) > 900
    with pytest.raises(IndexError):
        plan.shard_indices(16)


def test_worker_without_ray_is_deterministic_and_authentic(tmp_path):
    cfg = dict(teacher="gmm:latent10", out=str(tmp_path / "c"), num_trajectories=40, shard_size=16,
               num_steps=16, stages=(8, 4), guidance="1.5:3.0")
    a = GenerationWorker(cfg).shard_bytes(1)
    b = GenerationWorker({**cfg, "out": str(tmp_path / "other")}).shard_bytes(1)
    assert a == b  # a retried shard is byte-identical
    recs = list(iter_shard_samples(a, "shard-000001"))
    assert [r.index for r in recs] == list(range(16, 32))
    # the stored states are the teacher's own solver states: re-solve one sample independently
    from flowcore.schedules import shifted_sigmas
    from flowcore.solvers import seeded_noise, solve_teacher
    from models.gmm import GMMTeacher, load_preset

    r = recs[3]
    t = GMMTeacher(load_preset("latent10"))
    traj = solve_teacher(t, seeded_noise([r.seed], t.sample_shape), shifted_sigmas(16), cond=torch.tensor([r.meta["class_id"]]),
                         guidance=torch.tensor([r.guidance]), capture_sigmas=r.sigmas.double().tolist())
    torch.testing.assert_close(traj.states_BKX[0], r.states)
    # the last shard is short
    assert len(list(iter_shard_samples(GenerationWorker(cfg).shard_bytes(2), "shard-000002"))) == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_committer_writes_exactly_the_records_path_shard(tmp_path, dtype):
    import numpy as np

    from pipeline.worker import ShardCommitter
    from storage_schemas import NonFiniteError, write_shard_bytes

    out = tmp_path / "c"
    cfg = dict(teacher="gmm:latent10", out=str(out), num_trajectories=24, shard_size=16, num_steps=16,
               stages=(8, 4), guidance="1.5:3.0", dtype=dtype)
    worker = GenerationWorker(cfg)
    expected = write_shard_bytes(worker.solve_shard(1))  # one validated SampleRecord per sample
    payload = worker.solve_payload(1)
    assert isinstance(payload["states"], np.ndarray)  # numpy travels through Ray's object store as is
    payload["states"].setflags(write=False)  # as the committer gets it: read-only, in the object store
    commit = ShardCommitter(str(out), niceness=0).commit(payload, "f" * 64)
    stored = (out / commit["path"]).read_bytes()
    assert stored == expected
    assert commit["sha256"] == hashlib.sha256(expected).hexdigest() and commit["num_bytes"] == len(expected)
    assert (commit["num_samples"], commit["first_index"], commit["last_index"]) == (8, 16, 23)
    assert json.loads((out / "commits" / "shard-000001.json").read_text())["sha256"] == commit["sha256"]
    # a bad sample is refused before anything is stored
    bad = worker.solve_payload(0)
    bad["states"][5, 1, 0, 0, 0] = bad["states"][0, 0, 0, 0, 1] * np.inf if dtype != "bfloat16" else 0x7FC0
    with pytest.raises(NonFiniteError, match="sample '0000000005'"):
        ShardCommitter(str(out), niceness=0).commit(bad, "f" * 64)
    assert not (out / "shards" / "shard-000000.tar").exists() and not (out / "commits" / "shard-000000.json").exists()


def test_config_file_and_flag_errors(tmp_path):
    f = tmp_path / "gen.toml"
    f.write_text('teacher = "gmm:ring2d"\nnum-trajectories = 100\nout = "/tmp/x"\nguidance = "1:2"\n')
    cfg = build_config(load_config_file(str(f)), {"num_trajectories": 50, "shard_size": None})
    assert cfg.num_trajectories == 50 and cfg.guidance == (1.0, 2.0) and cfg.shard_size == 256
    (tmp_path / "bad.json").write_text('{"teacher": "gmm:ring2d", "colour": 1}')
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        load_config_file(str(tmp_path / "bad.json"))
    for kwargs, msg in [
        (dict(teacher="nope", out="x", num_trajectories=1), "bad teacher spec"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=0), "positive integer"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=8, num_steps=30), "multiple"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=8, stages=(8, 3)), "divide"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=8, guidance="4:1"), "min <= max"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=8, saved_sigmas=(1.0, 0.33, 0.0)), "not points"),
        (dict(teacher="gmm:ring2d", out="x", num_trajectories=8, dtype="int8"), "dtype"),
    ]:
        with pytest.raises(ValueError, match=msg):
            GenerateConfig(**kwargs)
    with pytest.raises(ValueError, match="required"):
        build_config({}, {"teacher": "gmm:ring2d"})


def test_cli_bad_flags_exit_2(tmp_path):
    r = subprocess.run([TRAJFLOW, "generate", "--teacher", "gmm:ring2d", "--out", str(tmp_path),
                        "--num-trajectories", "10", "--num-steps", "30"], capture_output=True, text=True)
    assert r.returncode == 2 and "multiple" in r.stderr
    r = subprocess.run([TRAJFLOW, "generate", "--teacher", "gmm:ring2d"], capture_output=True, text=True)
    assert r.returncode == 2 and "required" in r.stderr
    r = subprocess.run([TRAJFLOW, "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--num-trajectories" in r.stdout and "example" in r.stdout


def test_generate_to_moto_s3_read_by_plain_webdataset(ray_cluster, s3_bucket, s3_env, tmp_path):
    import boto3
    import s3fs
    import webdataset as wds
    from safetensors.torch import load as st_load

    url = f"s3://{s3_bucket}/corpora/latent10"
    cfg = GenerateConfig(teacher="gmm:latent10", out=url, num_trajectories=512, shard_size=64, num_steps=16,
                         stages=(8, 4, 2), guidance="1.0:3.0", num_workers=2, gpus_per_worker=1, progress=False)
    summary = run_generation(cfg, worker_env=s3_env)
    assert summary.num_shards == 8 and summary.num_samples == 512 and summary.committed_now == 8

    fs = s3fs.S3FileSystem()
    rows = manifest_from_parquet_bytes(fs.cat_file(f"{url}/manifest.parquet"))
    assert len(rows) == 8 and sum(r.num_samples for r in rows) == 512
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    for r in rows:
        body = client.get_object(Bucket=s3_bucket, Key=f"corpora/latent10/{r.path}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == r.sha256 and len(body) == r.num_bytes
    card = DatasetCard.from_json(fs.cat_file(f"{url}/dataset.json"))
    assert card.num_saved_states == 9 and card.conditioning.kind == "class"

    # a reader we did not write: webdataset over presigned HTTP URLs (curl), safetensors decode
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": f"corpora/latent10/{r.path}"})
            for r in rows]
    keys, seeds, classes = set(), set(), []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        states = st_load(sample["traj.safetensors"])["states"]
        assert states.shape == (9, 4, 8, 8) and torch.isfinite(states).all()
        meta = json.loads(sample["json"])
        keys.add(sample["__key__"])
        seeds.add(meta["seed"])
        classes.append(meta["class_id"])
    assert len(keys) == 512 and len(seeds) == 512
    assert sorted(set(classes)) == list(range(10))

    # re-running the same command resumes: nothing to do, nothing duplicated
    again = run_generation(cfg, worker_env=s3_env)
    assert again.committed_now == 0 and again.skipped == 8
    assert len(fs.ls(f"{url}/shards")) == 8
    # a different config against the same corpus is refused, naming what differs
    with pytest.raises(GenerationFailed, match="different config.*guidance"):
        run_generation(GenerateConfig(**{**cfg.to_dict(), "guidance": 2.0}), worker_env=s3_env)


def _kill_worker_when_committed(root: Path, run_name: str, stop: threading.Event, killed: list):
    import ray

    while not stop.is_set():
        if len(list((root / "commits").glob("*.json"))) >= 1:
            try:
                actor = ray.get_actor(f"trajflow-{run_name}-worker-1", namespace="trajflow")
                pid = ray.get(actor.pid.remote(), timeout=30)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except Exception as e:  # noqa: BLE001 - reported through the assertion below
                killed.append(repr(e))
            return
        time.sleep(0.05)


def test_killed_worker_is_replaced_and_corpus_is_identical(ray_cluster, tmp_path):
    # ~0.3 s of solving per shard, so the kill lands mid-run
    base = dict(teacher="gmm:latent10", num_trajectories=768, shard_size=32, num_steps=512, stages=(8, 4),
                num_workers=2, gpus_per_worker=1, progress=False)
    clean = tmp_path / "clean"
    run_generation(GenerateConfig(**base, out=str(clean)))
    faulty = tmp_path / "faulty"
    stop, killed = threading.Event(), []
    th = threading.Thread(target=_kill_worker_when_committed, args=(faulty, "killtest", stop, killed))
    th.start()
    try:
        summary = run_generation(GenerateConfig(**base, out=str(faulty)), run_name="killtest")
    finally:
        stop.set()
        th.join()
    assert killed and isinstance(killed[0], int), killed
    assert summary.actors_replaced >= 1 and summary.retries >= 1
    assert _corpus_files(faulty) == _corpus_files(clean)


def test_killed_driver_resumes_to_the_clean_corpus(ray_cluster, tmp_path):
    args = ["generate", "--teacher", "gmm:latent10", "--num-trajectories", "640", "--shard-size", "32",
            "--num-steps", "64", "--stages", "8,4", "--num-workers", "1", "--no-progress"]
    clean = tmp_path / "clean"
    run_generation(GenerateConfig(teacher="gmm:latent10", num_trajectories=640, shard_size=32, num_steps=64,
                                  stages=(8, 4), out=str(clean), progress=False))
    out = tmp_path / "resumed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([TRAJFLOW, *args, "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "commits").glob("*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    proc.wait()
    partial = len(list((out / "commits").glob("*.json")))
    assert 3 <= partial < 20, partial
    assert not (out / "manifest.parquet").exists()
    r = subprocess.run([TRAJFLOW, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{partial} already committed" in r.stdout or "already committed" in r.stdout
    assert _corpus_files(out) == _corpus_files(clean)
