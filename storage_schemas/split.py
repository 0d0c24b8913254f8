"""The validation split: the checks that keep it apart from the training data, shared by audit and trainer.

``trajflow generate`` sets the plan's last ``run.validation_shards`` shards aside (``card.validation_shard_ids``)
and records the same ids in the manifest's key-value metadata (``trajflow.split``: JSON
``{"validation": [ids]}``). The card is the fingerprinted document, the manifest's key a copy; they
must agree (``check_split_consistency``), or a card saying "no validation" over a manifest naming one
would train on the validation indices, and invalid JSON there would go unnoticed.

A validation shard must hold validation data: ``validation_guard(card, rows)`` checks, with the same
plan, index-range and seed rules the audit applies (``storage_schemas.audit._index``):

- per shard (its manifest row): the index range is the one the card's plan gives its shard number, it
  overlaps no training shard's range, and its bytes are not a training shard's (same sha256);
- per sample: its index lies in that planned range and in no training shard's, and its seed is the
  card's ``seed_rule`` value for it (when the card records the known rule).

So a validation shard that is a byte copy of a training shard (its commit record and manifest row
rewritten to match) is found before its samples are evaluated.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from .card import DatasetCard
from .errors import CorpusFormatError, SchemaError
from .layout import MANIFEST, shard_number
from .manifest import MANIFEST_SPLIT_KEY, ShardCommit, manifest_split_raw

__all__ = ["SplitError", "ValidationGuard", "check_split_consistency", "manifest_split_ids", "read_manifest_bytes",
           "split_disagreement", "validation_guard"]

_WHERE = f"manifest.parquet metadata {MANIFEST_SPLIT_KEY!r}"


class SplitError(CorpusFormatError):
    """The validation split is inconsistent: card and manifest disagree, or it holds training data."""


def manifest_split_ids(manifest: bytes | None = None, *, raw: bytes | str | None = None) -> list[str] | None:
    """The shard ids ``manifest.parquet`` bytes (or the ``raw`` value of its ``trajflow.split`` key) name
    as the validation split; None when the key is absent. Invalid JSON or a wrong shape: ``SchemaError``,
    one line naming the key."""
    if manifest is not None:
        raw = manifest_split_raw(manifest)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"{_WHERE} is not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    ids = doc.get("validation") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise SchemaError(f'{_WHERE} must be {{"validation": [shard ids]}}, found {_short(raw)}')
    return ids


def read_manifest_bytes(url: str, storage_options: dict | None = None, *, attempts: int = 6) -> bytes:
    """The ``manifest.parquet`` bytes of the corpus at ``url`` (fsspec, with retries)."""
    from fsspec.core import url_to_fs

    from .retry import with_retries

    fs, root = url_to_fs(url.rstrip("/") or url, **(storage_options or {}))
    path = f"{root.rstrip('/')}/{MANIFEST}"
    return with_retries(lambda: fs.cat_file(path), what=f"reading {url.rstrip('/')}/{MANIFEST}", attempts=attempts)


def _short(raw: bytes | str, n: int = 80) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n] + "…")


def _ids_text(ids: Sequence[str], limit: int = 6) -> str:
    if not ids:
        return "none"
    shown = ", ".join(repr(i) if not i.isprintable() else i[:40] for i in ids[:limit])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def split_disagreement(card: DatasetCard, manifest_ids: Sequence[str] | None) -> str | None:
    """One line saying how the card's validation split and the manifest's copy differ (None: they agree).

    An absent key (``manifest_ids`` None: a manifest written before the split existed, or by a tool that
    drops unknown metadata) says nothing, and the card decides; a key that names other shards, or names
    one twice, disagrees."""
    want = list(card.validation_shard_ids)
    if manifest_ids is None:
        return None
    got = list(manifest_ids)
    if sorted(got) == want:
        return None
    got = sorted(got)
    twice = sorted(i for i, n in Counter(got).items() if n > 1)
    detail = f"; it names {_ids_text(twice)} more than once" if twice else ""
    return (f"the validation split of the card (run.validation_shards = {card.num_validation_shards}: "
            f"{_ids_text(want)}) and of the manifest ({MANIFEST_SPLIT_KEY}: "
            f"{_ids_text(got)}) disagree{detail}: one of them was edited, "
            "so which shards are held out is unknown (regenerate the manifest, or fix the card)")


def check_split_consistency(card: DatasetCard, manifest: bytes | Sequence[str] | None) -> list[str]:
    """The validation split's shard ids (sorted) when the card and the manifest agree on them.

    ``manifest``: the ``manifest.parquet`` bytes, or the ids its ``trajflow.split`` key names (None: no
    key, which the card decides alone). Raises ``SchemaError`` (invalid metadata) or ``SplitError`` (a disagreement), one line each."""
    ids = manifest_split_ids(manifest) if isinstance(manifest, (bytes, bytearray, memoryview)) else (
        None if manifest is None else list(manifest))
    problem = split_disagreement(card, ids)
    if problem is not None:
        raise SplitError(problem)
    return list(card.validation_shard_ids)


@dataclass
class ValidationGuard:
    """What a validation shard and its samples must satisfy (see the module docstring)."""

    card: DatasetCard
    validation: frozenset[str]
    train_starts: list[int]
    train_ranges: list[tuple[int, int, str]]
    train_max_last: list[int]
    train_sha: dict[str, str]
    seed_rule: Callable[[int], int] | None

    def planned_range(self, shard_id: str) -> tuple[int, int]:
        first = shard_number(shard_id) * self.card.shard_size
        return first, min(first + self.card.shard_size, self.card.num_trajectories) - 1

    def training_shard_of(self, index: int) -> str | None:
        """The training shard whose recorded range holds ``index`` (None: no training shard's)."""
        i = bisect_right(self.train_starts, index) - 1
        while i >= 0 and self.train_max_last[i] >= index:  # overlapping ranges (a damaged manifest): look back
            if self.train_ranges[i][1] >= index:
                return self.train_ranges[i][2]
            i -= 1
        return None

    def shard_problem(self, commit: ShardCommit) -> str | None:
        """Why the validation shard ``commit`` (its manifest row) is not validation data, or None."""
        sid = commit.shard_id
        first, last = self.planned_range(sid)
        if (commit.first_index, commit.last_index) != (first, last):
            return (f"validation shard {sid} records indices {commit.first_index}..{commit.last_index}; the card's "
                    f"plan assigns it {first}..{last}")
        if commit.sha256 in self.train_sha:
            return (f"validation shard {sid} is a byte copy of training shard {self.train_sha[commit.sha256]} "
                    f"(same sha256 {commit.sha256[:12]}…): evaluating on it would judge the student on its training data")
        i = bisect_right(self.train_starts, last) - 1
        while i >= 0 and self.train_max_last[i] >= first:  # training ranges starting at or before ``last``
            t_first, t_last, t_sid = self.train_ranges[i]
            if t_last >= first:
                lo, hi = max(first, t_first), min(last, t_last)
                return f"validation shard {sid}'s indices {lo}..{hi} are also training shard {t_sid}'s"
            i -= 1
        return None

    def sample_problem(self, commit: ShardCommit, index: int, seed: int | None) -> str | None:
        """Why a sample (its ``index`` and ``seed``) of the validation shard ``commit`` is not validation data."""
        sid = commit.shard_id
        first, last = self.planned_range(sid)
        owner = self.training_shard_of(index)
        if owner is not None:
            return f"sample {index} of validation shard {sid} is a training index (training shard {owner}'s)"
        if not first <= index <= last:
            return f"sample {index} of validation shard {sid} is outside the shard's planned indices {first}..{last}"
        if self.seed_rule is not None and seed is not None and seed != self.seed_rule(index):
            return (f"sample {index} of validation shard {sid} has seed {seed}, the card's seed_rule gives "
                    f"{self.seed_rule(index)}: not the sample planned at that index")
        return None


def validation_guard(card: DatasetCard, rows: Iterable[ShardCommit]) -> ValidationGuard:
    """The guard of ``card``'s validation split, given every manifest row (training and validation)."""
    # the audit's own seed rule (imported here: the audit imports this module)
    from .audit._index import seed_rule_of

    validation = frozenset(card.validation_shard_ids)
    train = sorted((r for r in rows if r.shard_id not in validation), key=lambda r: (r.first_index, r.last_index))
    ranges = [(r.first_index, r.last_index, r.shard_id) for r in train]
    max_last = list(accumulate((r[1] for r in ranges), max))
    return ValidationGuard(card=card, validation=validation, train_starts=[r[0] for r in ranges], train_ranges=ranges,
                           train_max_last=max_last,
                           train_sha={r.sha256: r.shard_id for r in reversed(train)}, seed_rule=seed_rule_of(card))
