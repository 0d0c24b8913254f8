"""`trajflow submit`: generate arguments checked locally, runtime_env without secrets, stable ids, and a
real Ray head (`ray start --head`, token authentication on) reached through the Ray Jobs API."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fixtures import write_prompt_file

from pipeline.submit import (
    SUBMISSION_PREFIX,
    SubmitUsageError,
    build_runtime_env,
    check_generate_args,
    describe_runtime_env,
    load_runtime_env,
    parse_generate_args,
    stable_submission_id,
)
from storage_schemas import manifest_from_parquet_bytes
from trajflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent
TRAJFLOW = BIN / "trajflow"
RAY = BIN / "ray"
GEN = ["--teacher", "gmm:ring2d", "--num-trajectories", "64", "--shard-size", "16", "--num-steps", "16",
       "--stages", "8,4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# no cluster


class TestGenerateArguments:
    def test_every_generate_flag_value_is_converted_to_its_field_type(self):
        """A field type with no conversion would reach GenerateConfig as text (``--resolution 16`` was
        refused as "got '16'")."""
        from pipeline.config import config_fields
        from pipeline.submit import _ANNOTATION_TYPES

        text_fields = {n for n, f in config_fields().items() if f.type in ("str", "str | None")}
        special = {"progress", "guidance"}  # not a flag / parsed by GenerateConfig from "3.0" or "1.5:4.5"
        for name, f in config_fields().items():
            assert name in text_fields | special or f.type in _ANNOTATION_TYPES, (name, f.type)
        gen = parse_generate_args(["--teacher", "diffusers:/m", "--resolution", "1024", "--shift", "3",
                                   "--out", "/c", "--num-trajectories", "8"])
        assert gen.values["resolution"] == 1024 and gen.values["shift"] == 3.0
        check_generate_args(gen)

    def test_stable_id_ignores_order_spelling_abbreviations_and_address(self):
        a = parse_generate_args(["--", *GEN, "--out", "s3://b/c"])
        b = parse_generate_args(["--out=s3://b/c", "--stages", "8, 4", "--num-traj", "64", "--num-steps=16",
                                 "--shard-size", "16", "--teacher=gmm:ring2d", "--address", "ray://x:10001",
                                 "--no-progress"])
        assert stable_submission_id(a) == stable_submission_id(b)
        assert stable_submission_id(a).startswith(SUBMISSION_PREFIX)
        assert len(stable_submission_id(a)) == len(SUBMISSION_PREFIX) + 12
        assert b.ignored == ["--address ray://x:10001"]
        c = parse_generate_args([*GEN, "--out", "s3://b/c", "--base-seed", "1"])
        assert stable_submission_id(c) != stable_submission_id(a)

    def test_entrypoint_runs_generate_on_the_cluster(self):
        g = parse_generate_args([*GEN, "--out", "s3://b/my corpus", "--address", "x"])
        assert g.entrypoint() == ("trajflow generate --address auto --no-progress " + " ".join(GEN)
                                  + " --out 's3://b/my corpus'")

    @pytest.mark.parametrize("argv, message", [
        (["--teacher", "gmm:ring2d", "--num-trajectories", "64"], "--out is required"),
        (["--teacher", "gmm:ring2d", "--out", "x"], "--num-trajectories is required"),
        ([*GEN, "--out", "x", "--num-trajectorie", "6"], None),  # a valid abbreviation
        ([*GEN, "--out", "x", "--bogus", "1"], "unknown generate argument --bogus"),
        ([*GEN, "--out", "x", "--s", "1"], "ambiguous"),
        ([*GEN, "--out", "x", "--num-workers", "two"], "invalid value 'two'"),
        ([*GEN, "--out", "x", "--num-steps", "15"], "multiple of the finest window count"),
        ([*GEN, "--out", "x", "--out"], "expects a value"),
        ([*GEN, "x"], "unexpected generate argument 'x'"),
        ([*GEN, "--out", "x", "--storage-options", '{"key": "AKIA", "secret": "s3cr3t"}'], "holds credentials"),
    ])
    def test_bad_usage_is_caught_locally(self, argv, message):
        if message is None:
            check_generate_args(parse_generate_args(argv))
            return
        with pytest.raises(SubmitUsageError, match=message):
            check_generate_args(parse_generate_args(argv))

    def test_config_file_is_merged_when_present_here(self, tmp_path):
        cfg = tmp_path / "gen.json"
        cfg.write_text(json.dumps({"teacher": "gmm:ring2d", "num_trajectories": 64, "out": "s3://b/c"}))
        check_generate_args(parse_generate_args(["--config", str(cfg)]))
        cfg.write_text(json.dumps({"teacher": "gmm:ring2d", "num_trajectories": 64, "out": "s3://b/c",
                                   "num_steps": 7}))
        with pytest.raises(SubmitUsageError, match="multiple of the finest"):
            check_generate_args(parse_generate_args(["--config", str(cfg)]))
        # a config file that only exists on the cluster: checked there
        check_generate_args(parse_generate_args(["--config", "/on/the/cluster.toml"]))


class TestRuntimeEnv:
    def test_passes_endpoint_and_region_never_secrets(self, tmp_path):
        environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                   "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "never-shipped",
                   "AWS_SESSION_TOKEN": "never-shipped-either", "RAY_AUTH_TOKEN": "nor-this"}
        env = build_runtime_env({}, str(tmp_path), environ)
        assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
        assert env["working_dir"] == str(tmp_path)
        assert {".venv", ".git", "__pycache__", "*.tar", "demo_out"} <= set(env["excludes"])
        text = json.dumps(env) + describe_runtime_env(env)
        assert "never-shipped" not in text and "AKIA" not in text and "nor-this" not in text
        assert "http://minio:9000" not in describe_runtime_env(env)  # values are never shown

    def test_file_values_win_and_secrets_in_the_file_are_refused(self, tmp_path):
        f = tmp_path / "env.yaml"
        f.write_text("env_vars:\n  AWS_DEFAULT_REGION: us-east-1\n")
        env = build_runtime_env(load_runtime_env(str(f)), None, {"AWS_DEFAULT_REGION": "eu-west-1"})
        assert env == {"env_vars": {"AWS_DEFAULT_REGION": "us-east-1"}}
        f.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: leaked\n")
        with pytest.raises(SubmitUsageError, match="AWS_SECRET_ACCESS_KEY") as e:
            build_runtime_env(load_runtime_env(str(f)), None, {})
        assert "leaked" not in str(e.value)
        f.write_text("- not a mapping\n")
        with pytest.raises(SubmitUsageError, match="mapping"):
            load_runtime_env(str(f))
        with pytest.raises(SubmitUsageError, match="not found"):
            load_runtime_env(str(tmp_path / "missing.yaml"))


class TestCommandLine:
    def test_unreachable_dashboard_is_exit_1_with_a_clear_message(self, tmp_path, capsys):
        rc = main(["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--", *GEN,
                   "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert rc == 1
        assert "cannot reach the Ray dashboard at http://127.0.0.1:" in err
        assert "Traceback" not in err

    @pytest.mark.parametrize("generate_args, message", [
        ([], "no generate arguments"),
        (["--"], "no generate arguments"),
        (["--", "--teacher", "gmm:ring2d"], "is required"),
    ])
    def test_missing_generate_arguments_is_exit_2(self, generate_args, message, capsys):
        rc = main(["submit", "--address", "http://127.0.0.1:9", *generate_args])
        assert rc == 2
        assert message in capsys.readouterr().err

    def test_non_http_address_is_exit_2(self, tmp_path, capsys):
        rc = main(["submit", "--address", "ray://127.0.0.1:10001", "--", *GEN, "--out", str(tmp_path)])
        assert rc == 2
        assert "dashboard address" in capsys.readouterr().err


class TestClusterFiles:
    def test_every_yaml_parses(self):
        files = sorted(CLUSTER.glob("*.yaml"))
        assert {f.name for f in files} >= {"kuberay-rayjob.yaml", "kuberay-raycluster.yaml",
                                          "ray-cluster-launcher.yaml", "runtime_env.yaml"}
        for f in files:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), f

    def test_kuberay_manifests(self):
        job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        spec = job["spec"]
        assert spec["entrypoint"].startswith("trajflow generate --address auto")
        assert "--out s3://" in spec["entrypoint"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert "SECRET" not in spec.get("runtimeEnvYAML", "")
        cluster = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
        assert cluster["kind"] == "RayCluster"
        for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
            worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
            assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert worker["image"].startswith("ghcr.io/your-org/trajflow:")
            for c in (worker, spec["headGroupSpec"]["template"]["spec"]["containers"][0]):
                env = {e["name"]: e for e in c["env"]}
                secret = env["AWS_SECRET_ACCESS_KEY"]
                assert "value" not in secret and "secretKeyRef" in secret["valueFrom"]

    def test_launcher_runtime_env_and_image(self):
        launcher = yaml.safe_load((CLUSTER / "ray-cluster-launcher.yaml").read_text())
        assert launcher["provider"]["type"] == "aws"
        assert launcher["head_node_type"] in launcher["available_node_types"]
        setup = "\n".join(launcher["setup_commands"])
        assert setup.index("torch") < setup.index("trajflow @")
        # the example runtime_env is accepted by submit (it carries no secrets)
        build_runtime_env(load_runtime_env(str(CLUSTER / "runtime_env.yaml")), None, {})
        dockerfile = (CLUSTER / "Dockerfile").read_text()
        assert "FROM python:3.11" in dockerfile
        assert dockerfile.index("torch") < dockerfile.index("pip install /src")
        assert "SECRET" not in dockerfile


# ------------------------------------------------------------------------------------------------
# a real Ray head


@dataclass
class Head:
    address: str
    token: str
    root: Path


def _clean_env(**extra: str) -> dict[str, str]:
    # the session's ray.init() (tests/conftest.py) sets RAY_ADDRESS / RAY_AUTH_MODE in this process
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return env


def _pids_of(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (this head's private temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if marker in cmd and "Z" not in state.split(":", 1)[-1][:3]:
            pids.append(int(d.name))
    return pids


def _stop_head(proc: subprocess.Popen, marker: str) -> list[int]:
    """Stop only this head: SIGTERM to `ray start --block` (it stops its node), then SIGKILL its process
    group and any process of its temp dir. Never `ray stop`: that kills every Ray on the machine,
    including the session's ray_cluster fixture."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := _pids_of(marker)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return _pids_of(marker)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the Jobs API on a free port and token authentication on, in its own
    process session and a short private temp dir (Unix socket paths are limited to ~107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="tfs", dir="/tmp"))
    token = secrets.token_hex(32)
    dash = _free_port()
    cmd = [str(RAY), "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
           "--num-cpus=2", "--num-gpus=1", f"--temp-dir={root / 'r'}", "--disable-usage-stats"]
    log = open(root / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), cwd=root,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited {proc.returncode}:\n{(root / 'head.log').read_text()[-4000:]}")
            req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200 and "ray_version" in json.loads(r.read()):
                        break
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard did not answer:\n{(root / 'head.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield Head(address, token, root)
    finally:
        stray = _stop_head(proc, str(root / "r"))
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not stray, f"processes of the test head survived: {stray}"


def _submit(head: Head, *args: str) -> subprocess.CompletedProcess:
    """`trajflow submit` as a user runs it, with the cluster's token in the environment."""
    return subprocess.run([str(TRAJFLOW), "submit", "--address", head.address, *args], cwd=head.root,
                          env=_clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token),
                          capture_output=True, text=True, timeout=180)


def _submission_id(stdout: str) -> str:
    return next(ln.split(": ", 1)[1].strip() for ln in stdout.splitlines() if ln.startswith("submission id: "))


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
class TestSubmitToRayHead:
    def test_missing_token_is_exit_1_with_a_clear_message(self, ray_head, tmp_path, capsys):
        # in this process: no token for this head (none at all, or the session Ray's own from ray.init())
        rc = main(["submit", "--address", ray_head.address, "--", *GEN, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert "requires token authentication" in err and "RAY_AUTH_MODE=token" in err
        assert "Traceback" not in err

    def test_submit_wait_generates_and_the_same_command_attaches(self, ray_head, tmp_path):
        out = tmp_path / "corpus"
        first = _submit(ray_head, "--wait", "--", *GEN, "--out", str(out))
        assert first.returncode == 0, first.stdout + first.stderr
        sid = _submission_id(first.stdout)
        assert sid.startswith(SUBMISSION_PREFIX)
        assert f"job {sid} SUCCEEDED" in first.stdout
        assert "generated " in first.stdout and "4 committed now" in first.stdout  # the job's log, streamed
        assert ray_head.token not in first.stdout + first.stderr

        commits = manifest_from_parquet_bytes((out / "manifest.parquet").read_bytes())
        assert len(commits) == 4 and sum(c.num_samples for c in commits) == 64
        for c in commits:
            assert hashlib.sha256((out / c.path).read_bytes()).hexdigest() == c.sha256
        before = _snapshot(out)

        again = _submit(ray_head, "--wait", "--", *GEN, "--out", str(out))
        assert again.returncode == 0, again.stdout + again.stderr
        assert _submission_id(again.stdout) == sid
        assert "already exists (SUCCEEDED); attaching" in again.stderr
        assert f"job {sid} SUCCEEDED" in again.stdout
        assert _snapshot(out) == before  # nothing regenerated or rewritten

        other = _submit(ray_head, "--submission-id", sid, "--", *GEN, "--base-seed", "7", "--out", str(out))
        assert other.returncode == 2, other.stdout + other.stderr
        assert f"submission id {sid} is already used on this cluster by a different command" in other.stderr

    def test_submit_a_diffusers_teacher_with_prompts(self, ray_head, tmp_path):
        """docs/models.md's SD3 generate step, at tiny scale: a local pipeline folder and a prompt file."""
        from models.tiny import make_tiny_sd3_pipeline
        from storage_schemas import DatasetCard

        sd3 = make_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
        prompts = write_prompt_file(tmp_path / "prompts.jsonl", ["a red cat", "two green birds"])
        out = tmp_path / "sd3-corpus"
        r = _submit(ray_head, "--wait", "--", "--teacher", f"diffusers:{sd3}", "--prompts", str(prompts),
                    "--resolution", "16", "--guidance", "2.0", "--teacher-dtype", "float32", "--dtype", "float32",
                    "--stages", "4", "--num-steps", "8", "--num-trajectories", "8", "--shard-size", "4",
                    "--batch-size", "4", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCEEDED" in r.stdout and "2 committed now" in r.stdout
        card = DatasetCard.from_json((out / "dataset.json").read_text())
        assert card.teacher.kind == "diffusers" and card.conditioning.kind == "prompt"
        assert card.run["shift"] == 3.0  # read from the pipeline's scheduler config
        assert len(manifest_from_parquet_bytes((out / "manifest.parquet").read_bytes())) == 2

    def test_failed_job_is_exit_1_and_the_same_command_starts_a_resuming_attempt(self, ray_head, tmp_path):
        # a config file that is not here is left to the cluster, where it is missing too: the job fails fast
        args = ["--", *GEN, "--config", "/no/such/generate.toml", "--out", str(tmp_path / "c")]
        failed = _submit(ray_head, "--wait", *args)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "must exist on the cluster" in failed.stderr
        sid = _submission_id(failed.stdout)
        assert f"job {sid} FAILED" in failed.stdout
        assert "config file not found: /no/such/generate.toml" in failed.stdout  # the job's log
        retry = _submit(ray_head, *args)  # no --wait: returns once submitted
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert _submission_id(retry.stdout) == f"{sid}-r2"
        assert "ended FAILED" in retry.stderr and "resumes" in retry.stderr
        assert f"ray job logs --follow --address {ray_head.address} {sid}-r2" in retry.stdout
