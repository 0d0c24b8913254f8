"""Bounded inputs (issue 16): crafted corpora cannot make the readers, the audit or the trainer's
stream run long, allocate without bound, recurse, or follow links out of the root.

Real parts: corpora on the local disk written the way the pipeline writes them, the real auditor and
the CLI (`trajflow audit`), the trainer's real CorpusStream (with ``on_corrupt``), real tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import webdataset
from synthetic_corpus import build_corpus, cfg_for, consume, make_card, make_record, split_batch

import storage_schemas as ss
from storage_schemas import CorpusFormatError, DatasetCard, ShardCommit, decode_sample, iter_shard_members
from storage_schemas.audit import audit_corpus
from storage_schemas.limits import MAX_CARD_BYTES, MAX_JSON_DEPTH, MAX_SAMPLE_JSON_BYTES
from storage_schemas.record import decode_spans_into
from storage_schemas.shard import index_shard_members
from trainer.data import CorpusStream, CorruptShardError

pytestmark = pytest.mark.timeout(180)
TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))


def audit_cli(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([TRAJFLOW, "audit", url, "--no-progress"], capture_output=True, text=True, timeout=120)


def set_shard(root: Path, n: int, data: bytes) -> None:
    """Replace shard n's bytes and make its commit record and manifest row describe them."""
    sid = ss.shard_id(n)
    (root / ss.shard_relpath(sid)).write_bytes(data)
    rec = json.loads((root / ss.commit_relpath(sid)).read_text())
    rec.update(sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
    (root / ss.commit_relpath(sid)).write_text(json.dumps(rec))
    rows = ss.manifest_from_parquet_bytes((root / ss.MANIFEST).read_bytes())
    rows = [ShardCommit.from_json(json.dumps(rec)) if r.shard_id == sid else r for r in rows]
    (root / ss.MANIFEST).write_bytes(ss.manifest_to_parquet_bytes(rows))


def shard_with_meta(card: DatasetCard, indices: range, meta_bytes: dict[int, bytes]) -> bytes:
    """A shard of ``indices`` whose sample i carries ``meta_bytes[i]`` as its JSON member."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, compress=False, mtime=0) as writer:
        for i in indices:
            members = ss.encode_sample(make_record(i, card))
            if i in meta_bytes:
                members["json"] = meta_bytes[i]
            writer.write({"__key__": ss.sample_key(i), **members})
    return buffer.getvalue()


def deep_json(depth: int) -> bytes:
    return b'{"index": 0, "x": ' + b"[" * depth + b"]" * depth + b"}"


def claimed_size_shard(name: str, claimed: int, actual: int = 10 * 1024) -> bytes:
    """~10 KiB: one member header (GNU base-256 size field) claiming ``claimed`` bytes, then ``actual`` bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = claimed, 0, 0o444
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + b"\x01" * actual


# ------------------------------------------------------------------------------------------------
# tar headers that claim huge sizes


@pytest.mark.parametrize("name,claimed", [("evil.bin", 10**12), ("0000000008.json", 10**12),
                                          ("0000000008.traj.safetensors", 900 * 2**20)])
def test_stream_reader_time_and_memory_do_not_depend_on_claimed_sizes(name, claimed):
    data = claimed_size_shard(name, claimed)
    for source in (data, io.BytesIO(data)):
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(CorpusFormatError) as info:
            list(iter_shard_members(source, "shard-x", collect_unsafe=[]))
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 2.0 and peak < 16 * 2**20, (seconds, peak)
        assert "shard-x" in str(info.value) and "\n" not in str(info.value)


def test_audit_of_a_shard_claiming_a_terabyte_is_fast_and_reports_it(tmp_path):
    root = tmp_path / "c"
    build_corpus(str(root), num=32, shard_size=8)
    set_shard(root, 1, claimed_size_shard("evil.bin", 10**12))
    t0 = time.perf_counter()
    report = audit_corpus(str(root), deep=True)
    assert time.perf_counter() - t0 < 20
    kinds = {(p.kind, p.shard) for p in report.problems}
    assert ("tar_corrupt", "shard-000001") in kinds, report.problems
    r = audit_cli(str(root))
    assert r.returncode == 1 and "tar_corrupt" in r.stdout


# ------------------------------------------------------------------------------------------------
# sample JSON: size and nesting limits, through the codec, the audit and the trainer's stream


def test_sample_json_limits_raise_the_corrupt_data_error():
    card = make_card(8, 8)
    members = ss.encode_sample(make_record(0, card))
    big = json.dumps({"index": 0, "pad": "x" * (50 * 2**20)}).encode()
    for meta, match in [(big, "byte limit"), (deep_json(100_000), "nested deeper"),
                        (deep_json(MAX_JSON_DEPTH + 1), "nested deeper")]:
        with pytest.raises(CorpusFormatError, match=match):
            decode_sample(ss.sample_key(0), {**members, "json": meta}, card)
    # the batch decoder (the trainer's path) returns the same error for that sample, not a RecursionError
    data = shard_with_meta(card, range(4), {2: deep_json(50_000)})
    out = decode_spans_into(data, index_shard_members(data, "shard-000000"), card,
                            torch.empty((4, *card.states_shape)), torch.empty((4, len(card.saved_sigmas))))
    assert isinstance(out[2], CorpusFormatError) and "nested deeper" in str(out[2])
    assert all(isinstance(r, dict) for i, r in enumerate(out) if i != 2)
    assert len(big) > MAX_SAMPLE_JSON_BYTES


@pytest.mark.parametrize("meta", [deep_json(100_000), json.dumps({"index": 13, "p": "x" * (50 * 2**20)}).encode()],
                         ids=["deep", "50MB"])
def test_trainer_stream_skips_an_oversized_or_deep_sample_json(tmp_path, meta):
    card = make_card(16, 8)
    url = str(tmp_path / "c")
    build_corpus(url, num=16, shard_size=8, shard_bytes={1: shard_with_meta(card, range(8, 16), {13: meta})})
    with pytest.raises(CorruptShardError, match=r"shard-000001.*0000000013"):
        consume(CorpusStream(cfg_for(url, tmp_path, shuffle_buffer=4), 0, 1), 0)
    stream = CorpusStream(cfg_for(url, tmp_path, shuffle_buffer=4, on_corrupt="skip"), 0, 1)
    items = [x for s in consume(stream, 0) for x in split_batch(s)]
    assert [int(x["index"]) for x in items if not x["valid"]] == [13]
    assert stream.skipped_samples == 1
    report = audit_corpus(url, deep=True)
    assert ("decode_error", "shard-000001") in {(p.kind, p.shard) for p in report.problems}


# ------------------------------------------------------------------------------------------------
# the card: size and nesting limits


def test_card_limits(tmp_path):
    card = json.loads(make_card(16, 8).to_json())
    big = json.dumps({**card, "run": {**card["run"], "pad": "x" * (60 * 2**20)}}).encode()
    with pytest.raises(CorpusFormatError, match="byte limit"):
        DatasetCard.from_json(big)
    deep = json.dumps({**card, "run": {**card["run"], "x": 0}}).encode().replace(b'"x": 0', b'"x": ' + b"[" * 100_000
                                                                                  + b"]" * 100_000)
    with pytest.raises(CorpusFormatError, match="nested deeper"):
        DatasetCard.from_json(deep)
    assert len(big) > MAX_CARD_BYTES
    for label, data in (("big", big), ("deep", deep)):
        root = tmp_path / label
        build_corpus(str(root), num=16, shard_size=8)
        (root / ss.DATASET_CARD).write_bytes(data)
        report = audit_corpus(str(root))
        card_problems = [p for p in report.problems if p.kind == "card_invalid"]
        assert card_problems and report.exit_status == 1, report.problems
        assert ("byte limit" if label == "big" else "nested deeper") in card_problems[0].detail
        r = audit_cli(str(root))
        assert r.returncode == 1 and "card_invalid" in r.stdout and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# symlinks inside a local corpus root


def test_audit_refuses_a_symlinked_shard_and_card(tmp_path):
    root = tmp_path / "c"
    build_corpus(str(root), num=32, shard_size=8)
    outside = tmp_path / "outside.tar"
    outside.write_bytes((root / "shards/shard-000002.tar").read_bytes())  # even identical bytes are refused
    (root / "shards/shard-000002.tar").unlink()
    (root / "shards/shard-000002.tar").symlink_to(outside)
    report = audit_corpus(str(root), deep=True)
    refused = [p for p in report.problems if p.kind == "symlink_refused"]
    assert [p.shard for p in refused] == ["shard-000002"] and report.exit_status == 1
    assert "symbolic link" in refused[0].detail and str(outside) in refused[0].detail
    # a linked card is refused too (card_invalid naming the link), never read
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps({"not": "a card"}))
    (root / ss.DATASET_CARD).unlink()
    (root / ss.DATASET_CARD).symlink_to(secret)
    r = audit_cli(str(root))
    assert r.returncode == 1, r.stderr
    assert "card_invalid" in r.stdout and "symbolic link" in r.stdout and "symlink_refused" in r.stdout
    assert "Traceback" not in r.stderr


def test_a_root_that_is_itself_a_link_is_fine(tmp_path):
    real = tmp_path / "real"
    build_corpus(str(real), num=16, shard_size=8)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert audit_corpus(str(tmp_path / "alias"), deep=True).exit_status == 0


# ------------------------------------------------------------------------------------------------
# the documented exit code of an unreadable manifest (docs/audit.md, docs/runbook.md)


def test_unreadable_manifest_is_manifest_invalid_exit_1_and_nothing_to_audit_is_exit_2(tmp_path):
    root = tmp_path / "c"
    build_corpus(str(root), num=16, shard_size=8)
    (root / ss.MANIFEST).write_bytes(b"PAR1 this is not parquet")
    r = audit_cli(str(root))
    assert r.returncode == 1 and "manifest_invalid" in r.stdout, r.stdout + r.stderr
    # nothing left to audit at all: no readable card, no manifest, no commit record
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ss.DATASET_CARD).write_bytes(b"[" * 100_000)
    r = audit_cli(str(bare))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
