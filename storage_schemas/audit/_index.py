"""The cheap, corpus-level checks: card, manifest, commit records, plan, index ranges, orphans.

Everything here works on the listing and the small JSON/Parquet documents; no shard is read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .._fields import seed63
from ..card import DatasetCard
from ..errors import CorpusFormatError, UnsupportedSchemaVersion
from ..layout import COMMITS_DIR, DATASET_CARD, MANIFEST, SHARDS_DIR, shard_number, validate_shard_id
from ..manifest import MANIFEST_SCHEMA, MANIFEST_SPLIT_KEY, ShardCommit, manifest_schema_version
from ..version import SUPPORTED_SCHEMA_VERSIONS
from .problems import Problem

KNOWN_SEED_RULE = "sha256('trajflow-seed:{base_seed}:{index}')[:8] & (2**63-1)"
"""The seed rule trajflow's generator writes into ``card.run.seed_rule``; seeds are verified against it."""


def seed_from_rule(base_seed: int, index: int) -> int:
    """The seed ``KNOWN_SEED_RULE`` gives sample ``index``."""
    return seed63("trajflow-seed", base_seed, index)


def seed_rule_of(card: DatasetCard | None):
    """A function index -> expected seed when the card records the known rule, else None."""
    if card is None or card.run.get("seed_rule") != KNOWN_SEED_RULE:
        return None
    base = card.base_seed
    return lambda index: seed_from_rule(base, index)


def ranges_text(values: Iterable[int], limit: int = 6) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1..3, 7, 9..10' (at most ``limit`` ranges, then '…')."""
    items = sorted(set(values))
    spans: list[tuple[int, int]] = []
    for v in items:
        if spans and v == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], v)
        else:
            spans.append((v, v))
    parts = [f"{a}..{b}" if a != b else f"{a}" for a, b in spans[:limit]]
    if len(spans) > limit:
        parts.append(f"… ({len(spans) - limit} more ranges)")
    return ", ".join(parts)


def missing_ranges(first: int, last: int, present: Iterable[int]) -> list[tuple[int, int]]:
    """The ranges of [first, last] not in ``present``, without materialising [first, last]."""
    out: list[tuple[int, int]] = []
    expect = first
    for v in sorted(set(present)):
        if v < first or v > last:
            continue
        if v > expect:
            out.append((expect, v - 1))
        expect = v + 1
    if expect <= last:
        out.append((expect, last))
    return out


def spans_text(spans: list[tuple[int, int]], limit: int = 6, fmt=str) -> str:
    parts = [f"{fmt(a)}..{fmt(b)}" if a != b else fmt(a) for a, b in spans[:limit]]
    if len(spans) > limit:
        parts.append(f"… ({len(spans) - limit} more ranges)")
    return ", ".join(parts)


def _short(text: str, n: int = 12) -> str:
    return text if len(text) <= n else text[:n] + "…"


@dataclass
class CorpusIndex:
    """What the corpus says it holds, and the problems found while reading that."""

    listing: dict[str, int]
    card: DatasetCard | None = None
    card_present: bool = False
    manifest_present: bool = False
    manifest_usable: bool = False
    manifest_rows: list[ShardCommit] = field(default_factory=list)
    manifest_split: bytes | None = None
    """The raw ``trajflow.split`` value of the manifest's key-value metadata (None: no key)."""
    commits: dict[str, ShardCommit] = field(default_factory=dict)
    commit_files: int = 0
    entries: list[ShardCommit] = field(default_factory=list)
    """The shards to audit: manifest rows (duplicates included), or commit records if not finalized."""
    source: str = "manifest"
    named_paths: set[str] = field(default_factory=set)
    declared_pairs: dict[tuple[str, str, str], Problem] = field(default_factory=dict)
    """(kind, later shard, earlier shard) -> the duplicate reported from the records alone; replaced by
    the problem found in the data when the shard pass sees the same pair."""
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, shard: str | None, detail: str, path: str | None = None) -> None:
        self.problems.append(Problem(kind, shard, detail, path))


# --- the card --------------------------------------------------------------------------------


def read_card(index: CorpusIndex, data: bytes | None) -> None:
    if data is None:
        index.add("card_missing", None, f"no {DATASET_CARD} under the root: the corpus has no dataset card", DATASET_CARD)
        return
    index.card_present = True
    try:
        index.card = DatasetCard.from_json(data)
    except UnsupportedSchemaVersion as exc:
        index.add("schema_version", None, str(exc), DATASET_CARD)
    except CorpusFormatError as exc:
        index.add("card_invalid", None, str(exc), DATASET_CARD)


# --- the manifest ----------------------------------------------------------------------------


def read_manifest(index: CorpusIndex, data: bytes) -> None:
    """A lenient manifest reader: every bad row and duplicate is reported, nothing raises."""
    index.manifest_present = True
    where = MANIFEST
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        index.add("manifest_invalid", None, f"{where} is not a readable Parquet file: {exc}", MANIFEST)
        return
    index.manifest_split = (table.schema.metadata or {}).get(MANIFEST_SPLIT_KEY.encode())
    version = manifest_schema_version(table)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        index.add("schema_version", None, str(UnsupportedSchemaVersion(f"manifest ({where})", version,
                                                                      SUPPORTED_SCHEMA_VERSIONS)), MANIFEST)
        return
    names, expected = set(table.column_names), set(MANIFEST_SCHEMA.names)
    if names != expected:
        index.add("manifest_invalid", None,
                  f"{where} columns do not match the manifest schema: missing {sorted(expected - names)}, "
                  f"unknown {sorted(names - expected)}", MANIFEST)
        return
    for want in MANIFEST_SCHEMA:
        column = table.column(want.name)
        if not column.type.equals(want.type):
            index.add("manifest_invalid", None, f"{where} column {want.name!r} must be {want.type}, found {column.type}",
                      MANIFEST)
            return
    index.manifest_usable = True
    seen: dict[str, int] = {}
    for i, row in enumerate(table.select(MANIFEST_SCHEMA.names).to_pylist()):
        sid = row.get("shard_id")
        label = sid if isinstance(sid, str) else None
        if any(v is None for v in row.values()):
            nulls = sorted(k for k, v in row.items() if v is None)
            index.add("manifest_invalid", label, f"{where} row {i} has null field(s) {nulls}; the row is skipped",
                      MANIFEST)
            continue
        try:
            commit = ShardCommit(**row, schema_version=int(version))  # type: ignore[arg-type]
        except (CorpusFormatError, TypeError, ValueError) as exc:
            index.add("manifest_invalid", label, f"{where} row {i} is invalid; the row is skipped: {exc}", MANIFEST)
            continue
        if commit.shard_id in seen:
            index.add("duplicate_shard_id", commit.shard_id,
                      f"shard id {commit.shard_id} is in manifest rows {seen[commit.shard_id]} and {i}", MANIFEST)
        else:
            seen[commit.shard_id] = i
        index.manifest_rows.append(commit)


# --- commit records --------------------------------------------------------------------------


def commit_files(listing: dict[str, int]) -> list[str]:
    return sorted(p for p in listing if p.startswith(COMMITS_DIR + "/") and p.count("/") == 1 and p.endswith(".json"))


def read_commit(index: CorpusIndex, rel: str, data: bytes | None, error: str | None) -> None:
    stem = rel[len(COMMITS_DIR) + 1 : -len(".json")]
    try:
        sid: str | None = validate_shard_id(stem)
    except CorpusFormatError:
        sid = None
    if data is None:
        index.add("commit_invalid", sid, f"commit record {rel} could not be read: {error}", rel)
        return
    try:
        commit = ShardCommit.from_json(data)
    except UnsupportedSchemaVersion as exc:
        index.add("schema_version", sid, f"{rel}: {exc}", rel)
        return
    except CorpusFormatError as exc:
        index.add("commit_invalid", sid, f"{rel}: {exc}", rel)
        return
    if commit.shard_id != stem:
        index.add("commit_invalid", sid or commit.shard_id,
                  f"{rel} holds the commit record of {commit.shard_id!r}, not of {stem!r}", rel)
        return
    index.commits[commit.shard_id] = commit


# --- structural checks -----------------------------------------------------------------------

_COMPARED = ("path", "sha256", "num_bytes", "num_samples", "first_index", "last_index", "seed", "card_fingerprint")


def choose_entries(index: CorpusIndex) -> None:
    """Decide which records say what the corpus holds, and report manifest/commit disagreements."""
    if index.manifest_present and index.manifest_usable:
        index.entries = list(index.manifest_rows)
        index.source = "manifest"
        in_manifest = {c.shard_id for c in index.manifest_rows}
        for sid, commit in sorted(index.commits.items(), key=lambda kv: shard_number(kv[0])):
            if sid not in in_manifest:
                index.add("commit_not_in_manifest", sid,
                          f"commit record commits/{sid}.json ({commit.num_samples} samples, indices "
                          f"{commit.first_index}..{commit.last_index}) is not in the manifest: its shard is not "
                          "part of the corpus", f"{COMMITS_DIR}/{sid}.json")
        reported_missing: set[str] = set()
        for row in index.manifest_rows:
            commit = index.commits.get(row.shard_id)
            if commit is None:
                if row.shard_id not in reported_missing and f"{COMMITS_DIR}/{row.shard_id}.json" not in index.listing:
                    reported_missing.add(row.shard_id)
                    index.add("commit_missing", row.shard_id,
                              f"manifest row {row.shard_id} has no commit record commits/{row.shard_id}.json",
                              f"{COMMITS_DIR}/{row.shard_id}.json")
                continue
            diffs = [f"{k} {_short(str(getattr(row, k)))} vs {_short(str(getattr(commit, k)))}"
                     for k in _COMPARED if getattr(row, k) != getattr(commit, k)]
            if diffs:
                index.add("commit_mismatch", row.shard_id,
                          f"manifest row and commit record disagree: {'; '.join(diffs)} (manifest vs commit)", MANIFEST)
    else:
        index.entries = sorted(index.commits.values(), key=lambda c: shard_number(c.shard_id))
        index.source = "commits"
        if not index.manifest_present:
            index.add("not_finalized", None, _not_finalized_detail(index), MANIFEST)
    index.named_paths = {e.path for e in index.entries} | {c.path for c in index.commits.values()}


def _not_finalized_detail(index: CorpusIndex) -> str:
    commits = index.commits
    samples = sum(c.num_samples for c in commits.values())
    text = (f"no {MANIFEST}: the run was never finalized; {len(commits)} valid commit record(s) "
            f"hold {samples} samples")
    card = index.card
    if card is not None:
        planned = -(-card.num_trajectories // card.shard_size)
        missing = missing_ranges(0, planned - 1, (shard_number(sid) for sid in commits))
        text += f" of the {card.num_trajectories} planned in {planned} shards"
        if missing:
            text += (f"; shards without a commit record: "
                     f"{spans_text(missing, fmt=lambda n: f'shard-{n:06d}')}")
        else:
            text += "; every planned shard is committed (finalize was not run or failed)"
    return text


def check_entries(index: CorpusIndex) -> None:
    """Per-entry and corpus-wide checks on the recorded metadata alone."""
    card, entries = index.card, index.entries
    fp = card.fingerprint() if card is not None else None
    rule = seed_rule_of(card)
    planned = -(-card.num_trajectories // card.shard_size) if card is not None else None
    for e in entries:
        if fp is not None and e.card_fingerprint != fp:
            index.add("fingerprint_mismatch", e.shard_id,
                      f"recorded card fingerprint {_short(e.card_fingerprint)} differs from dataset.json's "
                      f"{_short(fp)}: the shard was generated under another card", e.path)
        if card is not None and planned is not None:
            n = shard_number(e.shard_id)
            if n >= planned:
                index.add("plan_mismatch", e.shard_id,
                          f"{e.shard_id} is beyond the plan: the card plans {planned} shards "
                          f"({card.num_trajectories} trajectories, shard_size {card.shard_size})", e.path)
            else:
                first = n * card.shard_size
                last = min(first + card.shard_size, card.num_trajectories) - 1
                if (e.first_index, e.last_index) != (first, last):
                    index.add("plan_mismatch", e.shard_id,
                              f"records indices {e.first_index}..{e.last_index}; the plan assigns {first}..{last} "
                              f"to {e.shard_id}", e.path)
        if rule is not None and e.seed != rule(e.first_index):
            index.add("seed_mismatch", e.shard_id,
                      f"recorded seed {e.seed} of index {e.first_index} is not the card's seed_rule value "
                      f"{rule(e.first_index)}", e.path)
        if e.path not in index.listing:
            index.add("shard_missing", e.shard_id, f"{e.path} does not exist ({e.num_bytes} bytes, "
                      f"{e.num_samples} samples, indices {e.first_index}..{e.last_index} are lost)", e.path)
    by_path: dict[str, list[str]] = defaultdict(list)
    by_sha: dict[str, list[str]] = defaultdict(list)
    paths = {e.shard_id: e.path for e in entries}
    for e in entries:
        if e.shard_id not in by_path[e.path]:
            by_path[e.path].append(e.shard_id)
        if e.shard_id not in by_sha[e.sha256]:
            by_sha[e.sha256].append(e.shard_id)
    for path, ids in by_path.items():
        if len(ids) > 1:
            ids = sorted(ids, key=shard_number)
            for sid in ids[1:]:
                index.add("duplicate_path", sid, f"{sid} names the object {path}, which {ids[0]} names too", path)
    for sha, ids in by_sha.items():
        if len(ids) > 1:
            ids = sorted(ids, key=shard_number)
            for sid in ids[1:]:
                index.add("duplicate_shard", sid,
                          f"{sid} has the same content (sha256 {_short(sha)}) as {ids[0]}: a copied shard", paths[sid])
    _check_ranges(index)


def _check_ranges(index: CorpusIndex) -> None:
    """Overlapping index ranges (duplicate keys), repeated first seeds, and gaps, per the records."""
    unique: dict[str, ShardCommit] = {}
    for e in index.entries:
        unique.setdefault(e.shard_id, e)
    entries = sorted(unique.values(), key=lambda e: (e.first_index, shard_number(e.shard_id)))
    # overlaps: name the later shard id of each overlapping pair
    active: list[ShardCommit] = []
    for e in entries:
        active = [a for a in active if a.last_index >= e.first_index]
        for a in active:
            lo, hi = max(a.first_index, e.first_index), min(a.last_index, e.last_index)
            later, earlier = (e, a) if shard_number(e.shard_id) > shard_number(a.shard_id) else (a, e)
            index.add("duplicate_sample_key", later.shard_id,
                      f"indices {lo}..{hi} ({hi - lo + 1} sample keys) are also in {earlier.shard_id} "
                      "(per the recorded index ranges)", later.path)
            index.declared_pairs[("duplicate_sample_key", later.shard_id, earlier.shard_id)] = index.problems[-1]
        active.append(e)
    by_seed: dict[int, list[ShardCommit]] = defaultdict(list)
    for e in unique.values():
        by_seed[e.seed].append(e)
    for seed, group in by_seed.items():
        if len(group) > 1:
            group = sorted(group, key=lambda e: shard_number(e.shard_id))
            for e in group[1:]:
                index.add("duplicate_seed", e.shard_id,
                          f"first-sample seed {seed} is also the first-sample seed of {group[0].shard_id} "
                          "(per the records)", e.path)
                index.declared_pairs[("duplicate_seed", e.shard_id, group[0].shard_id)] = index.problems[-1]
    # gaps
    expected_end = index.card.num_trajectories if index.card is not None else None
    covered_to = 0
    gaps: list[tuple[int, int, str | None]] = []
    for e in entries:
        if e.first_index > covered_to:
            gaps.append((covered_to, e.first_index - 1, e.shard_id))
        covered_to = max(covered_to, e.last_index + 1)
    if expected_end is not None and covered_to < expected_end:
        gaps.append((covered_to, expected_end - 1, None))
    for lo, hi, before in gaps:
        where = f"before {before}" if before else "at the end of the corpus"
        index.add("index_gap", before,
                  f"indices {lo}..{hi} ({hi - lo + 1} samples) are in no {'shard' if index.source == 'manifest' else 'commit record'} "
                  f"({where}" + (f"; the card plans {expected_end}" if expected_end is not None else "") + ")", None)


def find_orphans(index: CorpusIndex) -> None:
    known = {DATASET_CARD, MANIFEST} | index.named_paths
    reported = {p.path for p in index.problems if p.kind in ("commit_invalid", "schema_version")}
    known |= {f"{COMMITS_DIR}/{sid}.json" for sid in index.commits}
    for rel, size in sorted(index.listing.items()):
        if rel in known or rel in reported:
            continue
        sid = None
        name = rel.rsplit("/", 1)[-1]
        stem = name.split(".", 1)[0]
        try:
            sid = validate_shard_id(stem)
        except CorpusFormatError:
            sid = None
        why = "no manifest row or commit record names it"
        if rel.startswith(SHARDS_DIR + "/") and rel.endswith(".tar") and sid is not None:
            why += " (a shard whose writer crashed before its commit?)"
        index.add("orphan_object", sid, f"{rel} ({size} bytes): {why}", rel)


def card_summary(card: DatasetCard | None) -> dict[str, Any] | None:
    if card is None:
        return None
    guidance = card.solver.to_dict()["guidance"]
    return {
        "schema_version": card.schema_version,
        "fingerprint": card.fingerprint(),
        "teacher": {"kind": card.teacher.kind, "fingerprint": card.teacher.fingerprint,
                    "spec": card.run.get("teacher_spec")},
        "solver": {"name": card.solver.name, "num_steps": card.solver.num_steps, "guidance": guidance},
        "saved_sigmas": list(card.saved_sigmas),
        "sample_shape": list(card.sample_shape),
        "dtype": card.dtype,
        "conditioning": card.conditioning.to_dict(),
        "stages": list(card.stages) if card.stages else None,
        "num_trajectories": card.num_trajectories,
        "shard_size": card.shard_size,
        "created_by": card.created_by,
    }
