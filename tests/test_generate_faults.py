"""Generation against a faulty S3: a fault-injecting proxy (tests/s3_fault_proxy.py) in front of moto.

Real local Ray (the ``ray_cluster`` fixture), real HTTP, real s3fs/botocore. The workers reach S3
only through the proxy (``storage_options`` travel inside the config); every check of what was
stored reads moto directly, never through the proxy.

botocore is configured with ``retries={"mode": "standard", "total_max_attempts": 2}`` (one retry;
``total_max_attempts=1`` where a request keeps failing) in the storage options, so an injected
fault that botocore does not absorb reaches the pipeline's own retry layer (``with_retries`` / the
driver) quickly, and a request that keeps failing gives up in seconds rather than minutes (botocore's
default legacy mode makes 5 attempts with up to 8 s backoff, under each of with_retries' 6 attempts).
Note that s3fs itself also retries ``SlowDown`` (not ``InternalError``) up to 5 times.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import pytest
from conftest import S3_ENV
from s3_fault_proxy import FaultPolicy, FaultRule, S3FaultProxy

from pipeline.config import GenerateConfig
from pipeline.driver import GenerationFailed, run_generation
from pipeline.storage import StorageError
from storage_schemas import DatasetCard, ShardCommit, manifest_from_parquet_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NUM_SHARDS = 4
SHARD_KEYS = [f"shards/shard-{n:06d}.tar" for n in range(NUM_SHARDS)]


def make_config(out: str, endpoint: str, *, boto_attempts: int = 2, **overrides) -> GenerateConfig:
    kwargs = dict(
        teacher="gmm:latent10", out=out, num_trajectories=128, shard_size=32, num_steps=16, stages=(8, 4),
        num_workers=1, cpus_per_worker=1.0, max_retries=1, progress=False,
        storage_options={
            "client_kwargs": {"endpoint_url": endpoint},
            # (botocore reads a plain "max_attempts" here as the number of *retries*)
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": boto_attempts}},
        },
    )
    kwargs.update(overrides)
    return GenerateConfig(**kwargs)


def worker_env(endpoint: str) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}


def s3_client(moto_endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def read_objects(moto_endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` as {path relative to it: bytes}, read from moto directly."""
    s3 = s3_client(moto_endpoint)
    out: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def timeline(policy):
    t0 = policy.times[0] if policy.times else 0
    for (m, p, f), t in zip(policy.log, policy.times):
        print(f"  {t - t0:7.2f} {m:5} {p[-40:]:40} {f.action + str(f.status) if f else ''}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_commits_match_objects(objects: dict[str, bytes]) -> dict[str, ShardCommit]:
    """Every commit record's sha256/size equals the stored shard it names; returns them by shard id."""
    commits = {}
    for rel, data in objects.items():
        if rel.startswith("commits/"):
            c = ShardCommit.from_json(data)
            assert rel == f"commits/{c.shard_id}.json"
            assert c.path in objects, f"{rel} names {c.path}, which is not stored"
            assert sha(objects[c.path]) == c.sha256 and len(objects[c.path]) == c.num_bytes, rel
            commits[c.shard_id] = c
    return commits


@dataclass
class Corpus:
    bucket: str
    prefix: str
    objects: dict[str, bytes]


@pytest.fixture(scope="module")
def reference(ray_cluster, moto_endpoint) -> Corpus:
    """A fault-free run of the same config (straight to moto), to compare bytes against."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        bucket = f"tf-ref-{uuid.uuid4().hex[:8]}"
        s3_client(moto_endpoint).create_bucket(Bucket=bucket)
        summary = run_generation(make_config(f"s3://{bucket}/ref", moto_endpoint), worker_env=worker_env(moto_endpoint))
    assert summary.committed_now == NUM_SHARDS and summary.num_samples == 128
    objects = read_objects(moto_endpoint, bucket, "ref")
    assert set(SHARD_KEYS) <= set(objects) and "manifest.parquet" in objects
    return Corpus(bucket, "ref", objects)


def assert_same_corpus(got: dict[str, bytes], ref: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(ref)
    for key in SHARD_KEYS:
        assert got[key] == ref[key], f"{key} differs from the fault-free run"
    commits = check_commits_match_objects(got)
    assert sorted(commits) == [f"shard-{n:06d}" for n in range(NUM_SHARDS)]
    rows = manifest_from_parquet_bytes(got["manifest.parquet"])
    ref_rows = manifest_from_parquet_bytes(ref["manifest.parquet"])
    assert [r.shard_id for r in rows] == [f"shard-{n:06d}" for n in range(NUM_SHARDS)]
    for row, ref_row in zip(rows, ref_rows):
        assert row.sha256 == sha(got[row.path]) == ref_row.sha256 == commits[row.shard_id].sha256
        assert (row.num_bytes, row.num_samples, row.first_index, row.last_index, row.seed) == (
            ref_row.num_bytes, ref_row.num_samples, ref_row.first_index, ref_row.last_index, ref_row.seed)
    assert DatasetCard.from_json(got["dataset.json"]).fingerprint() == \
        DatasetCard.from_json(ref["dataset.json"]).fingerprint()


def test_flaky_s3_still_yields_identical_corpus(reference, moto_endpoint, s3_env, s3_bucket):
    policy = FaultPolicy([
        # every shard's first two uploads fail with 500: botocore (2 attempts) gives up, so the
        # pipeline's own retry has to re-upload
        FaultRule("error", methods=("PUT",), path=r"/shards/shard-\d+\.tar$", first=2, statuses=(500,),
                  name="shard-put"),
        # every shard's first read-back (GET) fails once with 503 SlowDown: a throttled read is
        # absorbed by botocore's retry and the verification still passes (deterministic, so the test
        # cannot pass without the read path having been hit)
        FaultRule("error", methods=("GET",), path=r"/shards/shard-\d+\.tar$", first=1, statuses=(503,),
                  name="shard-get"),
        # ~20% of all requests (any method) fail with 503 SlowDown / 500 InternalError; never twice
        # in a row for the same request, so each botocore call (2 attempts) eventually succeeds
        FaultRule("error", rate=0.2, statuses=(503, 500), max_consecutive=1, name="flaky"),
    ], seed=7)
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        summary = run_generation(make_config(f"s3://{s3_bucket}/faulty", proxy.url), worker_env=worker_env(proxy.url))
    print("fault proxy:", policy.summary())
    timeline(policy)
    assert summary.committed_now == NUM_SHARDS and summary.num_samples == 128
    assert summary.retries == 0  # every fault was absorbed by the storage layer; no shard was re-solved
    assert policy.total(rule="shard-put") == 2 * NUM_SHARDS
    # (how many requests the random "flaky" rule hits depends on the bucket name; it is not asserted)
    assert policy.total(rule="shard-get") == NUM_SHARDS
    for key in SHARD_KEYS:  # two failed uploads, then a good one: with_retries did re-upload
        puts = policy.requests_to(rf"/faulty/{key}$", "PUT")
        assert len(puts) >= 3 and all(f is not None for _, _, f in puts[:2]), key
    assert_same_corpus(read_objects(moto_endpoint, s3_bucket, "faulty"), reference.objects)


def test_a_put_that_keeps_failing_fails_the_job_without_committing_that_shard(reference, moto_endpoint, s3_env,
                                                                              s3_bucket):
    bad = "shard-000002"
    policy = FaultPolicy([FaultRule("error", methods=("PUT",), path=rf"/shards/{bad}\.tar$", statuses=(500,),
                                    name="always")])
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        cfg = make_config(f"s3://{s3_bucket}/broken", proxy.url, boto_attempts=1)
        with pytest.raises((GenerationFailed, StorageError)) as info:
            run_generation(cfg, worker_env=worker_env(proxy.url))
    print("fault proxy:", policy.summary())
    timeline(policy)
    message = str(info.value)
    assert bad in message
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in message
    # 2 shard attempts (max_retries=1) x 6 with_retries attempts x 1 botocore attempt, all failed
    assert policy.total(rule="always") == 2 * 6
    assert all(f is not None for _, _, f in policy.requests_to(rf"/{bad}\.tar$", "PUT"))
    objects = read_objects(moto_endpoint, s3_bucket, "broken")
    assert f"commits/{bad}.json" not in objects
    assert f"shards/{bad}.tar" not in objects
    assert "manifest.parquet" not in objects
    assert "dataset.json" in objects
    commits = check_commits_match_objects(objects)
    assert sorted(commits) == ["shard-000000", "shard-000001", "shard-000003"]
    for sid in commits:  # what was committed is exactly what a fault-free run stores
        assert objects[f"shards/{sid}.tar"] == reference.objects[f"shards/{sid}.tar"]


def test_bad_read_backs_are_detected_and_the_upload_retried(reference, moto_endpoint, s3_env, s3_bucket):
    victim = r"/shards/shard-000001\.tar$"
    policy = FaultPolicy([
        # the first read-back is corrupted (one byte flipped), the second truncated (short body,
        # consistent Content-Length): both must fail verification and cause a re-upload; the third
        # drops the connection half way (a transport error, retried by the client)
        FaultRule("corrupt", methods=("GET",), path=victim, first=1, name="corrupt"),
        FaultRule("truncate", methods=("GET",), path=victim, first=2, name="truncate"),
        FaultRule("drop", methods=("GET",), path=victim, first=3, name="drop"),
    ])
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        summary = run_generation(make_config(f"s3://{s3_bucket}/verify", proxy.url), worker_env=worker_env(proxy.url))
    print("fault proxy:", policy.summary())
    timeline(policy)
    assert summary.committed_now == NUM_SHARDS
    assert (policy.total(rule="corrupt"), policy.total(rule="truncate"), policy.total(rule="drop")) == (1, 1, 1)
    # a corrupted and a truncated read-back: at least three uploads (the dropped read-back is
    # normally retried by s3fs itself, without a re-upload)
    assert len(policy.requests_to(victim, "PUT")) >= 3
    assert_same_corpus(read_objects(moto_endpoint, s3_bucket, "verify"), reference.objects)


def test_a_read_back_that_is_always_corrupt_never_commits(reference, moto_endpoint, s3_env, s3_bucket):
    bad = "shard-000001"
    policy = FaultPolicy([FaultRule("corrupt", methods=("GET",), path=rf"/shards/{bad}\.tar$", name="corrupt")])
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        cfg = make_config(f"s3://{s3_bucket}/corrupt", proxy.url, boto_attempts=1)
        with pytest.raises((GenerationFailed, StorageError)) as info:
            run_generation(cfg, worker_env=worker_env(proxy.url))
    print("fault proxy:", policy.summary())
    timeline(policy)
    assert bad in str(info.value)
    assert policy.total(rule="corrupt") == 2 * 6  # 2 shard attempts x 6 with_retries attempts
    objects = read_objects(moto_endpoint, s3_bucket, "corrupt")
    assert f"commits/{bad}.json" not in objects
    assert "manifest.parquet" not in objects
    commits = check_commits_match_objects(objects)
    assert bad not in commits and len(commits) == NUM_SHARDS - 1
