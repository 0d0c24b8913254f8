"""Reliability of `trajflow generate` (issue 16): never succeed on a corpus that lost data.

Real parts only: a real local Ray cluster (the ``ray_cluster`` fixture), moto's S3 server over HTTP
(directly, or behind tests/s3_fault_proxy.py for outages and latency), real ``kill -9`` of the
committer actor's process, real files on disk (a file-size rlimit for a disk that fills up).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import S3_ENV
from s3_fault_proxy import FaultPolicy, FaultRule, S3FaultProxy

from pipeline.config import GenerateConfig
from pipeline.driver import GenerationFailed, build_card, ensure_card, prepare_corpus, run_generation
from pipeline.storage import ObjectStore
from storage_schemas import DatasetCard, ShardCommit, manifest_from_parquet_bytes
from storage_schemas.audit import audit_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))
SMALL = dict(teacher="gmm:latent10", num_trajectories=256, shard_size=32, num_steps=16, stages=(8, 4),
             num_workers=1, progress=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_shards(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


def assert_manifest_matches_objects(objects: dict[str, bytes], num_shards: int) -> None:
    """Every manifest row names a stored object with its recorded size and sha256; the card is there."""
    assert "dataset.json" in objects
    DatasetCard.from_json(objects["dataset.json"])
    rows = manifest_from_parquet_bytes(objects["manifest.parquet"])
    assert [r.shard_id for r in rows] == [f"shard-{n:06d}" for n in range(num_shards)]
    for row in rows:
        assert row.path in objects, f"the manifest names {row.path}, which is not stored"
        data = objects[row.path]
        assert (len(data), sha(data)) == (row.num_bytes, row.sha256), row.path
        commit = ShardCommit.from_json(objects[f"commits/{row.shard_id}.json"])
        assert (commit.sha256, commit.num_bytes) == (row.sha256, row.num_bytes)


def local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def s3_objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = s3_client(endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def s3_options(endpoint: str, attempts: int = 2) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint},
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": attempts}}}


# ------------------------------------------------------------------------------------------------
# 1. resume and finalize verify what they trust


def test_resume_regenerates_deleted_truncated_and_with_sha256_corrupted_shards(ray_cluster, tmp_path):
    out = tmp_path / "c"
    first = run_generation(GenerateConfig(**SMALL, out=str(out)))
    assert first.committed_now == 8
    clean = local_shards(out)
    (out / "shards/shard-000001.tar").unlink()  # deleted; its commit record stays
    data = clean["shard-000003.tar"]
    (out / "shards/shard-000003.tar").write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(clean["shard-000005.tar"])
    flipped[len(flipped) // 2] ^= 0xFF
    (out / "shards/shard-000005.tar").write_bytes(bytes(flipped))  # same size, other bytes
    (out / "dataset.json").unlink()  # the card is gone too: it is rewritten (deterministic)

    again = run_generation(GenerateConfig(**SMALL, out=str(out)))
    assert (again.committed_now, again.skipped, again.regenerated) == (2, 6, 2)
    assert "2 lost or damaged shards regenerated" in again.line()
    now = local_shards(out)
    assert now["shard-000001.tar"] == clean["shard-000001.tar"]
    assert now["shard-000003.tar"] == clean["shard-000003.tar"]
    assert now["shard-000005.tar"] == bytes(flipped)  # a size check cannot see this one...

    # ... the sha256 re-check does, through the CLI flag (exit 0 only once the corpus is whole)
    env = {**os.environ, "RAY_ADDRESS": ""}
    args = [TRAJFLOW, "generate", "--teacher", "gmm:latent10", "--num-trajectories", "256", "--shard-size", "32",
            "--num-steps", "16", "--stages", "8,4", "--no-progress", "--out", str(out), "--verify-sha256"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(1 committed now, 7 already committed)" in r.stdout and "1 lost or damaged shards regenerated" in r.stdout
    assert "shard-000005" in r.stderr  # the warning names it
    assert local_shards(out) == clean
    objects = local_objects(out)
    assert_manifest_matches_objects(objects, 8)
    assert audit_corpus(str(out)).exit_status == 0


def test_s3_outage_that_empties_the_bucket_mid_run_is_regenerated(ray_cluster, moto_endpoint, s3_env, s3_bucket):
    """The bucket is emptied (every object, card and records included) behind a 5 s outage (503 on
    every request) while the run is going: the run still ends with a whole corpus, identical to a
    clean run's, or it fails; it never reports success with a manifest naming missing shards."""
    cfg_kw = dict(SMALL, num_trajectories=384, num_steps=256, max_retries=3)
    ref = run_generation(GenerateConfig(**cfg_kw, out=f"s3://{s3_bucket}/ref",
                                        storage_options=s3_options(moto_endpoint)),
                         worker_env={**S3_ENV, "AWS_ENDPOINT_URL": moto_endpoint})
    assert ref.committed_now == 12
    reference = s3_objects(moto_endpoint, s3_bucket, "ref")
    policy = FaultPolicy([], seed=3)
    events: list[str] = []
    stop = threading.Event()
    s3 = s3_client(moto_endpoint)

    def outage():
        while not stop.is_set():
            listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="run/commits/").get("KeyCount", 0)
            if listed >= 3:
                break
            time.sleep(0.05)
        else:
            return
        policy.rules.append(FaultRule("error", statuses=(503,), name="outage"))
        events.append(f"outage with {listed} commits")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="run/"):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=s3_bucket, Key=obj["Key"])
        time.sleep(5)
        policy.rules.clear()
        events.append("storage back, empty")

    with S3FaultProxy(moto_endpoint, policy) as proxy:
        th = threading.Thread(target=outage)
        th.start()
        try:
            summary = run_generation(GenerateConfig(**cfg_kw, out=f"s3://{s3_bucket}/run",
                                                    storage_options=s3_options(proxy.url)),
                                     worker_env={**S3_ENV, "AWS_ENDPOINT_URL": proxy.url}, run_name="outage")
        finally:
            stop.set()
            th.join()
    print(events, summary.line(), policy.summary())
    assert events == [events[0], "storage back, empty"] and events[0].startswith("outage with")
    assert summary.regenerated >= 3  # what was committed before the wipe was found missing and redone
    got = s3_objects(moto_endpoint, s3_bucket, "run")
    assert_manifest_matches_objects(got, 12)
    for n in range(12):
        key = f"shards/shard-{n:06d}.tar"
        assert got[key] == reference[key], key
    assert DatasetCard.from_json(got["dataset.json"]).fingerprint() == \
        DatasetCard.from_json(reference["dataset.json"]).fingerprint()


def test_objects_that_keep_vanishing_fail_the_run_without_a_manifest(ray_cluster, tmp_path):
    """Storage that loses every shard right after it is committed: the job fails (exit 1 in the CLI)
    after bounded rounds of regenerating, and leaves no manifest."""
    out = tmp_path / "leaky"
    stop = threading.Event()

    def eat():
        while not stop.is_set():
            for p in (out / "shards").glob("shard-000002.tar") if (out / "shards").exists() else []:
                if (out / "commits" / "shard-000002.json").exists():
                    p.unlink(missing_ok=True)
            time.sleep(0.01)

    th = threading.Thread(target=eat)
    th.start()
    try:
        with pytest.raises(GenerationFailed, match="shard-000002.*keep vanishing"):
            run_generation(GenerateConfig(**SMALL, out=str(out), max_retries=1))
    finally:
        stop.set()
        th.join()
    assert not (out / "manifest.parquet").exists()


# ------------------------------------------------------------------------------------------------
# 2. a dead committer is replaced and its shards requeued


def _kill_committers(run_name: str, root: Path, at_commits: list[int], killed: list, stop: threading.Event):
    import ray

    for number, threshold in enumerate(at_commits, start=1):
        while not stop.is_set() and len(list((root / "commits").glob("*.json"))) < threshold:
            time.sleep(0.02)
        if stop.is_set():
            return
        try:
            actor = ray.get_actor(f"trajflow-{run_name}-committer-{number}", namespace="trajflow")
            pid = ray.get(actor.pid.remote(), timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except Exception as e:  # noqa: BLE001 - reported by the assertion
            killed.append(repr(e))
            return


def test_killed_committer_is_replaced_and_the_corpus_is_identical(ray_cluster, tmp_path):
    # ~0.3 s of solving per shard: commits wait on solves, so a killed committer holds queued commits
    # whose solve is still pending (the case that used to lose shards)
    base = dict(SMALL, num_trajectories=512, num_steps=512)
    clean = tmp_path / "clean"
    run_generation(GenerateConfig(**base, out=str(clean)))
    out = tmp_path / "killed"
    stop, killed = threading.Event(), []
    th = threading.Thread(target=_kill_committers, args=("ckill", out, [2, 7], killed, stop))
    th.start()
    try:
        summary = run_generation(GenerateConfig(**base, out=str(out)), run_name="ckill")
    finally:
        stop.set()
        th.join()
    print(killed, summary.line())
    assert len(killed) == 2 and all(isinstance(k, int) for k in killed), killed
    assert summary.committers_replaced == 2 and summary.committed_now == 16
    assert local_shards(out) == local_shards(clean)
    assert_manifest_matches_objects(local_objects(out), 16)


# ------------------------------------------------------------------------------------------------
# 3. create-only card; atomic manifest


class LatencyPolicy(FaultPolicy):
    """Forwards every request after ``delay`` seconds when its path matches ``pattern``."""

    def __init__(self, pattern: str, delay: float):
        super().__init__([])
        self.pattern, self.delay = pattern, delay

    def decide(self, method, path):
        if self.pattern in path:
            time.sleep(self.delay)
        return super().decide(method, path)


def _card(cfg: GenerateConfig) -> DatasetCard:
    from pipeline.worker import GenerationWorker

    return build_card(cfg, GenerationWorker(cfg.to_dict()).describe(), None)


def _race(fn_a, fn_b) -> list[BaseException | None]:
    barrier = threading.Barrier(2)
    results: list[BaseException | None] = [None, None]

    def run(i, fn):
        barrier.wait()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - collected
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate((fn_a, fn_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_card_create_only_on_s3_with_latency_exactly_one_config_wins(moto_endpoint, s3_env, s3_bucket):
    a_cfg = GenerateConfig(**SMALL, out="x", base_seed=1)
    b_cfg = GenerateConfig(**SMALL, out="x", base_seed=2)
    card_a, card_b = _card(a_cfg), _card(b_cfg)
    policy = LatencyPolicy("dataset.json", 0.3)  # every card request takes 0.3 s: the old check-then-write lost
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        for i in range(3):
            url = f"s3://{s3_bucket}/race{i}"
            stores = [ObjectStore(url, s3_options(proxy.url)) for _ in range(2)]
            results = _race(lambda s=stores: prepare_corpus(s[0], card_a), lambda s=stores: prepare_corpus(s[1], card_b))
            failed = [r for r in results if r is not None]
            assert len(failed) == 1, results
            assert isinstance(failed[0], GenerationFailed) and "different config" in str(failed[0])
            assert "run.base_seed" in str(failed[0])
            winner = card_a if results[0] is None else card_b
            stored = DatasetCard.from_json(s3_objects(moto_endpoint, s3_bucket, f"race{i}")["dataset.json"])
            assert stored.fingerprint() == winner.fingerprint()
        # the same config twice, concurrently: both proceed
        url = f"s3://{s3_bucket}/same"
        stores = [ObjectStore(url, s3_options(proxy.url)) for _ in range(2)]
        assert _race(lambda: prepare_corpus(stores[0], card_a), lambda: prepare_corpus(stores[1], card_a)) == \
            [None, None]
    assert policy.requests["PUT"] >= 8


def test_card_create_only_on_a_local_disk(tmp_path):
    card_a = _card(GenerateConfig(**SMALL, out="x", base_seed=1))
    card_b = _card(GenerateConfig(**SMALL, out="x", base_seed=2))
    for i in range(20):
        root = tmp_path / f"r{i}"
        results = _race(lambda r=root: ensure_card(ObjectStore(str(r)), card_a),
                        lambda r=root: ensure_card(ObjectStore(str(r)), card_b))
        failed = [r for r in results if r is not None]
        assert len(failed) == 1 and "different config" in str(failed[0]), results
        assert sorted(p.name for p in root.iterdir()) == ["dataset.json"]  # no temporary left behind
    root = tmp_path / "same"
    assert _race(lambda: ensure_card(ObjectStore(str(root)), card_a),
                 lambda: ensure_card(ObjectStore(str(root)), card_a)) == [None, None]


def test_two_runs_with_different_seeds_on_one_s3_root_exactly_one_proceeds(ray_cluster, moto_endpoint, s3_env,
                                                                         s3_bucket):
    policy = LatencyPolicy("dataset.json", 0.5)
    results: dict[int, object] = {}
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        url = f"s3://{s3_bucket}/both"
        kw = dict(SMALL, num_trajectories=128, out=url, storage_options=s3_options(proxy.url))
        barrier = threading.Barrier(2)

        def run(seed):
            barrier.wait()
            try:
                results[seed] = run_generation(GenerateConfig(**kw, base_seed=seed),
                                               worker_env={**S3_ENV, "AWS_ENDPOINT_URL": proxy.url},
                                               run_name=f"race-{seed}")
            except BaseException as e:  # noqa: BLE001 - collected
                results[seed] = e

        threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    errors = {s: r for s, r in results.items() if isinstance(r, BaseException)}
    assert len(errors) == 1, results
    (loser, error), = errors.items()
    assert isinstance(error, GenerationFailed) and "different config" in str(error) and "base_seed" in str(error)
    report = audit_corpus(url, storage_options=s3_options(moto_endpoint), progress=False)
    assert report.exit_status == 0, [p.kind for p in report.problems]
    card = DatasetCard.from_json(s3_objects(moto_endpoint, s3_bucket, "both")["dataset.json"])
    assert card.run["base_seed"] == 3 - loser


def test_manifest_write_on_a_full_disk_leaves_the_previous_manifest_whole(ray_cluster, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) while the
    manifest is rewritten: the old manifest is left whole and no temporary file remains."""
    out = tmp_path / "c"
    run_generation(GenerateConfig(**SMALL, out=str(out)))
    before = (out / "manifest.parquet").read_bytes()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from pipeline.storage import ObjectStore, StorageError\n"
        "store = ObjectStore(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "try:\n"
        "    store.write_atomic('manifest.parquet', b'x' * 5000)\n"
        "except StorageError as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "File too large" in r.stdout
    assert (out / "manifest.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["commits", "dataset.json", "manifest.parquet", "shards"]


# ------------------------------------------------------------------------------------------------
# 5. (pipeline side) a symlink inside a local corpus root is refused, never followed or written through


def test_generate_refuses_a_symlinked_shard_in_a_local_root(ray_cluster, tmp_path):
    out = tmp_path / "c"
    run_generation(GenerateConfig(**SMALL, out=str(out)))
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"not yours")
    (out / "shards/shard-000004.tar").unlink()
    (out / "shards/shard-000004.tar").symlink_to(outside)
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([TRAJFLOW, "generate", "--teacher", "gmm:latent10", "--num-trajectories", "256",
                        "--shard-size", "32", "--num-steps", "16", "--stages", "8,4", "--no-progress",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("trajflow generate: error:") and "symbolic link" in last and "shard-000004" in last
    assert outside.read_bytes() == b"not yours"



def test_verify_sha256_is_a_flag_for_generate_and_submit():
    from pipeline.submit import parse_generate_args
    from trajflow.cli import build_parser, generate_config_from_args

    argv = ["--teacher", "gmm:ring2d", "--num-trajectories", "8", "--out", "/tmp/x", "--verify-sha256"]
    args = build_parser().parse_args(["generate", *argv])
    assert generate_config_from_args(args).verify_sha256 is True
    assert generate_config_from_args(build_parser().parse_args(["generate", *argv[:-1]])).verify_sha256 is False
    gen = parse_generate_args(argv)
    assert gen.values["verify_sha256"] is True and gen.tokens[-1] == "--verify-sha256"
    assert "--verify-sha256" in gen.entrypoint()


def test_resume_check_drops_the_records_and_the_stale_manifest_of_lost_shards(ray_cluster, tmp_path):
    """Before anything is regenerated, the records of a lost shard and the manifest naming it are gone:
    a resume that dies right after its check leaves a corpus that is honestly not finalized."""
    out = tmp_path / "c"
    run_generation(GenerateConfig(**SMALL, out=str(out)))
    (out / "shards/shard-000006.tar").unlink()
    cfg = GenerateConfig(**SMALL, out=str(out))
    lost: dict[str, str] = {}
    kept = prepare_corpus(ObjectStore(str(out)), _card(cfg), lost=lost)
    assert sorted(kept) == [f"shard-{n:06d}" for n in range(8) if n != 6]
    assert list(lost) == ["shard-000006"] and "missing" in lost["shard-000006"]
    assert not (out / "commits/shard-000006.json").exists() and not (out / "manifest.parquet").exists()
    assert audit_corpus(str(out)).exit_status == 1  # not_finalized, until the re-run completes
    assert run_generation(cfg).committed_now == 1
    assert audit_corpus(str(out), deep=True).exit_status == 0
