"""The validation split cannot be training data (issue 25, finding F4).

- A validation shard that is a byte copy of a training shard (its commit record and manifest row
  rewritten to match the bytes) is refused by ``load_validation`` (one line naming the shard), so the
  trainer exits 1; with ``on_corrupt="skip"`` those samples are skipped, and a warning says so.
- The card's split and the manifest's copy of it (``trajflow.split``) are cross-checked, by the audit and
  by the trainer (``storage_schemas.split.check_split_consistency``); invalid JSON there is a problem too.

Real parts: corpora written by the generation worker and committer, the real auditor and CLI, the
trainer's ``load_validation`` and ``trajflow train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import make_gmm_corpus as make_corpus

from storage_schemas import CorpusFormatError, DatasetCard
from storage_schemas.audit import audit_corpus
from storage_schemas.manifest import (
    MANIFEST_SPLIT_KEY,
    manifest_from_parquet_bytes,
    manifest_to_parquet_bytes,
)
from storage_schemas.split import SplitError, check_split_consistency, validation_guard
from trainer.validation import load_validation

pytestmark = pytest.mark.timeout(300)
TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))
KEEP = object()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """latent10, 8 shards of 32; shard-000006 and shard-000007 are the validation split (indices 192..255)."""
    root = tmp_path_factory.mktemp("split") / "l10"
    make_corpus(str(root), 256, 32, stages=(8, 4), validation=64)
    return root


@pytest.fixture
def corpus(base, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(base, root)
    return root


def split_meta(root: Path) -> bytes | None:
    return (pq.read_schema(root / "manifest.parquet").metadata or {}).get(MANIFEST_SPLIT_KEY.encode())


def refp(root: Path, edit=None, meta=KEEP, rows_edit=None) -> None:
    """Rewrite the card (``edit(card_dict)``), then every commit record and the manifest with its fingerprint;
    ``meta``: the raw ``trajflow.split`` value (None: no key; KEEP: as it was)."""
    old = split_meta(root)
    card = json.loads((root / "dataset.json").read_text())
    if edit is not None:
        edit(card)
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    (root / "dataset.json").write_text(text)
    fp = DatasetCard.from_json(text).fingerprint()
    rows = [dataclasses.replace(r, card_fingerprint=fp)
            for r in manifest_from_parquet_bytes((root / "manifest.parquet").read_bytes())]
    if rows_edit is not None:
        rows = rows_edit(rows)
    for r in rows:
        (root / "commits" / f"{r.shard_id}.json").write_text(r.to_json())
    table = pq.read_table(pa.BufferReader(manifest_to_parquet_bytes(rows)))
    md = dict(table.schema.metadata)
    value = old if meta is KEEP else (meta.encode() if isinstance(meta, str) else meta)
    md.pop(MANIFEST_SPLIT_KEY.encode(), None)
    if value is not None:
        md[MANIFEST_SPLIT_KEY.encode()] = value
    pq.write_table(table.replace_schema_metadata(md), root / "manifest.parquet", compression="zstd")


def copy_shard(root: Path, src: int, dst: int, *, claim_source_range: bool = False) -> None:
    """The review's recipe: shard ``dst``'s bytes become shard ``src``'s, and its commit record and manifest
    row are rewritten to match those bytes (``claim_source_range``: also the index range and seed)."""
    data = (root / "shards" / f"shard-{src:06d}.tar").read_bytes()
    (root / "shards" / f"shard-{dst:06d}.tar").write_bytes(data)

    def rewrite(rows):
        by_id = {r.shard_id: r for r in rows}
        source = by_id[f"shard-{src:06d}"]
        out = []
        for r in rows:
            if r.shard_id == f"shard-{dst:06d}":
                r = dataclasses.replace(r, sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
                if claim_source_range:
                    r = dataclasses.replace(r, first_index=source.first_index, last_index=source.last_index,
                                            seed=source.seed)
            out.append(r)
        return out

    refp(root, rows_edit=rewrite)


def train_cli(data: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    args = [TRAJFLOW, "train", "--data", str(data), "--out", str(out), "--stages", "4", "--batch-size", "16",
            "--max-steps", "6", "--eval-every", "3", "--init", "scratch", "--student-width", "32",
            "--student-depth", "1", "--no-progress", "--num-workers", "0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# -- a validation shard that is training data ----------------------------------------------------------


@pytest.mark.parametrize("src,dst,claim", [(0, 7, False), (3, 6, False), (0, 7, True), (5, 6, True)])
def test_a_copied_training_shard_is_refused_as_validation(corpus, tmp_path, src, dst, claim):
    copy_shard(corpus, src, dst, claim_source_range=claim)
    with pytest.raises(CorpusFormatError) as e:
        load_validation(str(corpus), cache_dir=str(tmp_path / "sc"))
    assert f"shard-{dst:06d}" in str(e.value) and "\n" not in str(e.value)


def test_with_skip_the_evaluation_skips_those_samples_and_says_so(corpus, tmp_path, caplog):
    copy_shard(corpus, 0, 7)
    with caplog.at_level(logging.WARNING):
        val = load_validation(str(corpus), cache_dir=str(tmp_path / "sc"), on_corrupt="skip")
    idx = sorted(val.batch["index"].tolist())
    assert idx == list(range(192, 224))  # shard-000006 only: none of the copied training samples
    assert val.shard_ids == ["shard-000006"] and val.skipped == 32
    assert any("shard-000007" in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)


def test_with_skip_and_nothing_left_there_is_no_validation(corpus, tmp_path, caplog):
    copy_shard(corpus, 0, 7)
    copy_shard(corpus, 1, 6, claim_source_range=True)
    with caplog.at_level(logging.WARNING):
        assert load_validation(str(corpus), cache_dir=str(tmp_path / "sc"), on_corrupt="skip") is None
    assert any("shard-000006" in r.getMessage() for r in caplog.records)


def test_train_refuses_a_copied_validation_shard(corpus, tmp_path):
    copy_shard(corpus, 0, 7)
    r = train_cli(corpus, tmp_path / "run")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error:") and "shard-000007" in lines[0], r.stderr
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    assert not metrics.exists() or not any(json.loads(x).get("eval") for x in metrics.read_text().splitlines())


def test_guard_checks_records_by_plan_range_training_ranges_and_seed(corpus):
    from storage_schemas.audit._index import seed_from_rule

    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    rows = manifest_from_parquet_bytes((corpus / "manifest.parquet").read_bytes())
    guard = validation_guard(card, rows)
    v = {r.shard_id: r for r in rows}["shard-000007"]
    assert guard.shard_problem(v) is None
    assert guard.sample_problem(v, 230, seed_from_rule(card.base_seed, 230)) is None
    assert "training" in guard.sample_problem(v, 5, seed_from_rule(card.base_seed, 5))
    assert guard.sample_problem(v, 200, seed_from_rule(card.base_seed, 200)) is not None  # shard-000006's
    assert "seed" in guard.sample_problem(v, 230, seed_from_rule(card.base_seed, 5))
    t = {r.shard_id: r for r in rows}["shard-000002"]
    assert guard.shard_problem(dataclasses.replace(v, sha256=t.sha256)) is not None
    assert guard.shard_problem(dataclasses.replace(v, first_index=64, last_index=95)) is not None


# -- the card's split and the manifest's copy ------------------------------------------------------------


DISAGREEMENTS = [
    (lambda c: c["run"].__setitem__("validation_shards", 0), KEEP),                      # the review's case
    (lambda c: c["run"].pop("validation_shards"), '{"validation": ["shard-000007"]}'),
    (None, '{"validation": []}'),                                                         # the manifest names none
    (None, '{"validation": ["shard-000007"]}'),                                           # one of two
    (None, '{"validation": ["shard-000000", "shard-000007"]}'),
    (None, '{"validation": ["shard-000006", "shard-000007", "shard-000007"]}'),
    (lambda c: c["run"].__setitem__("validation_shards", 3), KEEP),
]
INVALID = ['{"validation": [', '{"validation": "shard-000007"}', '{"validation": [7]}', "[]", '{"other": []}',
           "\xff"]


@pytest.mark.parametrize("edit,meta", DISAGREEMENTS)
def test_card_and_manifest_split_disagreement_is_found_by_audit_and_trainer(corpus, tmp_path, edit, meta):
    refp(corpus, edit, meta)
    report = audit_corpus(str(corpus))
    found = [p for p in report.problems if "split" in p.detail]
    assert report.exit_status == 1 and found, report.problems
    assert all(p.kind == "manifest_invalid" for p in found)
    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    with pytest.raises(SplitError, match="split"):
        check_split_consistency(card, (corpus / "manifest.parquet").read_bytes())
    with pytest.raises(CorpusFormatError, match="split"):
        load_validation(str(corpus), cache_dir=str(tmp_path / "sc"))


@pytest.mark.parametrize("meta", INVALID)
def test_invalid_split_metadata_is_a_problem_and_a_one_line_error(corpus, tmp_path, meta):
    refp(corpus, None, meta.encode("latin-1") if meta == "\xff" else meta)
    report = audit_corpus(str(corpus))
    assert [p.kind for p in report.problems if MANIFEST_SPLIT_KEY in p.detail] == ["manifest_invalid"], \
        report.problems
    with pytest.raises(CorpusFormatError) as e:
        load_validation(str(corpus), cache_dir=str(tmp_path / "sc"))
    assert MANIFEST_SPLIT_KEY in str(e.value) and "\n" not in str(e.value)


def test_train_with_the_review_disagreement_exits_1_with_one_line(corpus, tmp_path):
    refp(corpus, lambda c: c["run"].__setitem__("validation_shards", 0), '{"validation": ["shard-000007"]}')
    r = train_cli(corpus, tmp_path / "run")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "split" in lines[0], r.stderr


def test_consistent_corpora_audit_clean_and_pass_the_check(corpus, tmp_path):
    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    assert check_split_consistency(card, (corpus / "manifest.parquet").read_bytes()) == \
        ["shard-000006", "shard-000007"]
    assert check_split_consistency(card, ["shard-000007", "shard-000006"]) == ["shard-000006", "shard-000007"]
    assert audit_corpus(str(corpus)).exit_status == 0
    refp(corpus, None, None)  # a manifest without the key (written before it existed): the card decides
    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    assert check_split_consistency(card, (corpus / "manifest.parquet").read_bytes()) == \
        ["shard-000006", "shard-000007"]
    assert audit_corpus(str(corpus)).exit_status == 0
    refp(corpus, lambda c: c["run"].pop("validation_shards"), None)  # before the split existed: no key, no field
    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    assert check_split_consistency(card, (corpus / "manifest.parquet").read_bytes()) == []
    assert audit_corpus(str(corpus)).exit_status == 0
    assert load_validation(str(corpus), cache_dir=str(tmp_path / "sc")) is None
