"""`trajflow audit` against real corpora (local files and moto S3 over HTTP), each defect inflicted on
purpose: the audit must name the problem kind and the shard, exit 1, and never crash or hang."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from fsspec.core import url_to_fs

from storage_schemas import (
    COMMITS_DIR,
    DATASET_CARD,
    MANIFEST,
    MANIFEST_SCHEMA,
    DatasetCard,
    SampleRecord,
    iter_shard_samples,
    sample_key,
    write_shard_bytes,
)
from storage_schemas.audit import PROBLEM_KINDS, TOLERANCES, audit_corpus, format_text
from trajflow.cli_audit import add_audit_parser, main

pytestmark = pytest.mark.timeout(180)

GEN = dict(teacher="gmm:latent10", num_trajectories=96, shard_size=16, num_steps=16, stages=(8, 4),
           guidance="1.5:3.0", progress=False)
NUM_SHARDS = 6
# a protocol-0 pickle that would run os.system if anything ever unpickled it
PICKLE_BOMB = b"cos\nsystem\n(S'touch {marker}'\ntR."


def build_corpus(url: str, storage_options: dict | None = None) -> None:
    """A real corpus written the way the pipeline writes it (card, verified shards, commits, manifest)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import build_card, finalize
    from pipeline.storage import ObjectStore
    from pipeline.worker import GenerationWorker
    from storage_schemas import ShardCommit

    cfg = {**GEN, "out": url, "storage_options": storage_options or {}}
    worker = GenerationWorker(cfg, device="cpu")
    gen = GenerateConfig(**cfg)
    card = build_card(gen, worker.describe(), None)
    store = ObjectStore(url, storage_options)
    store.write_bytes(DATASET_CARD, card.to_json().encode())
    commits = {}
    for n in range(gen.num_shards):
        result = worker.process_shard(n, card.fingerprint())
        commit = ShardCommit(**{k: v for k, v in result.items() if not k.startswith("_")})
        commits[commit.shard_id] = commit
    finalize(store, card, commits)


class Corpus:
    """Test-side surgery on a corpus through fsspec (local or S3), keeping records consistent on request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = url_to_fs(url)

    def p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.p(rel))

    def write(self, rel: str, data: bytes) -> None:
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            self.fs.makedirs(self.p(rel).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.p(rel), data)
        self.fs.invalidate_cache()

    def delete(self, rel: str) -> None:
        self.fs.rm_file(self.p(rel))
        self.fs.invalidate_cache()

    # records
    def rows(self) -> list[dict]:
        return pq.read_table(pa.BufferReader(self.read(MANIFEST))).to_pylist()

    def write_rows(self, rows: list[dict]) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), sink)
        self.write(MANIFEST, sink.getvalue())

    def commit(self, sid: str) -> dict:
        return json.loads(self.read(f"{COMMITS_DIR}/{sid}.json"))

    def write_commit(self, record: dict) -> None:
        self.write(f"{COMMITS_DIR}/{record['shard_id']}.json", json.dumps(record, indent=2).encode())

    def card(self) -> dict:
        return json.loads(self.read(DATASET_CARD))

    def set_shard(self, sid: str, data: bytes, **changes) -> None:
        """Replace a shard's bytes and record valid hashes for them (commit record and manifest row)."""
        import hashlib

        self.write(f"shards/{sid}.tar", data)
        changes.update(sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
        record = {**self.commit(sid), **changes}
        self.write_commit(record)
        self.write_rows([{**r, **changes} if r["shard_id"] == sid else r for r in self.rows()])

    def set_card(self, card: dict) -> None:
        """Rewrite the card and re-seal every commit record and manifest row with its fingerprint."""
        self.write(DATASET_CARD, json.dumps(card, indent=2).encode())
        fp = DatasetCard.from_dict(card).fingerprint()
        for row in self.rows():
            self.write_commit({**self.commit(row["shard_id"]), "card_fingerprint": fp})
        self.write_rows([{**r, "card_fingerprint": fp} for r in self.rows()])

    def members(self, sid: str) -> list[tuple[str, bytes]]:
        with tarfile.open(fileobj=io.BytesIO(self.read(f"shards/{sid}.tar"))) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]

    def records(self, sid: str) -> list[SampleRecord]:
        return list(iter_shard_samples(self.read(f"shards/{sid}.tar"), sid))


def tar_bytes(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def traj_bytes(states: torch.Tensor, sigmas: torch.Tensor) -> bytes:
    return safetensors.torch.save({"states": states.contiguous(), "sigmas": sigmas.contiguous()})


def run_audit(capsys, url: str, *flags: str) -> tuple[int, dict]:
    """The CLI in-process with --json: (exit status, JSON report)."""
    capsys.readouterr()
    rc = main([url, "--json", "--no-progress", *flags])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def named(doc: dict, kind: str, shard: str | None = ...) -> list[dict]:  # type: ignore[assignment]
    return [p for p in doc["problems"] if p["kind"] == kind and (shard is ... or p["shard"] == shard)]


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "clean"
    build_corpus(str(root))
    return root


@pytest.fixture
def corpus(clean_dir, tmp_path) -> Corpus:
    """A fresh copy of the clean local corpus, to damage."""
    dst = tmp_path / "corpus"
    shutil.copytree(clean_dir, dst)
    return Corpus(str(dst))


# --- clean corpora ---------------------------------------------------------------------------


def test_clean_corpus_deep_replay_exits_0(corpus, capsys):
    rc, doc = run_audit(capsys, corpus.url, "--deep", "--replay", "8")
    assert rc == 0, doc["problems"]
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["num_shards"] == NUM_SHARDS and doc["num_samples"] == 96
    stats = doc["stats"]
    assert stats["samples"] == {"recorded": 96, "in_tars": 96, "deep_checked": 96, "trajectory_stats_from": 96}
    replay = stats["replay"]
    assert replay["available"] and replay["replayed"] == 8 and replay["authentic"] is True
    assert replay["max_deviation"] <= TOLERANCES["float32"]
    assert len({s["key"] for s in replay["samples"]}) == 8
    # statistics: per-window straightness of each stage, norms per sigma, shard sizes, conditions
    stages = {s["windows"]: s["per_window"] for s in stats["straightness"]}
    assert set(stages) == {8, 4} and len(stages[4]) == 4
    assert all(w["deviation_mean"] is None for w in stages[8])  # one saved interval per finest window
    assert all(0 < w["deviation_mean"] <= w["deviation_max"] and w["length_ratio_mean"] >= 1.0 for w in stages[4])
    assert [round(r["sigma"], 3) for r in stats["norms_per_sigma"]] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                                      0.25, 0.125, 0.0]
    assert 0.8 < stats["norms_per_sigma"][0]["mean"] < 1.2  # unit-variance noise at sigma 1
    assert stats["shards"]["count"] == NUM_SHARDS and stats["shards"]["samples_max"] == 16
    assert stats["conditions"]["kind"] == "class" and sum(stats["conditions"]["histogram"].values()) == 96
    assert 1.5 <= stats["guidance"]["min"] <= stats["guidance"]["max"] <= 3.0


def test_text_html_and_progress(corpus, capsys, tmp_path):
    html_path = tmp_path / "audit.html"
    capsys.readouterr()
    rc = main([corpus.url, "--deep", "--html", str(html_path)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "RESULT: clean (exit 0)" in captured.out and "straightness" in captured.out
    assert "audit shards" in captured.err  # tqdm on stderr
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 4 and "<table" not in page.split("Problems")[1][:40]
    capsys.readouterr()
    assert main([corpus.url, "--no-progress"]) == 0
    assert "audit shards" not in capsys.readouterr().err


def test_parser_wires_into_a_subcommand_tree(corpus, capsys):
    parser = argparse.ArgumentParser(prog="trajflow")
    sub = parser.add_subparsers(dest="command")
    add_audit_parser(sub)
    args = parser.parse_args(["audit", corpus.url, "--deep", "--replay", "2", "--json", "--no-progress",
                              "--sample-fraction", "0.5", "--storage-options", "{}"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"ok", "num_shards", "num_samples", "problems", "stats"}
    assert 0 < doc["stats"]["samples"]["deep_checked"] < 96
    assert any("--sample-fraction" in n for n in doc["notes"])


@pytest.mark.parametrize("flags", [["--sample-fraction", "0"], ["--sample-fraction", "x"], ["--replay", "-1"],
                                   ["--storage-options", "not json"], ["--storage-options", "[1]"],
                                   ["--workers", "0"], ["--bogus"]])
def test_bad_flags_exit_2(corpus, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main([corpus.url, *flags])
    assert exc.value.code == 2


def test_unreadable_corpora_exit_2(tmp_path, capsys):
    rc, doc = run_audit(capsys, str(tmp_path / "does-not-exist"))
    assert rc == 2 and doc["ok"] is False and "nothing at" in doc["fatal"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    rc, doc = run_audit(capsys, str(tmp_path / "junk"))
    assert rc == 2 and "nothing to audit" in doc["fatal"]
    (tmp_path / "badcard").mkdir()
    (tmp_path / "badcard" / DATASET_CARD).write_text("{not json")
    rc, doc = run_audit(capsys, str(tmp_path / "badcard"))
    assert rc == 2 and "unreadable dataset card" in doc["fatal"]
    rc, doc = run_audit(capsys, str(tmp_path / "junk" / "notes.txt"))
    assert rc == 2 and "not a corpus root" in doc["fatal"]
    # the module entry point gives the same status to a shell
    r = subprocess.run([sys.executable, "-m", "trajflow.cli_audit", str(tmp_path / "nope"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "CANNOT AUDIT" in r.stdout


# --- each defect, named with its kind and shard ------------------------------------------------


def test_flipped_bytes(corpus, capsys):
    data = bytearray(corpus.read("shards/shard-000002.tar"))
    data[len(data) // 2] ^= 0xFF
    corpus.write("shards/shard-000002.tar", bytes(data))
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    assert named(doc, "sha256_mismatch", "shard-000002")
    assert {p["shard"] for p in doc["problems"]} == {"shard-000002"}


def test_truncated_shard(corpus, capsys):
    data = corpus.read("shards/shard-000003.tar")
    corpus.write("shards/shard-000003.tar", data[: len(data) // 2 + 100])
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    for kind in ("size_mismatch", "sha256_mismatch", "tar_corrupt"):
        assert named(doc, kind, "shard-000003"), kind
    assert not named(doc, "count_mismatch")  # an unreadable tail is tar_corrupt, not a miscount


def test_deleted_shard(corpus, capsys):
    corpus.delete("shards/shard-000001.tar")
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    [p] = named(doc, "shard_missing")
    assert p["shard"] == "shard-000001" and "indices 16..31" in p["detail"]


def test_orphan_objects(corpus, capsys):
    corpus.write("shards/shard-000042.tar", corpus.read("shards/shard-000000.tar"))
    corpus.write("tmp/upload-7f3a.part", b"partial upload")
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    orphans = {p["path"]: p for p in named(doc, "orphan_object")}
    assert set(orphans) == {"shards/shard-000042.tar", "tmp/upload-7f3a.part"}
    assert orphans["shards/shard-000042.tar"]["shard"] == "shard-000042"
    assert "crashed" in orphans["shards/shard-000042.tar"]["detail"]


def test_shard_duplicated_under_a_new_id(corpus, capsys):
    corpus.write("shards/shard-000006.tar", corpus.read("shards/shard-000001.tar"))
    record = {**corpus.commit("shard-000001"), "shard_id": "shard-000006", "path": "shards/shard-000006.tar"}
    corpus.write_commit(record)
    corpus.write_rows(corpus.rows() + [{k: record[k] for k in MANIFEST_SCHEMA.names}])
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    for kind in ("duplicate_sample_key", "duplicate_seed", "duplicate_shard", "plan_mismatch"):
        found = named(doc, kind, "shard-000006")
        assert found and all("shard-000001" in p["detail"] or kind == "plan_mismatch" for p in found), kind
    assert {p["shard"] for p in doc["problems"]} == {"shard-000006"}


def test_duplicate_shard_id_rows(corpus, capsys):
    rows = corpus.rows()
    corpus.write_rows(rows + [rows[2]])
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    assert named(doc, "duplicate_shard_id", "shard-000002")


def test_wrong_schema_versions(corpus, capsys):
    card = corpus.card()
    card["schema_version"] = 2
    corpus.write(DATASET_CARD, json.dumps(card).encode())
    record = corpus.commit("shard-000004")
    corpus.write_commit({**record, "schema_version": 99})
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    [card_problem] = named(doc, "schema_version", None)
    assert card_problem["path"] == DATASET_CARD and "schema_version 2" in card_problem["detail"]
    assert named(doc, "schema_version", "shard-000004")
    assert any("without a readable card" in n for n in doc["notes"])


def test_nan_sample_with_valid_hashes(corpus, capsys):
    members = corpus.members("shard-000004")
    key = sample_key(4 * 16 + 5)
    rec = next(r for r in corpus.records("shard-000004") if r.key == key)
    states = rec.states.clone()
    states[3, 1, 2, 2] = float("nan")
    members = [(n, traj_bytes(states, rec.sigmas) if n == f"{key}.traj.safetensors" else d) for n, d in members]
    corpus.set_shard("shard-000004", tar_bytes(members))
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 0  # hashes and members are consistent: only decoding finds it
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    [p] = named(doc, "non_finite")
    assert p["shard"] == "shard-000004" and key in p["detail"] and "state(s) [3]" in p["detail"]


def test_pickle_payload_and_path_traversal_members_are_reported_never_decoded(corpus, capsys, tmp_path):
    marker = tmp_path / "pwned"
    members = corpus.members("shard-000002")
    key = sample_key(2 * 16 + 3)
    at = [n for n, _ in members].index(f"{key}.traj.safetensors") + 1
    members.insert(at, (f"{key}.pickle", PICKLE_BOMB.replace(b"{marker}", str(marker).encode())))
    members.append(("../../x", b"escape"))
    link = tarfile.TarInfo("0000000099.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    corpus.set_shard("shard-000002", tar_bytes(members, [link]))
    for flags in ([], ["--deep", "--replay", "96"]):
        rc, doc = run_audit(capsys, corpus.url, *flags)
        assert rc == 1
        unsafe = {p["detail"].split("'")[1]: p for p in named(doc, "unsafe_member", "shard-000002")}
        assert set(unsafe) == {f"{key}.pickle", "../../x", "0000000099.json"}
        assert "path traversal" in unsafe["../../x"]["detail"] and "symbolic link" in unsafe["0000000099.json"]["detail"]
        assert {p["kind"] for p in doc["problems"]} == {"unsafe_member"}  # the 16 real samples are intact
    assert not marker.exists()


def test_per_sample_defects_deep(corpus, capsys):
    sid = "shard-000001"
    recs = {r.key: r for r in corpus.records(sid)}
    members = dict(corpus.members(sid))
    k = [sample_key(16 + i) for i in range(16)]
    r = recs[k[0]]
    members[f"{k[0]}.traj.safetensors"] = traj_bytes(r.states[:, :2], r.sigmas)  # wrong shape
    members[f"{k[1]}.traj.safetensors"] = traj_bytes(recs[k[1]].states.half(), recs[k[1]].sigmas)  # wrong dtype
    members[f"{k[2]}.traj.safetensors"] = traj_bytes(recs[k[2]].states, recs[k[2]].sigmas * 0.5)  # wrong sigmas
    meta = dict(recs[k[3]].meta)
    del meta["seed"]
    members[f"{k[3]}.json"] = json.dumps(meta).encode()  # metadata field missing
    members[f"{k[4]}.json"] = json.dumps({**recs[k[4]].meta, "class_id": 99}).encode()  # out of range
    members[f"{k[5]}.traj.safetensors"] = b"\x00garbage"  # not safetensors
    del members[f"{k[6]}.json"], members[f"{k[6]}.traj.safetensors"]  # a sample dropped from the tar
    corpus.set_shard(sid, tar_bytes(list(members.items())))
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    expect = {"shape_mismatch": k[0], "dtype_mismatch": k[1], "sigma_mismatch": k[2], "metadata_missing": k[3],
              "metadata_invalid": k[4], "decode_error": k[5]}
    for kind, key in expect.items():
        [p] = named(doc, kind, sid)
        assert key in p["detail"], (kind, p)
    [count] = named(doc, "count_mismatch", sid)
    assert "15 samples" in count["detail"] and f"missing indices {16 + 6}" in count["detail"]
    assert {p["shard"] for p in doc["problems"]} == {sid}


def test_seed_reused_inside_a_shard(corpus, capsys):
    sid = "shard-000003"
    recs = corpus.records(sid)
    meta = {**recs[9].meta, "seed": recs[2].seed}  # sample 57 claims the seed of sample 50
    recs[9] = SampleRecord(recs[9].key, recs[9].states, recs[9].sigmas, meta)
    corpus.set_shard(sid, write_shard_bytes(recs))
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    [dup] = named(doc, "duplicate_seed", sid)
    assert "twice in this shard" in dup["detail"] and str(recs[2].seed) in dup["detail"]
    [rule] = named(doc, "seed_mismatch", sid)
    assert recs[9].key in rule["detail"]


def test_not_finalized_reports_what_the_commit_records_say(corpus, capsys):
    corpus.delete(MANIFEST)
    corpus.delete(f"{COMMITS_DIR}/shard-000005.json")
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    [p] = named(doc, "not_finalized", None)
    assert "5 valid commit record(s) hold 80 samples" in p["detail"] and "without a commit record: shard-000005" in p["detail"]
    [gap] = named(doc, "index_gap")
    assert "indices 80..95" in gap["detail"]
    [orphan] = named(doc, "orphan_object")
    assert orphan["shard"] == "shard-000005"
    assert doc["num_shards"] == 5 and doc["stats"]["source"] == "commits"


def test_commit_record_missing_from_manifest(corpus, capsys):
    corpus.write_rows([r for r in corpus.rows() if r["shard_id"] != "shard-000003"])
    rc, doc = run_audit(capsys, corpus.url)
    assert rc == 1
    assert named(doc, "commit_not_in_manifest", "shard-000003")
    [gap] = named(doc, "index_gap")
    assert "indices 48..63" in gap["detail"] and gap["shard"] == "shard-000004"
    assert not named(doc, "orphan_object")  # its commit record names the shard


def test_absurd_records_neither_hang_nor_crash(corpus, capsys):
    rows = corpus.rows()
    rows[5] = {**rows[5], "last_index": 10**12, "num_samples": 10**12 - rows[5]["first_index"] + 1}
    rows[0] = {**rows[0], "path": "shards/../../../etc/passwd"}
    corpus.write_rows(rows)
    corpus.write_commit({"schema_version": 1, "shard_id": "shard-000003", "oops": True})
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 1
    assert "missing indices 96..1000000000000" in named(doc, "count_mismatch", "shard-000005")[0]["detail"]
    assert named(doc, "plan_mismatch", "shard-000005")
    assert "invalid relative path" in named(doc, "manifest_invalid", "shard-000000")[0]["detail"]
    assert named(doc, "commit_invalid", "shard-000003")


def test_garbage_manifest_and_missing_card(corpus, capsys):
    corpus.write(MANIFEST, b"PAR1 not really parquet")
    corpus.delete(DATASET_CARD)
    rc, doc = run_audit(capsys, corpus.url, "--deep", "--replay", "4")
    assert rc == 1
    assert named(doc, "manifest_invalid", None) and named(doc, "card_missing", None)
    assert doc["num_shards"] == NUM_SHARDS  # the commit records were audited instead
    assert any("replay unavailable" in n for n in doc["notes"])


def test_replay_reports_altered_states(corpus, capsys):
    sid = "shard-000001"
    recs = corpus.records(sid)
    altered = {recs[3].key, recs[11].key}
    new = [SampleRecord(r.key, r.states * 1.001 if r.key in altered else r.states, r.sigmas, r.meta) for r in recs]
    corpus.set_shard(sid, write_shard_bytes(new))
    rc, doc = run_audit(capsys, corpus.url, "--deep")
    assert rc == 0  # consistent hashes, valid samples: only replay can tell
    rc, doc = run_audit(capsys, corpus.url, "--replay", "96")
    assert rc == 1
    found = named(doc, "replay_mismatch")
    assert {p["shard"] for p in found} == {sid}
    assert {p["detail"].split()[1] for p in found} == altered
    assert doc["stats"]["replay"]["replayed"] == 96 and doc["stats"]["replay"]["authentic"] is False
    # every sample altered: the 8 replayed ones are all reported
    for n in range(NUM_SHARDS):
        s = f"shard-{n:06d}"
        corpus.set_shard(s, write_shard_bytes([SampleRecord(r.key, r.states + 1e-3, r.sigmas, r.meta)
                                               for r in corpus.records(s)]))
    rc, doc = run_audit(capsys, corpus.url, "--replay", "8")
    assert rc == 1 and len(named(doc, "replay_mismatch")) == 8


def test_teacher_mismatch_and_replay_unavailable(corpus, capsys):
    card = corpus.card()
    card["teacher"]["fingerprint"] = "0" * 64
    corpus.set_card(card)
    rc, doc = run_audit(capsys, corpus.url, "--replay", "4")
    assert rc == 1
    assert named(doc, "teacher_mismatch", None) and {p["kind"] for p in doc["problems"]} == {"teacher_mismatch"}
    card["teacher"] = {"kind": "flownet", "fingerprint": "f" * 64, "config": {"kind": "flownet"}}
    card["run"]["teacher_spec"] = "flownet:s3://models/net.safetensors"
    corpus.set_card(card)
    rc, doc = run_audit(capsys, corpus.url, "--replay", "4")
    assert rc == 0, doc["problems"]
    assert any(n.startswith("replay unavailable") and "--replay-teacher" in n for n in doc["notes"])
    assert doc["stats"]["replay"]["available"] is False


def test_hostile_member_names_are_escaped_in_html(corpus, capsys, tmp_path):
    members = corpus.members("shard-000000") + [("<script>alert(1)<", b"x")]
    corpus.set_shard("shard-000000", tar_bytes(members))
    out = tmp_path / "r.html"
    capsys.readouterr()
    assert main([corpus.url, "--no-progress", "--html", str(out)]) == 1
    page = out.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;" in page
    assert "unsafe_member" in capsys.readouterr().out


def test_every_kind_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text()
    missing = [k for k in PROBLEM_KINDS if f"`{k}`" not in doc]
    assert not missing, missing


# --- S3 (moto over HTTP) -----------------------------------------------------------------------


def test_s3_corpus_clean_then_damaged(s3_bucket, s3_env, moto_endpoint, capsys, monkeypatch):
    url = f"s3://{s3_bucket}/corpora/latent10"
    build_corpus(url)
    rc, doc = run_audit(capsys, url, "--deep", "--replay", "8")
    assert rc == 0, doc["problems"]
    assert doc["num_samples"] == 96 and doc["stats"]["replay"]["authentic"]

    c = Corpus(url)
    data = bytearray(c.read("shards/shard-000002.tar"))
    data[5000] ^= 0x01
    c.write("shards/shard-000002.tar", bytes(data))
    c.write("shards/shard-000003.tar", c.read("shards/shard-000003.tar")[:20000])
    c.delete("shards/shard-000001.tar")
    c.write("shards/shard-000077.tar.tmp", b"leftover")
    members = c.members("shard-000004") + [("../../x", b"escape")]
    c.set_shard("shard-000004", tar_bytes(members))
    # endpoint given as --storage-options instead of the environment
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = json.dumps({"client_kwargs": {"endpoint_url": moto_endpoint}})
    rc, doc = run_audit(capsys, url, "--deep", "--storage-options", opts)
    assert rc == 1
    assert named(doc, "sha256_mismatch", "shard-000002")
    assert named(doc, "tar_corrupt", "shard-000003") and named(doc, "size_mismatch", "shard-000003")
    assert named(doc, "shard_missing", "shard-000001")
    assert named(doc, "unsafe_member", "shard-000004")
    [orphan] = named(doc, "orphan_object")
    assert orphan["path"] == "shards/shard-000077.tar.tmp"
    assert "testing-secret" not in json.dumps(doc) and "testing-secret" not in format_text(
        audit_corpus(url, storage_options=json.loads(opts)))


def test_flaky_s3_transfers_are_not_reported_as_defects(s3_bucket, s3_env, moto_endpoint, capsys):
    """Through a fault-injecting proxy: 5xx, responses cut short or with a flipped byte, and dropped
    connections while reading shards. Retries and a confirming re-read absorb them: the clean
    corpus stays clean, and a real defect is still found."""
    sys.path.insert(0, str(Path(__file__).parent))
    from s3_fault_proxy import FaultPolicy, FaultRule, S3FaultProxy

    url = f"s3://{s3_bucket}/flaky"
    build_corpus(url)
    # each fault once, on its own shard's first read: deterministic (a random draw over the request
    # path, which holds the test's random bucket name, sometimes skipped one of the actions)
    policy = FaultPolicy([
        FaultRule(action, rate=1.0, methods=("GET",), path=rf"/shards/shard-00000{i}\.tar$", first=1,
                  max_consecutive=1, name=action)
        for i, action in enumerate(("error", "corrupt", "truncate", "drop"))
    ], seed=3)
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        opts = json.dumps({"client_kwargs": {"endpoint_url": proxy.url}})
        rc, doc = run_audit(capsys, url, "--deep", "--storage-options", opts)
        injected = policy.total()
        assert rc == 0, doc["problems"]
        assert injected == 4 and all(policy.total(action=a) == 1 for a in ("error", "corrupt", "truncate", "drop")), \
            policy.summary()
        data = bytearray(Corpus(url).read("shards/shard-000003.tar"))
        data[len(data) // 2] ^= 0x40
        Corpus(url).write("shards/shard-000003.tar", bytes(data))
        rc, doc = run_audit(capsys, url, "--storage-options", opts)
    assert rc == 1 and {p["kind"] for p in doc["problems"]} == {"sha256_mismatch"}
    assert named(doc, "sha256_mismatch", "shard-000003")
