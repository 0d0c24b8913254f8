"""Allow-lists of teacher and prompt locations (issue 25, findings F3 and F12's ``file:`` case).

A location a card or a student file names is approved only when, however it is read (literally, as object
storage does; with dot segments resolved and percent-encoding decoded, as HTTP clients and servers do; as a
``file:`` URL or a plain path), it lies under the trusted root or an allowed prefix, compared by path
segment; the check returns the normalised location that was approved, and the fetchers open that one.

Real parts: ``LocationPolicy``, the trainer's ``teacher_from_card`` with its fsspec fetcher, a real HTTP
server on loopback (``http.server``) that logs every request, moto's S3 server, ``load_prompts``.
"""

from __future__ import annotations

import json
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from storage_schemas.locations import (
    ALLOW_ENV,
    LocationPolicy,
    LocationRefused,
    allowed_from_env,
    split_locations,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _no_env_prefixes(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)


# -- F3 unit level: the review's five locations, and variants -------------------------------------------

REVIEW = ["s3://models/x/../a/net.safetensors", "s3://models//a/net.safetensors",
          "http://127.0.0.1:18950/a/%2e%2e/x/net.safetensors", "http://127.0.0.1:18950/a/%2E%2E/x/net.safetensors",
          "http://127.0.0.1:18950/a/..%2Fx/net.safetensors"]

VARIANTS = [
    # other prefixes and schemes: dot segments, empty segments, percent-encoded dots / slashes / backslashes
    "s3://models/a/../x/net.safetensors", "s3://models/a/./net.safetensors", "s3://models/a//net.safetensors",
    "s3://models/./a/net.safetensors", "s3a://models/x/../a/net.safetensors", "s3://models/a/%2e%2e/x/net",
    "s3://models/a%2F..%2Fx/net", "s3://models/a/net%2f..%2f..%2fx", "gs://models/a/../x/net",
    "http://127.0.0.1:18950/a/../x/net.safetensors", "http://127.0.0.1:18950/a/.%2e/x/net.safetensors",
    "http://127.0.0.1:18950/a/%2e%2E/x/net.safetensors", "http://127.0.0.1:18950/a/..%2fx/net.safetensors",
    "http://127.0.0.1:18950/a/..%5cx/net.safetensors", "http://127.0.0.1:18950/a/..%5Cx/net.safetensors",
    "http://127.0.0.1:18950/a/%252e%252e/x/net.safetensors", "http://127.0.0.1:18950/a/..;/x/net.safetensors",
    "http://127.0.0.1:18950//a/net.safetensors", "http://127.0.0.1:18950/a/%2e/net.safetensors",
    "HTTP://127.0.0.1:18950/a/%2e%2e/x/net.safetensors", "http://127.0.0.1:18950/a/\n../x/net.safetensors",
    "http://127.0.0.1:18950/a/\t../../x", "http://127.0.0.1:18950/a\\..\\x\\net.safetensors",
    # segment boundaries
    "s3://models/ab/net.safetensors", "s3://models/a-evil/net.safetensors", "http://127.0.0.1:18950/ab/net",
    "http://127.0.0.1:189501/a/net", "http://127.0.0.1:18950.evil/a/net", "s3://models.evil/a/net",
]


@pytest.mark.parametrize("location", REVIEW + VARIANTS)
def test_escaping_locations_are_refused(location):
    p = LocationPolicy("/nonexistent/root", ["s3://models/a", "gs://models/a", "http://127.0.0.1:18950/a"],
                       use_env=False)
    assert not p.allows(location)
    with pytest.raises(LocationRefused) as e:
        p.check(location, "the teacher's weights")
    assert "\n" not in str(e.value) and "refusing to open the teacher's weights" in str(e.value)


def test_refusal_says_why_a_dot_segment_is_refused():
    p = LocationPolicy(None, ["s3://models/a"], use_env=False)
    with pytest.raises(LocationRefused, match=r"'\.\.'"):
        p.check("s3://models/a/x/../../b/net")
    with pytest.raises(LocationRefused, match="empty path segment"):
        p.check("s3://models//a/net")
    with pytest.raises(LocationRefused, match="percent-encoded"):
        p.check("http://h/a/%2e%2e/x")


@pytest.mark.parametrize("location,normalised", [
    ("s3://models/a/net.safetensors", "s3://models/a/net.safetensors"),
    ("s3://models/a/sub/net.safetensors", "s3://models/a/sub/net.safetensors"),
    ("S3://Models/a/net.safetensors", "s3://models/a/net.safetensors"),
    ("s3a://models/a/net.safetensors", "s3a://models/a/net.safetensors"),
    ("http://127.0.0.1:18950/a/net.safetensors", "http://127.0.0.1:18950/a/net.safetensors"),
    ("HTTP://127.0.0.1:18950/a/net%20v2.safetensors", "http://127.0.0.1:18950/a/net%20v2.safetensors"),
    ("http://127.0.0.1:18950/a/", "http://127.0.0.1:18950/a/"),
    ("http://127.0.0.1:18950/a", "http://127.0.0.1:18950/a"),
])
def test_plain_locations_under_a_prefix_are_approved_and_normalised(location, normalised):
    p = LocationPolicy(None, ["s3://models/a", "http://127.0.0.1:18950/a/"], use_env=False)
    assert p.allows(location)
    assert p.check(location) == normalised


def test_prefix_of_an_allow_list_entry_with_dot_segments_is_the_resolved_one(tmp_path):
    """The user's own prefix may be written loosely: it is resolved (its dot segments, duplicate slashes)."""
    p = LocationPolicy(None, ["s3://models/x/../a/", "http://h//a/./b"], use_env=False)
    assert p.allows("s3://models/a/net") and not p.allows("s3://models/x/net")
    assert p.allows("http://h/a/b/net") and not p.allows("http://h/a/net")


# -- local paths and file: URLs (F3, F12) -----------------------------------------------------------------


def test_file_urls_compare_as_the_paths_they_name(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    monkeypatch.chdir(allowed / "sub")  # F12: a relative reading of 'file:/elsewhere/...' would be under it
    p = LocationPolicy(str(tmp_path / "corpus"), [str(allowed)], use_env=False)
    for bad in ("file:/elsewhere/x.jsonl", "file:///elsewhere/x.jsonl", "file://localhost/elsewhere/x.jsonl",
                "FILE:///elsewhere/x.jsonl", "local:///elsewhere/x.jsonl", "local:/elsewhere/x.jsonl",
                "file://otherhost/x.jsonl", f"file://otherhost{allowed}/x.jsonl", f"file:{allowed}/%2e%2e/x",
                f"file://{allowed}/../x.jsonl", "file:/etc/passwd", f"file:{tmp_path}/allowed-evil/x"):
        assert not p.allows(bad), bad
    for good, path in ((f"file:{allowed}/x.jsonl", allowed / "x.jsonl"),
                       (f"file://{allowed}/x.jsonl", allowed / "x.jsonl"),
                       (f"file://localhost{allowed}/x.jsonl", allowed / "x.jsonl"),
                       (f"FILE://{allowed}/x.jsonl", allowed / "x.jsonl"),
                       ("file:x.jsonl", allowed / "sub" / "x.jsonl"),  # relative: to the working directory
                       ("x.jsonl", allowed / "sub" / "x.jsonl"),
                       (f"{allowed}/sub/../x.jsonl", allowed / "x.jsonl"),
                       (f"{allowed}//sub//x.jsonl", allowed / "sub" / "x.jsonl")):
        assert p.allows(good), good
        assert p.check(good) == os.path.realpath(path), good


def test_local_prefixes_match_by_path_segment_and_resolve_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()
    os.symlink(tmp_path / "ab", tmp_path / "a" / "link")
    p = LocationPolicy(None, [str(tmp_path / "a")], use_env=False)
    assert p.allows(str(tmp_path / "a" / "x")) and p.allows(str(tmp_path / "a"))
    assert not p.allows(str(tmp_path / "ab" / "x"))
    assert not p.allows(str(tmp_path / "a" / "link" / "x"))  # the link leads out of /a
    assert not p.allows(str(tmp_path / "a" / ".." / "ab" / "x"))
    # a plain path is never percent-decoded: '%2e%2e' is a folder name, and '..' leaves it, back into /a
    assert p.check(f"{tmp_path}/a/%2e%2e/../ab/x") == os.path.realpath(tmp_path / "a" / "ab" / "x")


def test_a_home_relative_location_must_be_allowed_both_ways(tmp_path, monkeypatch):
    """'~/x' is '$HOME/x' to fsspec and './~/x' to open(): approved only when both are allowed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert not LocationPolicy(None, [str(tmp_path / "home")], use_env=False).allows("~/x")
    assert not LocationPolicy(None, [str(tmp_path / "~")], use_env=False).allows("~/x")
    assert LocationPolicy(None, [str(tmp_path / "home"), str(tmp_path / "~")], use_env=False).allows("~/x")


def test_opaque_locations_need_an_exact_entry(tmp_path):
    p = LocationPolicy(str(tmp_path), ["s3://models/a"], use_env=False)
    for bad in ("simplecache::s3://models/a/x", "data:,hello", "data:text/plain;base64,aGVsbG8=",
                "http://u:p@h/a", "s3://models/a/x?versionId=1", "s3://models/a/x#frag", "zip://x::file:///y"):
        assert not p.allows(bad), bad
    assert LocationPolicy(None, ["simplecache::s3://models/a/x"], use_env=False).allows("simplecache::s3://models/a/x")


# -- the environment variable: split on os.pathsep ------------------------------------------------------


def test_environment_list_is_split_on_the_path_separator(tmp_path, monkeypatch):
    my = tmp_path / "my models"
    monkeypatch.setenv(ALLOW_ENV, str(my))
    p = LocationPolicy(None)
    assert p.allows(str(my / "net.safetensors"))
    assert not p.allows(str(tmp_path / "my" / "evil.safetensors"))
    assert not p.allows(str(tmp_path / "models" / "evil.safetensors"))
    monkeypatch.setenv(ALLOW_ENV, os.pathsep.join([str(tmp_path / "p1"), "s3://bucket/t", str(my),
                                                   "http://127.0.0.1:18950/a", "https://[::1]:8443/w", "", " "]))
    assert allowed_from_env() == (str(tmp_path / "p1"), "s3://bucket/t", str(my), "http://127.0.0.1:18950/a",
                                  "https://[::1]:8443/w")
    p = LocationPolicy(None)
    for good in (tmp_path / "p1" / "x", "s3://bucket/t/x", my / "x", "http://127.0.0.1:18950/a/x"):
        assert p.allows(str(good)), good
    for bad in (tmp_path / "my" / "x", "s3://bucket/x", "http://127.0.0.1:18950/b", "http://127.0.0.1/a/x"):
        assert not p.allows(str(bad)), bad


def test_split_locations_keeps_urls_and_file_urls_whole():
    sep = ":"
    assert split_locations("s3://b/a:/opt/m:file:///srv/t:http://h:8080/x:local:/y", sep=sep) == \
        ["s3://b/a", "/opt/m", "file:///srv/t", "http://h:8080/x", "local:/y"]
    assert split_locations("s3://bucket:/x", sep=sep) == ["s3://bucket", "/x"]
    assert split_locations("/a b/c:/d", sep=sep) == ["/a b/c", "/d"]
    assert split_locations("/a;/b", sep=";") == ["/a", "/b"]


# -- end to end: what is fetched is what was approved ---------------------------------------------------


class _LoggingHandler(SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):  # every request line, to the server's list
        self.server.requests.append(self.path)


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_LoggingHandler, directory=str(root)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.root, server.url = root, f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def _flownet_card(net_path: Path, teacher_spec: str):
    """A card of a flow-net teacher (its fingerprint is the real teacher's) naming ``teacher_spec``."""
    from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher, save_flow_net
    from storage_schemas import DatasetCard

    torch.manual_seed(0)
    net = FlowNet(FlowNetConfig("mlp", (10,), None, width=16, depth=1))
    net_path.parent.mkdir(parents=True, exist_ok=True)
    save_flow_net(net, net_path)
    teacher = FlowNetTeacher(net)
    sigmas = [1.0, 0.5, 0.0]
    card = DatasetCard(
        teacher={"kind": "flownet", "fingerprint": teacher.fingerprint(), "config": teacher.config()},
        solver={"name": "euler", "num_steps": 2, "sigmas": sigmas, "guidance": 1.0}, saved_sigmas=sigmas,
        sample_shape=[10], dtype="float32", conditioning={"kind": "none"},
        run={"teacher_spec": teacher_spec, "num_trajectories": 8, "shard_size": 8, "base_seed": 0},
        created_by="trajflow tests")
    return card, teacher.fingerprint()


@pytest.mark.parametrize("tail", ["a/%2e%2e/x/net.safetensors", "a/%2E%2E/x/net.safetensors",
                                  "a/..%2Fx/net.safetensors", "a/../x/net.safetensors", "a/.%2e/x/net.safetensors",
                                  "/a/net.safetensors"])
def test_train_fetches_nothing_outside_the_allowed_http_prefix(www, tmp_path, monkeypatch, tail):
    from trainer.teacher import teacher_from_card

    monkeypatch.setenv("TRAJFLOW_CACHE", str(tmp_path / "cache"))
    card, _ = _flownet_card(www.root / "x" / "net.safetensors", f"flownet:{www.url}/{tail}")  # the decoy
    with pytest.raises(LocationRefused, match="refusing to open") as e:
        teacher_from_card(card, root=str(tmp_path / "corpus"), allow=[f"{www.url}/a"])
    assert "\n" not in str(e.value)
    assert www.requests == []


def test_train_fetches_the_approved_http_location(www, tmp_path, monkeypatch):
    from trainer.teacher import teacher_from_card

    monkeypatch.setenv("TRAJFLOW_CACHE", str(tmp_path / "cache"))
    card, fp = _flownet_card(www.root / "a" / "net.safetensors", f"flownet:{www.url.upper()}/a/net.safetensors")
    teacher = teacher_from_card(card, root=str(tmp_path / "corpus"), allow=[f"{www.url}/a"])
    assert teacher.fingerprint() == fp
    assert www.requests and all(r.startswith("/a/") for r in www.requests), www.requests


def test_s3_literal_keys_outside_the_prefix_are_never_requested(s3_bucket, s3_env, tmp_path, monkeypatch):
    """moto holds a decoy at the literal key 'x/../a/net.safetensors': the card naming it is refused, no GET."""
    import s3fs

    from trainer.teacher import teacher_from_card

    monkeypatch.setenv("TRAJFLOW_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL"]})
    card, fp = _flownet_card(tmp_path / "net.safetensors", "")
    data = (tmp_path / "net.safetensors").read_bytes()
    for key in ("x/../a/net.safetensors", "/a/net.safetensors", "a/net.safetensors"):
        fs.pipe_file(f"{s3_bucket}/{key}", data)
    for spec in (f"s3://{s3_bucket}/x/../a/net.safetensors", f"s3://{s3_bucket}//a/net.safetensors",
                 f"s3://{s3_bucket}/a/%2e%2e/x/net.safetensors"):
        card.run["teacher_spec"] = f"flownet:{spec}"
        with pytest.raises(LocationRefused):
            teacher_from_card(card, root=str(tmp_path / "corpus"), allow=[f"s3://{s3_bucket}/a"])
    assert not (tmp_path / "cache" / "teachers").exists() or not list((tmp_path / "cache" / "teachers").iterdir())
    card.run["teacher_spec"] = f"flownet:s3://{s3_bucket}/a/net.safetensors"
    assert teacher_from_card(card, root=str(tmp_path / "corpus"), allow=[f"s3://{s3_bucket}/a"]).fingerprint() == fp


def test_load_prompts_reads_file_urls_as_the_policy_reads_them(tmp_path, monkeypatch):
    from pipeline.prompts import load_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt_id": 0, "prompt": "a red cat"}) + "\n")
    monkeypatch.chdir(tmp_path)
    for url in (str(f), f"file:{f}", f"file://{f}", f"file://localhost{f}", "p.jsonl", "file:p.jsonl"):
        assert load_prompts(url)[0] == ((0, "a red cat"),), url
        assert LocationPolicy(str(tmp_path), use_env=False).check(url) == str(f)
    with pytest.raises(ValueError):
        load_prompts(f"file://otherhost{f}")
