"""Commit records and the Parquet manifest: which shards a corpus holds.

``<root>/commits/<shard_id>.json`` is written once a shard's upload is verified (its stored size
and sha256 equal those of the bytes written); ``<root>/manifest.parquet`` gathers every commit
record, one row per shard, at finalize. Readers trust these only: any other object under the
root is an orphan (e.g. a shard whose upload was interrupted before its commit).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ._fields import (
    MAX_SEED,
    check_keys,
    check_schema_version,
    expect_int,
    expect_str,
    parse_json_object,
    pretty_json,
)
from .errors import CorpusFormatError, SchemaError, UnsupportedSchemaVersion
from .layout import shard_number, validate_relative_path, validate_shard_id
from .limits import MAX_COMMIT_BYTES
from .version import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
MANIFEST_VERSION_KEY = b"schema_version"
#: key-value metadata key of the validation split (JSON {"validation": [shard ids]}); absent: all shards train
MANIFEST_SPLIT_KEY = "trajflow.split"
"""Key of the format version in the Parquet file's key-value metadata."""


def utc_now_iso() -> str:
    """The current UTC time as ISO 8601 with offset, e.g. ``"2025-01-31T12:00:00.123456+00:00"``."""
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class ShardCommit:
    """One committed shard: the content of ``commits/<shard_id>.json`` and one manifest row.

    Attributes:
        shard_id: e.g. ``"shard-000003"``.
        path: the shard's path relative to the root, e.g. ``"shards/shard-000003.tar"``.
        sha256: lowercase hex sha256 of the shard bytes as stored.
        num_bytes: size of the shard bytes as stored.
        num_samples: number of samples; the shard holds indices ``first_index..last_index``
            (inclusive, contiguous), so ``num_samples == last_index - first_index + 1``.
        first_index: global index of the first sample.
        last_index: global index of the last sample.
        seed: seed of the shard's first sample (in [0, 2**63 - 1]).
        card_fingerprint: ``DatasetCard.fingerprint()`` of the corpus it belongs to.
        committed_at: ISO 8601 time with a UTC offset (see :func:`utc_now_iso`).
        schema_version: the format version.
    """

    shard_id: str
    path: str
    sha256: str
    num_bytes: int
    num_samples: int
    first_index: int
    last_index: int
    seed: int
    card_fingerprint: str
    committed_at: str
    schema_version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        where = self._where(self.shard_id)
        check_schema_version(self.schema_version, where=where)
        try:
            validate_shard_id(self.shard_id)
            validate_relative_path(self.path)
        except SchemaError as exc:
            raise SchemaError(f"{where}: {exc}") from None
        for name in ("sha256", "card_fingerprint"):
            value = expect_str(getattr(self, name), where=where, field=name)
            if not _SHA256_PATTERN.fullmatch(value):
                raise SchemaError(f"{where}: field {name!r} must be 64 lowercase hex digits, found {value!r}")
        expect_int(self.num_bytes, where=where, field="num_bytes", minimum=1)
        expect_int(self.num_samples, where=where, field="num_samples", minimum=1)
        expect_int(self.first_index, where=where, field="first_index", minimum=0)
        expect_int(self.last_index, where=where, field="last_index", minimum=self.first_index)
        expect_int(self.seed, where=where, field="seed", minimum=0, maximum=MAX_SEED)
        if self.last_index - self.first_index + 1 != self.num_samples:
            raise SchemaError(
                f"{where}: num_samples {self.num_samples} does not match the index range "
                f"{self.first_index}..{self.last_index} ({self.last_index - self.first_index + 1} indices)"
            )
        committed_at = expect_str(self.committed_at, where=where, field="committed_at")
        try:
            parsed = datetime.fromisoformat(committed_at)
        except ValueError:
            parsed = None
        if parsed is None or parsed.utcoffset() is None:
            raise SchemaError(
                f"{where}: field 'committed_at' must be an ISO 8601 time with a UTC offset, found {committed_at!r}"
            )

    @staticmethod
    def _where(shard_id: object) -> str:
        return f"commit record for {shard_id!r}" if isinstance(shard_id, str) else "commit record"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """``commits/<shard_id>.json`` text: sorted keys, indent 2, trailing newline."""
        return pretty_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any, *, where: str | None = None) -> ShardCommit:
        if not isinstance(obj, dict):
            raise SchemaError(
                f"{where or 'commit record'}: must be a JSON object, found {type(obj).__name__}"
            )
        where = where or cls._where(obj.get("shard_id"))
        check_schema_version(obj.get("schema_version"), where=where)
        check_keys(obj, where=where, prefix="", required=[f.name for f in fields(cls)])
        return cls(**obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardCommit:
        """Parse and validate a commit record.

        Raises:
            CorpusFormatError: not valid JSON.
            UnsupportedSchemaVersion: schema_version missing, mistyped or unsupported.
            SchemaError: a missing, unknown or wrongly typed field (named in the message).
        """
        return cls.from_dict(parse_json_object(text, where="commit record", max_bytes=MAX_COMMIT_BYTES))


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("first_index", pa.int64(), nullable=False),
        pa.field("last_index", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("card_fingerprint", pa.string(), nullable=False),
        pa.field("committed_at", pa.string(), nullable=False),
    ],
    metadata={MANIFEST_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
"""Arrow schema of ``manifest.parquet``; the format version is in the key-value metadata."""

_MANIFEST_WHERE = "manifest (manifest.parquet)"


def _sort_key(commit: ShardCommit) -> int:
    return shard_number(commit.shard_id)


def _check_unique(commits: list[ShardCommit]) -> None:
    seen: set[str] = set()
    for commit in commits:
        if commit.shard_id in seen:
            raise SchemaError(f"{_MANIFEST_WHERE}: shard {commit.shard_id!r} appears more than once")
        seen.add(commit.shard_id)


def manifest_to_parquet_bytes(commits: Iterable[ShardCommit], validation: Iterable[str] = ()) -> bytes:
    """The ``manifest.parquet`` bytes: one row per commit, ordered by shard number. ``validation``: the shard
    ids of the validation split, recorded in the file's key-value metadata (``MANIFEST_SPLIT_KEY``: JSON
    ``{"validation": [ids]}``), which readers that do not know it ignore; no key means every shard trains.

    Raises:
        SchemaError: a shard id appears twice, or a commit has another schema_version.
    """
    rows = sorted(commits, key=_sort_key)
    _check_unique(rows)
    for commit in rows:
        if commit.schema_version != SCHEMA_VERSION:
            raise SchemaError(
                f"{_MANIFEST_WHERE}: commit {commit.shard_id!r} has schema_version {commit.schema_version}, "
                f"this writer writes {SCHEMA_VERSION}"
            )
    columns = {f.name: [getattr(c, f.name) for c in rows] for f in MANIFEST_SCHEMA}
    schema = MANIFEST_SCHEMA
    validation = sorted(validation)
    if validation:
        schema = schema.with_metadata({**schema.metadata, MANIFEST_SPLIT_KEY: json.dumps({"validation": validation})})
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def manifest_split_raw(data: bytes) -> bytes | None:
    """The raw value of the ``trajflow.split`` key of ``manifest.parquet`` bytes (None when absent); a file
    that is not Parquet is a ``CorpusFormatError``."""
    try:
        meta = pq.read_schema(pa.BufferReader(data)).metadata or {}
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorpusFormatError(f"{_MANIFEST_WHERE}: not a readable Parquet file: {exc}") from None
    return meta.get(MANIFEST_SPLIT_KEY.encode())


def manifest_validation_ids(data: bytes) -> list[str]:
    """The validation split's shard ids recorded in ``manifest.parquet`` bytes ([] when none is marked)."""
    raw = manifest_split_raw(data)
    if raw is None:
        return []
    try:
        ids = json.loads(raw)["validation"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"{_MANIFEST_WHERE}: metadata {MANIFEST_SPLIT_KEY!r} is not valid: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise SchemaError(f"{_MANIFEST_WHERE}: metadata {MANIFEST_SPLIT_KEY!r} must list shard ids")
    return ids


def manifest_schema_version(table: pa.Table) -> object:
    """The schema version stored in a manifest table's key-value metadata (None if absent; the raw
    text if it is not an integer), for callers to check against SUPPORTED_SCHEMA_VERSIONS."""
    raw = (table.schema.metadata or {}).get(MANIFEST_VERSION_KEY)
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    return int(text) if text.isdigit() else text


def manifest_from_parquet_bytes(data: bytes) -> list[ShardCommit]:
    """Read and validate ``manifest.parquet`` bytes; commits come back ordered by shard number.

    Raises:
        CorpusFormatError: the bytes are not a Parquet file.
        UnsupportedSchemaVersion: the version metadata is missing or unsupported.
        SchemaError: a missing or unknown column, a wrong column type, a null, a bad row
            (named by shard id), or a duplicated shard id.
    """
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorpusFormatError(f"{_MANIFEST_WHERE}: not a readable Parquet file: {exc}") from None
    version = manifest_schema_version(table)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnsupportedSchemaVersion(_MANIFEST_WHERE, version, SUPPORTED_SCHEMA_VERSIONS)
    names = set(table.column_names)
    expected = set(MANIFEST_SCHEMA.names)
    if names != expected:
        missing, unknown = sorted(expected - names), sorted(names - expected)
        raise SchemaError(
            f"{_MANIFEST_WHERE}: columns do not match the manifest schema"
            + (f"; missing column(s) {missing}" if missing else "")
            + (f"; unknown column(s) {unknown}" if unknown else "")
        )
    for expected_field in MANIFEST_SCHEMA:
        column = table.column(expected_field.name)
        if not column.type.equals(expected_field.type):
            raise SchemaError(
                f"{_MANIFEST_WHERE}: column {expected_field.name!r} must be {expected_field.type}, found {column.type}"
            )
        if column.null_count:
            raise SchemaError(
                f"{_MANIFEST_WHERE}: column {expected_field.name!r} holds {column.null_count} null(s)"
            )
    commits = []
    for i, row in enumerate(table.select(MANIFEST_SCHEMA.names).to_pylist()):
        try:
            commits.append(ShardCommit(**row, schema_version=version))
        except SchemaError as exc:
            raise SchemaError(f"{_MANIFEST_WHERE}: row {i}: {exc}") from None
    _check_unique(commits)
    commits.sort(key=_sort_key)
    return commits
