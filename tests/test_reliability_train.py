"""Reliability of `trajflow train / eval / sample` (issue 16, the trainer half).

Real parts only: corpora written by the generation worker and committer, a local HTTP server in a thread
that counts every request (for "never fetched"), moto's S3 server over HTTP, the CLI in subprocesses
(`trajflow ...`) and in-process (`trajflow.cli.main`), real checkpoints on disk and on moto.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from models.flownet import FlowNet, FlowNetConfig, save_flow_net
from models.gmm import GMMTeacher, load_preset
from storage_schemas import DatasetCard
from storage_schemas.locations import ALLOW_ENV, LocationPolicy, LocationRefused

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))


# -- helpers --------------------------------------------------------------------------------------------
class CountingServer:
    """A real HTTP server on 127.0.0.1 in a thread: serves files from a folder, counts every request."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def do_GET(self):  # noqa: N802
                outer.requests.append(f"GET {self.path}")
                super().do_GET()

            def do_HEAD(self):  # noqa: N802
                outer.requests.append(f"HEAD {self.path}")
                super().do_HEAD()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    srv = CountingServer(folder)
    srv.folder = folder
    yield srv
    srv.close()


def latent10_flow_net(path: Path, seed: int = 0) -> Path:
    """A small flow net with latent10's sample shape and classes (a flow-net teacher)."""
    g = GMMTeacher(load_preset("latent10"))
    torch.manual_seed(seed)
    net = FlowNet(FlowNetConfig("mlp", tuple(g.sample_shape), num_classes=g.num_classes, width=16, depth=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_flow_net(net, path)
    return path


def make_corpus(out: str, teacher: str = "gmm:latent10", n: int = 64, shard_size: int = 32) -> str:
    """A real corpus written by the generation worker and committer (no Ray needed)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    return generate_in_process(GenerateConfig(teacher=teacher, out=out, num_trajectories=n, shard_size=shard_size,
                                              num_steps=16, stages=(8, 4), guidance=2.0, progress=False))


def train_args(data, out, *extra):
    return ["train", "--data", data, "--out", out, "--stages", "8,4", "--batch-size", "16", "--init", "scratch",
            "--student-width", "32", "--student-depth", "1", "--no-progress", "--log-every", "1",
            "--num-workers", "0", *extra]


def cli(args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([TRAJFLOW, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    """stderr without warnings and the trainer's informational notes ("note: ...")."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "warn" not in ln.lower() and not ln.startswith("note: ")]


def clean_env(tmp_path, **extra) -> dict[str, str]:
    """No session allow-list, a fresh teacher cache (so a fetch would have to reach the server)."""
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
    env.update(TRAJFLOW_CACHE=str(tmp_path / "cache"), **extra)
    return env


def run_clean(args, tmp_path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([TRAJFLOW, *args], capture_output=True, text=True, timeout=600,
                          env=clean_env(tmp_path, **extra))


# -- A: nothing a corpus or a student file names is fetched unless under the root or allowed ----------
def test_location_policy_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    p = LocationPolicy("s3://bucket/corpus", ["http://models.example/teachers/", str(tmp_path / "models")])
    assert p.allows("s3://bucket/corpus/teacher/net.safetensors")
    assert p.allows("s3a://bucket/corpus/net.safetensors")
    for bad in ("s3://bucket/corpus-evil/net.safetensors", "s3://bucket/corpus/../other/net.safetensors",
                "s3://other-bucket/net.safetensors", "s3://bucket/net.safetensors", "http://127.0.0.1:9/x",
                "http://models.example/teachers-evil/x", "http://models.example/teachers/../x",
                "http://user:pw@models.example/teachers/x", "http://models.example/teachers/x?y=1",
                "simplecache::s3://bucket/corpus/x", "/etc/passwd", "../../etc/passwd", "file:///etc/passwd",
                str(tmp_path / "models-evil" / "x"), str(tmp_path / "models" / ".." / "x"), ""):
        assert not p.allows(bad), bad
    assert p.allows("http://models.example/teachers/a/net.safetensors")
    assert p.allows(str(tmp_path / "models" / "a" / "net.safetensors"))
    (tmp_path / "models").mkdir()
    os.symlink("/etc", tmp_path / "models" / "link")
    assert not p.allows(str(tmp_path / "models" / "link" / "passwd"))  # symlinks resolved
    local = LocationPolicy(str(tmp_path / "c"))
    assert local.allows(f"file://{tmp_path}/c/t.safetensors") and not local.allows("s3://bucket/c/t")
    with pytest.raises(LocationRefused) as e:
        local.check("http://h/x\nforged line", "the teacher's weights")
    assert "\n" not in str(e.value) and "--allow-teacher-location" in str(e.value)
    monkeypatch.setenv(ALLOW_ENV, os.pathsep.join(["http://h/", "/opt/models"]))
    assert LocationPolicy(str(tmp_path / "c")).allows("http://h/x")


@pytest.fixture
def http_corpus(tmp_path, http_server):
    """A latent10-shaped corpus generated from a flow-net teacher served over HTTP (its card names the URL)."""
    latent10_flow_net(http_server.folder / "net.safetensors")
    spec = f"flownet:{http_server.url}/net.safetensors"
    corpus = make_corpus(str(tmp_path / "corpus"), teacher=spec)
    assert http_server.requests  # generation fetched it (the user named it on generate's command line)
    http_server.requests.clear()
    return corpus


def test_train_never_fetches_a_teacher_the_card_names_over_http(http_corpus, http_server, tmp_path):
    r = run_clean(train_args(http_corpus, str(tmp_path / "run"), "--max-steps", "2"), tmp_path)
    assert r.returncode == 1, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error: refusing to open"), r.stderr
    assert f"{http_server.url}/net.safetensors" in lines[0] and "--allow-teacher-location" in lines[0]
    assert http_server.requests == []
    assert not (tmp_path / "cache" / "teachers").exists() or not list((tmp_path / "cache" / "teachers").iterdir())
    # the user names the location: fetched, and the run trains
    r = run_clean(train_args(http_corpus, str(tmp_path / "run"), "--max-steps", "2",
                             "--allow-teacher-location", f"{http_server.url}/"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert http_server.requests and "trained 2 steps" in r.stdout


def test_teacher_under_the_corpus_root_needs_no_flag(tmp_path):
    root = tmp_path / "corpus"
    net = latent10_flow_net(root / "teacher" / "net.safetensors")
    corpus = make_corpus(str(root), teacher=f"flownet:{net}")
    r = run_clean(train_args(corpus, str(tmp_path / "run"), "--max-steps", "2"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("where", ["s3://another-bucket/net.safetensors", "/etc/passwd", "../../../../etc/passwd",
                                   "file:///etc/passwd", "OUTSIDE"])
def test_forged_card_locations_are_refused_before_any_open(http_corpus, tmp_path, where, monkeypatch):
    from trainer.teacher import teacher_from_card

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    if where == "OUTSIDE":  # a real flow net next to the corpus, not under it
        where = str(latent10_flow_net(tmp_path / "outside" / "net.safetensors"))
    card = DatasetCard.from_json((Path(http_corpus) / "dataset.json").read_text())
    card.run["teacher_spec"] = f"flownet:{where}"
    with pytest.raises(LocationRefused, match="refusing to open") as e:
        teacher_from_card(card, root=http_corpus)
    assert where in str(e.value)


def test_s3_teacher_in_another_bucket_is_refused_on_the_command_line(s3_bucket, s3_env, tmp_path):
    """A corpus on moto whose card names a teacher in another bucket: train refuses, nothing downloaded."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    fs.mkdir("other-bucket")
    net = latent10_flow_net(tmp_path / "net.safetensors")
    fs.put_file(str(net), "other-bucket/net.safetensors")
    corpus = make_corpus(f"s3://{s3_bucket}/c", teacher="flownet:s3://other-bucket/net.safetensors")
    r = run_clean(train_args(corpus, str(tmp_path / "run"), "--max-steps", "2"), tmp_path, **s3_env)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "s3://other-bucket/net.safetensors" in lines[0], r.stderr
    assert not (tmp_path / "cache" / "teachers").exists() or not list((tmp_path / "cache" / "teachers").iterdir())
    r = run_clean(train_args(corpus, str(tmp_path / "run"), "--max-steps", "2", "--allow-teacher-location",
                             "s3://other-bucket/"), tmp_path, **s3_env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_eval_refuses_what_a_forged_student_file_names(http_corpus, http_server, tmp_path):
    card = json.loads((Path(http_corpus) / "dataset.json").read_text())
    student = tmp_path / "forged" / "student.safetensors"
    g = GMMTeacher(load_preset("latent10"))
    net = FlowNet(FlowNetConfig("mlp", tuple(g.sample_shape), num_classes=g.num_classes, width=16, depth=1))
    student.parent.mkdir()
    save_flow_net(net, student, extra={"card": card, "shift": 1.0})
    r = run_clean(["eval", "--student", str(student.parent), "--num-samples", "16"], tmp_path)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow eval: error: refusing to open"), r.stderr
    assert "the student's folder" in lines[0]
    assert http_server.requests == []


def test_audit_replay_opens_nothing_the_card_names_outside_the_root(tmp_path, monkeypatch):
    from storage_schemas.audit import audit_corpus

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    outside = latent10_flow_net(tmp_path / "outside" / "net.safetensors")
    corpus = make_corpus(str(tmp_path / "corpus"), teacher=f"flownet:{outside}")
    # the file the card names is replaced by something private: its content must never reach the report
    outside.write_bytes(b'{"PRIVATE_KEY_NAME_123": 1}' + b"\0" * 64)
    report = audit_corpus(corpus, replay=2, progress=False)
    text = json.dumps(report.to_dict() if hasattr(report, "to_dict") else report.__dict__, default=str)
    assert "PRIVATE_KEY_NAME_123" not in text
    assert "refusing to open" in text and str(outside) in text
    # under the root, replay runs as before
    root = tmp_path / "c2"
    inside = latent10_flow_net(root / "teacher" / "net.safetensors")
    corpus2 = make_corpus(str(root), teacher=f"flownet:{inside}")
    report = audit_corpus(corpus2, replay=2, progress=False)
    assert report.stats["replay"]["available"] is True and report.stats["replay"]["authentic"] is True


# -- B: no secret at rest ----------------------------------------------------------------------------
def test_no_secret_at_rest_canary_over_every_file_a_run_writes(s3_bucket, s3_env, tmp_path):
    """Storage options with a canary secret (and canary environment credentials): train, resume and export on
    moto; the canary appears in no object under the bucket and no file under the working directory."""
    import boto3

    canary, env_canary = "CANARY-SECRET-7f3a9c", "CANARY-ENV-SECRET-b41d"
    data = make_corpus(f"s3://{s3_bucket}/c")
    opts = json.dumps({"key": s3_env["AWS_ACCESS_KEY_ID"], "secret": canary,
                       "client_kwargs": {"endpoint_url": s3_env["AWS_ENDPOINT_URL"]}})
    work = tmp_path / "work"
    work.mkdir()
    env = {**clean_env(tmp_path), **s3_env, "AWS_SECRET_ACCESS_KEY": env_canary}
    out = f"s3://{s3_bucket}/runs/r1"
    for steps in ("2", "4"):  # the second run resumes: it takes the storage options again from the flag
        r = subprocess.run([TRAJFLOW, *train_args(data, out, "--max-steps", steps, "--checkpoint-every", "2",
                                                  "--storage-options", opts, "--cache-dir", str(work / "cache"),
                                                  "--consumed-log", str(work / "consumed"))],
                           capture_output=True, text=True, timeout=600, env=env, cwd=work)
        assert r.returncode == 0, r.stderr[-3000:]
        assert canary not in r.stdout + r.stderr and env_canary not in r.stdout + r.stderr
    assert "resumed from" in r.stdout
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]]
    assert any(k.endswith("state.json") for k in keys) and any(k.endswith("student.safetensors") for k in keys)
    for k in keys:
        body = s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read()
        assert canary.encode() not in body and env_canary.encode() not in body, k
    written = [p for p in work.rglob("*") if p.is_file()]
    assert any("logs" in p.parts for p in written)  # TensorBoard + metrics.jsonl under ./runs/<hash>/logs
    for p in written:
        blob = p.read_bytes()
        assert canary.encode() not in blob and env_canary.encode() not in blob, p
    state = json.loads(s3.get_object(Bucket=s3_bucket, Key=[k for k in keys if k.endswith("state.json")][0])
                       ["Body"].read())
    assert "storage_options" not in state["train_config"]


def test_resume_mismatch_explanation_still_names_the_settings(tmp_path):
    data = make_corpus(str(tmp_path / "c"))
    out = str(tmp_path / "run")
    opts = json.dumps({"secret": "CANARY-SECRET-2"})
    r = run_clean(train_args(data, out, "--max-steps", "2", "--storage-options", opts), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert b"CANARY-SECRET-2" not in b"".join(p.read_bytes() for p in Path(out).rglob("*") if p.is_file())
    r = run_clean([*train_args(data, out, "--max-steps", "4"), "--student-width", "48"], tmp_path)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "student_width" in lines[0] and "does not fit" in lines[0], r.stderr


# -- C: one-line errors, writable --out, resume fallback, reproducible student files ---------------------
@pytest.fixture
def gmm_corpus(tmp_path):
    return make_corpus(str(tmp_path / "gmm"))


def _drop_gmm_spec(corpus: str) -> list[str]:
    card = json.loads((Path(corpus) / "dataset.json").read_text())
    del card["teacher"]["config"]["spec"]
    (Path(corpus) / "dataset.json").write_text(json.dumps(card))
    return []


def _truncate_a_shard(corpus: str) -> list[str]:
    shard = sorted((Path(corpus) / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    return ["--num-workers", "1"]  # the default worker: its error used to carry the worker's traceback


def _symlink_a_shard(corpus: str) -> list[str]:
    """A shard of a local corpus replaced by a symlink to a copy outside the root (same bytes: only the
    link gives it away)."""
    shard = sorted((Path(corpus) / "shards").glob("*.tar"))[0]
    outside = Path(corpus).parent / "outside.tar"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    return []


@pytest.mark.parametrize("craft", [_drop_gmm_spec, _truncate_a_shard, _symlink_a_shard])
def test_train_failures_are_one_line(gmm_corpus, tmp_path, craft):
    extra = craft(gmm_corpus)
    args = train_args(gmm_corpus, str(tmp_path / "run"), "--max-steps", "2", "--cache-dir", str(tmp_path / "sc"))
    if "--num-workers" in extra:
        args.remove("--num-workers"), args.remove("0")
    r = run_clean([*args, *extra], tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error: "), r.stderr
    assert "Traceback" not in r.stderr
    r = run_clean(["-v", *args, *extra], tmp_path)  # -v shows the traceback
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr


def test_train_on_a_bad_s3_endpoint_is_one_line(gmm_corpus, tmp_path):
    """ShardFetchError-class failures: the corpus URL points at an endpoint that does not answer."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_MAX_ATTEMPTS": "1"}
    r = run_clean(train_args("s3://nobucket/c", str(tmp_path / "run"), "--max-steps", "1"), tmp_path, **env)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error: "), r.stderr
    opts = json.dumps({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})  # a bad storage option
    r = run_clean(train_args("s3://nobucket/c", str(tmp_path / "run"), "--max-steps", "1", "--storage-options", opts),
                  tmp_path, **env)
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error: "), r.stderr


@pytest.mark.parametrize("forge", ["garbage", "config", "no_gmm_spec"])
def test_eval_of_a_forged_student_file_is_one_line(gmm_corpus, tmp_path, forge):
    folder = tmp_path / "s"
    folder.mkdir()
    f = folder / "student.safetensors"
    if forge == "garbage":
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    else:
        from safetensors.torch import save_file

        card = json.loads((Path(gmm_corpus) / "dataset.json").read_text())
        latent10_flow_net(f)
        if forge == "config":  # a config the network class does not take
            save_file({"w": torch.zeros(1)}, str(f), metadata={"trajflow_flownet_config": json.dumps({"bogus": 1})})
        else:  # a GMM card without its mixture (the registry's ValueError)
            del card["teacher"]["config"]["spec"]
            from safetensors import safe_open

            with safe_open(str(f), "pt") as sf:
                meta, tensors = sf.metadata(), {k: sf.get_tensor(k) for k in sf.keys()}
            save_file(tensors, str(f), metadata={**meta, "trajflow_extra": json.dumps({"card": card, "shift": 1.0})})
    r = run_clean(["eval", "--student", str(folder), "--num-samples", "16"], tmp_path)
    assert r.returncode == 1, r.stdout
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow eval: error: "), r.stderr
    if forge == "no_gmm_spec":
        assert "no spec" in lines[0]


def test_unwritable_out_fails_before_training(gmm_corpus, s3_env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([TRAJFLOW, *train_args(gmm_corpus, "s3://missing-bucket-7c1e/run", "--max-steps", "50")],
                       capture_output=True, text=True, timeout=600, cwd=work, env={**clean_env(tmp_path), **s3_env})
    assert r.returncode == 1
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "not writable" in lines[0] and "missing-bucket-7c1e" in lines[0], r.stderr
    assert not (work / "runs").exists()  # no tracker / metrics files: training never started


def test_resume_falls_back_to_the_newest_complete_checkpoint(gmm_corpus, tmp_path):
    out = tmp_path / "run"
    args = train_args(gmm_corpus, str(out), "--checkpoint-every", "1")
    r = run_clean([*args, "--max-steps", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = out / "checkpoints"
    (ck / "latest.json").write_text('{"step": 3, "pa')  # torn / corrupt
    (ck / "step-00000003" / "state.json").unlink()  # and the newest checkpoint is incomplete
    r = run_clean([*args, "--max-steps", "4"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000002 at step 2" in r.stdout
    assert "unusable" in r.stderr
    (ck / "latest.json").write_text(json.dumps({"step": 1, "path": "../../../etc"}))  # a forged path is not followed
    r = run_clean([*args, "--max-steps", "5"], tmp_path)
    assert r.returncode == 0 and "step-00000004 at step 4" in r.stdout, r.stdout + r.stderr[-2000:]


def test_student_files_are_byte_reproducible(tmp_path):
    code = ("import sys, torch; from models.flownet import FlowNet, FlowNetConfig, save_flow_net; "
            "torch.manual_seed(0); net = FlowNet(FlowNetConfig('mlp', (10,), num_classes=10, width=16, depth=1)); "
            "save_flow_net(net, sys.argv[1], extra={'card': {'b': 1, 'a': [1, 2], 'c': {'y': 1, 'x': 2}}, "
            "'shift': 1.0, 'run': {'steps': 4, 'data': '/c'}})")
    blobs = []
    for i in range(3):  # separate processes: safetensors' metadata map order used to vary by process
        f = tmp_path / f"s{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
        blobs.append(f.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]


def test_trained_students_are_byte_identical(gmm_corpus, tmp_path):
    blobs = []
    for name in ("a", "b"):
        r = run_clean(train_args(gmm_corpus, str(tmp_path / name), "--max-steps", "2"), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        blobs.append((tmp_path / name / "student" / "student.safetensors").read_bytes())
    assert blobs[0] == blobs[1]
