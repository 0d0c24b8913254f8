"""Real test fixtures: moto's S3 HTTP server on loopback, a real local Ray cluster, and the tiny diffusers
pipelines and prompt corpora shared by every test module (built once per session)."""

from __future__ import annotations

import os
import uuid

import pytest
from fixtures import generate_args, make_tiny_pipeline, write_prompt_file

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-printed",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 (an ephemeral port), reached over real HTTP."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Standard AWS environment pointing at moto (as a user's cluster points at AWS)."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return {**S3_ENV, "AWS_ENDPOINT_URL": moto_endpoint}


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh bucket on moto; returns its name."""
    import boto3

    name = f"tf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs and 2 *logical* GPUs (GPU scheduling tested on CPU)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """kind (sd3 | sd15 | sdxl) -> the folder of a tiny random-weight pipeline, built once per session.
    Tests must not modify it (copy it first)."""
    built: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = make_tiny_pipeline(kind, tmp_path_factory.mktemp("tiny-models") / f"tiny-{kind}")
        return built[kind]

    return get


@pytest.fixture(scope="session")
def sd3_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir("sd3")


@pytest.fixture(scope="session")
def sd15_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir("sd15")


@pytest.fixture(scope="session")
def sdxl_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir("sdxl")


@pytest.fixture(scope="session")
def prompt_corpus(tmp_path_factory, tiny_pipeline_dir, ray_cluster):
    """(kind="sd3", **generate flags) -> a finalized tiny prompt corpus (``fixtures.PROMPT_CORPUS_FLAGS``
    overridden by the flags), generated through `trajflow generate` once per distinct set of flags.
    Tests must not modify it (copy it first)."""
    from trajflow.cli import main

    made: dict[tuple, str] = {}

    def get(kind: str = "sd3", **flags) -> str:
        key = (kind, tuple(sorted(flags.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"{kind}-prompt-corpus")
            prompts = write_prompt_file(root / "prompts.jsonl")
            out = str(root / "corpus")
            assert main(generate_args(tiny_pipeline_dir(kind), prompts, out, **flags)) == 0
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def gmm_corpus(tmp_path_factory):
    """(n, shard_size, **make_gmm_corpus flags) -> a finalized latent10 corpus (``fixtures.make_gmm_corpus``),
    generated once per session and distinct arguments. Tests must not modify it (copy it first)."""
    from fixtures import make_gmm_corpus

    made: dict[tuple, str] = {}

    def get(n: int, shard_size: int, **flags) -> str:
        key = (n, shard_size, tuple(sorted(flags.items())))
        if key not in made:
            made[key] = make_gmm_corpus(str(tmp_path_factory.mktemp("gmm-corpus") / "latent10"), n, shard_size, **flags)
        return made[key]

    return get
