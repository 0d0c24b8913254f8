"""Cached weights are checked before they are trusted (issue 25, finding F9).

- The digits teacher's and the digits classifier's cache entries carry a digest of their tensors and
  metadata (safetensors metadata ``trajflow_sha256``, written with the entry in one rename): a perturbed,
  forged, truncated or pre-digest entry is refitted (the teacher's fingerprint stays the one a clean fit
  gives), and a warning names the file.
- Fetched teacher files (``storage_schemas.fetch.fetch_to_local``) carry a sidecar digest: a changed copy
  is downloaded again.
- Only regular files are opened: a FIFO, or a symlink to one, in an entry's place is a miss (rewritten),
  never a hang; a directory there is a one-line error naming it.

Real parts: the digits fit and classifier, safetensors files on disk, real FIFOs, fsspec's memory
filesystem as the remote store; a hang would be caught by the tests' timeouts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.timeout(600)
FIT = 40
SPEC = f"digits:8x8:fit={FIT}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A cache holding a clean fit of the teacher and the classifier; their fingerprint, info and weights."""
    from evaluation.digits import digits_classifier
    from models.digits import digits_teacher

    root = tmp_path_factory.mktemp("clean") / "cache"
    old = os.environ.get("TRAJFLOW_CACHE")
    os.environ["TRAJFLOW_CACHE"] = str(root)
    try:
        fp = digits_teacher(SPEC).fingerprint()
        net, info = digits_classifier()
    finally:
        if old is None:
            os.environ.pop("TRAJFLOW_CACHE", None)
        else:
            os.environ["TRAJFLOW_CACHE"] = old
    return {"root": root, "fp": fp, "info": info, "weights": {k: v.clone() for k, v in net.state_dict().items()}}


@pytest.fixture
def cache(tmp_path, monkeypatch, clean):
    """This test's cache: a copy of the clean one."""
    shutil.copytree(clean["root"], tmp_path / "cache")
    monkeypatch.setenv("TRAJFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _rewrite(path: Path, change) -> None:
    """The review's forge: read the entry's tensors and metadata, ``change(tensors, metadata)``, save again
    (metadata, the digest key included, copied)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _teacher_entry(cache: Path) -> Path:
    [p] = [f for f in (cache / "pretrained").glob("digits8x8-*.safetensors") if "classifier" not in f.name]
    return p


def _perturb(t, m):
    k = sorted(t)[0]
    t[k] = t[k] + 0.5


def _extra(t, m):
    m["trajflow_extra"] = json.dumps({"testbed": "digits:8x8:fit=999"})


def _pre_digest(t, m):  # an entry written before digests existed, holding other weights
    _perturb(t, m)
    m.pop("trajflow_sha256", None)


def _refit_named(caplog, path: Path, build):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = build()
    assert any(str(path) in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    return out


@pytest.mark.parametrize("change", [_perturb, _extra, _pre_digest])
def test_a_changed_teacher_entry_is_refitted(cache, clean, change, caplog):
    from models.digits import digits_teacher

    path = _teacher_entry(cache)
    mtime = path.stat().st_mtime_ns
    assert digits_teacher(SPEC).fingerprint() == clean["fp"] and path.stat().st_mtime_ns == mtime  # a clean hit
    _rewrite(path, change)
    assert _refit_named(caplog, path, lambda: digits_teacher(SPEC)).fingerprint() == clean["fp"]
    caplog.clear()
    mtime = path.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        assert digits_teacher(SPEC).fingerprint() == clean["fp"]  # the rewritten entry verifies: no refit
    assert path.stat().st_mtime_ns == mtime and not caplog.records
    assert not list(path.parent.glob("*.part*"))


@pytest.mark.parametrize("damage", ["truncated", "huge-header"])
def test_a_truncated_or_garbage_teacher_entry_is_refitted(cache, clean, damage, caplog):
    from models.digits import digits_teacher

    path = _teacher_entry(cache)
    data = path.read_bytes()
    path.write_bytes(data[:1000] if damage == "truncated" else (2**40).to_bytes(8, "little") + b"{}")
    assert _refit_named(caplog, path, lambda: digits_teacher(SPEC)).fingerprint() == clean["fp"]


@pytest.mark.timeout(120)  # a FIFO opened for reading would block: the timeout fails the test instead
@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo"])
def test_a_fifo_in_place_of_the_teacher_entry_is_a_miss_not_a_hang(cache, clean, tmp_path, kind, caplog):
    from models.digits import digits_teacher

    path = _teacher_entry(cache)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", path)
    assert _refit_named(caplog, path, lambda: digits_teacher(SPEC)).fingerprint() == clean["fp"]
    assert path.is_file() and not path.is_symlink()


def test_a_directory_in_place_of_the_teacher_entry_is_one_line_naming_it(cache):
    from models.digits import digits_teacher

    path = _teacher_entry(cache)
    path.unlink()
    path.mkdir()
    with pytest.raises(OSError) as e:
        digits_teacher(SPEC)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -- the classifier --------------------------------------------------------------------------------------


def _classifier_entry(cache: Path) -> Path:
    [p] = list((cache / "pretrained").glob("digits8x8-classifier-*.safetensors"))
    return p


def _forge_classifier(t, m):
    for k in t:
        t[k] = t[k] / 2
    meta = json.loads(m["trajflow_digits_classifier"])
    meta["held_out_accuracy"] = 0.9999
    m["trajflow_digits_classifier"] = json.dumps(meta)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["forged", "symlink-to-fifo"])
def test_a_forged_or_fifo_classifier_entry_is_trained_again(cache, clean, tmp_path, kind, caplog):
    from evaluation.digits import digits_classifier

    path = _classifier_entry(cache)
    if kind == "forged":
        _rewrite(path, _forge_classifier)
    else:
        path.unlink()
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", path)
    net, info = _refit_named(caplog, path, digits_classifier)
    assert info == clean["info"] and info["held_out_accuracy"] != 0.9999
    assert all(torch.equal(net.state_dict()[k], v) for k, v in clean["weights"].items())
    assert path.is_file() and not path.is_symlink()


# -- fetched teacher files --------------------------------------------------------------------------------

@pytest.mark.timeout(60)  # a FIFO opened for reading would block: the timeout fails the test instead
@pytest.mark.parametrize("mode", ["none", "tamper", "fifo", "symlink-to-fifo", "sidecar-fifo", "no-sidecar"])
def test_a_changed_fetched_copy_is_downloaded_again(tmp_path, mode):
    import fsspec

    from storage_schemas.fetch import DIGEST_SUFFIX, fetch_to_local

    url = f"memory://models/{mode}/net.safetensors"
    fsspec.filesystem("memory").pipe_file(f"/models/{mode}/net.safetensors", b"the real weights")
    local = fetch_to_local(url, str(tmp_path))
    assert Path(local).read_bytes() == b"the real weights"
    if mode == "tamper":
        Path(local).write_bytes(b"forged weights!!")
    elif mode in ("fifo", "symlink-to-fifo"):
        os.unlink(local)
        if mode == "fifo":
            os.mkfifo(local)
        else:
            os.mkfifo(tmp_path / "fifo")
            os.symlink(tmp_path / "fifo", local)
    elif mode == "sidecar-fifo":
        os.unlink(local + DIGEST_SUFFIX)
        os.mkfifo(local + DIGEST_SUFFIX)
    elif mode == "no-sidecar":
        os.unlink(local + DIGEST_SUFFIX)
    mtime = os.lstat(local).st_mtime_ns
    again = fetch_to_local(url, str(tmp_path))
    assert again == local and os.path.isfile(local) and not os.path.islink(local)
    assert Path(again).read_bytes() == b"the real weights"
    assert (os.lstat(local).st_mtime_ns == mtime) == (mode == "none")  # a verified copy is not fetched again
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]


def test_a_directory_in_place_of_a_fetched_copy_is_one_line_naming_it(tmp_path):
    import fsspec

    from storage_schemas.fetch import fetch_to_local

    fsspec.filesystem("memory").pipe_file("/models/d/net.safetensors", b"w")
    local = fetch_to_local("memory://models/d/net.safetensors", str(tmp_path))
    os.unlink(local)
    os.mkdir(local)
    with pytest.raises(OSError) as e:
        fetch_to_local("memory://models/d/net.safetensors", str(tmp_path))
    assert local in str(e.value) and "\n" not in str(e.value)
