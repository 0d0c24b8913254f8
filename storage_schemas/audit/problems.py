"""Problems and the audit report: the stable vocabulary of ``trajflow audit``.

Every defect the auditor finds is a :class:`Problem` with a ``kind`` from :data:`PROBLEM_KINDS`
(a documented, stable set: scripts may match on it), the ``shard`` it concerns (``None`` for
corpus-level problems such as the dataset card), a one-line ``detail`` that says plainly what is
wrong and where, and the object ``path`` relative to the corpus root when there is one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PROBLEM_KINDS: dict[str, str] = {
    # dataset card, manifest, commit records
    "card_missing": "dataset.json is absent",
    "card_invalid": "dataset.json is not a valid dataset card (unparseable, or a missing/unknown/mistyped field)",
    "schema_version": "a document (card, manifest, commit record) has a schema_version this trajflow cannot read",
    "not_finalized": "manifest.parquet is absent: the run was never finalized (the commit records are audited instead)",
    "manifest_invalid": "manifest.parquet is unreadable, has the wrong columns, or holds an invalid row; or its "
                        "validation split (trajflow.split) is not valid JSON or disagrees with the card's",
    "commit_invalid": "a commit record (commits/<shard_id>.json) is unreadable or invalid",
    "commit_not_in_manifest": "a commit record whose shard is not in the manifest",
    "commit_missing": "a manifest row whose commit record is absent",
    "commit_mismatch": "a manifest row disagrees with its shard's commit record",
    "fingerprint_mismatch": "a commit record or manifest row carries another card fingerprint than dataset.json",
    # shard objects
    "shard_missing": "a shard named by the manifest (or a commit record) does not exist",
    "size_mismatch": "a shard's stored size differs from its recorded num_bytes",
    "sha256_mismatch": "a shard's stored sha256 differs from its recorded sha256",
    "read_error": "a shard could not be read from storage (after retries)",
    "symlink_refused": "on a local disk, a shard that is (or lies under) a symbolic link; links are never followed",
    "tar_corrupt": "a shard is not a complete, well-formed tar (truncated, bad header, no end marker)",
    "unsafe_member": "a tar member that is not part of the format (other suffix, link, '..', absolute path); never decoded",
    "count_mismatch": "the number of samples in a shard's tar differs from its recorded num_samples",
    "index_mismatch": "a shard's sample keys are not exactly the recorded index range first_index..last_index",
    # corpus-wide consistency
    "duplicate_shard_id": "a shard id appears in more than one manifest row",
    "duplicate_path": "two manifest rows name the same shard object",
    "duplicate_shard": "two shard ids hold byte-identical content (same sha256)",
    "duplicate_sample_key": "a sample key (global index) is stored more than once",
    "duplicate_seed": "a noise seed is used by more than one sample",
    "index_gap": "global sample indices missing from the corpus (listed as ranges)",
    "plan_mismatch": "a shard's index range is not the one the card's run plan assigns to its shard id",
    "seed_mismatch": "a seed differs from the one the card's seed_rule gives for its index",
    "orphan_object": "an object under the root that no manifest row or commit record names",
    # --deep: per-sample checks
    "decode_error": "a sample's members cannot be decoded (bad JSON or safetensors, missing member or tensor)",
    "metadata_missing": "a sample's metadata lacks a required field (index, seed, guidance, or the card's condition)",
    "metadata_invalid": "a sample's metadata has a mistyped or out-of-range field, or its key is not sample_key(index)",
    "shape_mismatch": "states shape differs from [len(saved_sigmas), *sample_shape] of the card",
    "dtype_mismatch": "states dtype differs from the card's dtype (or sigmas are not float32)",
    "sigma_mismatch": "a sample's sigmas differ from the card's saved_sigmas",
    "non_finite": "a sample's states hold NaN or Inf",
    "record_invalid": "a sample that the format's own reader rejects for another reason",
    # --replay
    "teacher_mismatch": "the rebuilt teacher's fingerprint differs from the card's teacher.fingerprint",
    "replay_mismatch": "re-solving a sample from its seed and condition does not reproduce its stored states",
    # the auditor itself
    "audit_error": "an unexpected error while auditing one shard (the audit went on with the others)",
}
"""kind -> what it means. The set is stable: kinds are only ever added."""


@dataclass(frozen=True)
class Problem:
    """One defect: its ``kind`` (in :data:`PROBLEM_KINDS`), the ``shard`` it concerns (or ``None``),
    a one-line ``detail`` and the object ``path`` relative to the root (or ``None``)."""

    kind: str
    shard: str | None
    detail: str
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")
        object.__setattr__(self, "detail", " ".join(str(self.detail).split()))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shard": self.shard, "detail": self.detail, "path": self.path}


def _json_safe(value: Any) -> Any:
    """Replace NaN/Inf floats by None (JSON has no NaN) and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class AuditReport:
    """The outcome of :func:`~storage_schemas.audit.audit_corpus`.

    Attributes:
        url: the corpus root as given.
        ok: no problems and the corpus could be read.
        fatal: the corpus cannot be read at all (nothing at the URL, or no card, manifest or commit
            record to audit); ``fatal_reason`` says why. Exit status 2.
        num_shards: shards audited (manifest rows, or commit records when not finalized).
        num_samples: samples those shards hold (recorded ``num_samples``, summed).
        problems: every problem found, in a stable order (corpus-level first, then by shard).
        stats: statistics (see ``docs/audit.md``), JSON-ready.
        notes: remarks that are not defects (replay unavailable, sampled deep checks, ...).
        checks: what was checked (deep, sample fraction, replay count, ...).
        card: the dataset card as a dict when it could be read, else ``None``.
    """

    url: str
    problems: list[Problem] = field(default_factory=list)
    num_shards: int = 0
    num_samples: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    fatal: bool = False
    fatal_reason: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.problems

    @property
    def exit_status(self) -> int:
        """0 clean, 1 problems found, 2 the corpus cannot be read at all."""
        if self.fatal:
            return 2
        return 1 if self.problems else 0

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def find(self, kind: str, shard: str | None = ...) -> list[Problem]:  # type: ignore[assignment]
        """Problems of ``kind`` (and of ``shard`` when given; pass None for corpus-level ones)."""
        return [p for p in self.problems if p.kind == kind and (shard is ... or p.shard == shard)]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document. Stable keys: ok, num_shards, num_samples, problems, stats."""
        return _json_safe(
            {
                "ok": self.ok,
                "url": self.url,
                "exit_status": self.exit_status,
                "fatal": self.fatal_reason if self.fatal else None,
                "num_shards": self.num_shards,
                "num_samples": self.num_samples,
                "problems": [p.to_dict() for p in self.problems],
                "problem_counts": {k: sum(1 for p in self.problems if p.kind == k) for k in sorted(self.kinds())},
                "stats": self.stats,
                "notes": list(self.notes),
                "checks": self.checks,
                "seconds": round(self.seconds, 3),
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
