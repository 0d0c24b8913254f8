"""A finalized corpus on object storage: its card and the shards its manifest lists, read and
checked once (:func:`open_corpus`), with the checks of the manifest rows against the card's plan
(:func:`manifest_problems`)."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage_schemas import (
    COMMITS_DIR,
    DATASET_CARD,
    MANIFEST,
    CorpusFormatError,
    DatasetCard,
    ShardCommit,
    manifest_from_parquet_bytes,
    shard_number,
)
from storage_schemas.split import check_split_consistency

from ..shard_cache import with_retries

log = logging.getLogger(__name__)


class CorpusNotFinalizedError(ValueError):
    """The URL holds no usable corpus: no card, or no ``manifest.parquet`` (e.g. still generating)."""


@dataclass(frozen=True)
class Corpus:
    """A finalized corpus: its card and the shards its manifest lists (in manifest order)."""

    url: str
    card: DatasetCard
    shards: tuple[ShardCommit, ...]
    fingerprint: str
    """:func:`corpus_fingerprint` of the card and the manifest."""

    @property
    def num_samples(self) -> int:
        return sum(c.num_samples for c in self.shards)


def corpus_fingerprint(card: DatasetCard, shards: Sequence[ShardCommit]) -> str:
    """sha256 hex of the card's fingerprint and the manifest's ordered (shard_id, sha256) list."""
    listing = "".join(f"{c.shard_id} {c.sha256}\n" for c in shards)
    manifest_digest = hashlib.sha256(listing.encode()).hexdigest()
    return hashlib.sha256(f"trajflow-corpus-v1:{card.fingerprint()}:{manifest_digest}".encode()).hexdigest()


SPLITS = ("train", "validation", "all")


def open_corpus(url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 6,
                split: str = "train") -> Corpus:
    """Read and check ``dataset.json`` and ``manifest.parquet`` of the corpus at ``url``.

    Only manifest-listed shards are used: anything else under the root (shards without a commit,
    temporary files) is an orphan and is never read. ``split``: "train" (every shard but the validation
    split's, ``card.validation_shard_ids``; a corpus without one is all training data), "validation" (only
    those; none in a corpus without one) or "all".

    Raises:
        CorpusNotFinalizedError: no card; or commit records but no manifest (generation has not
            finished); or neither.
        CorpusFormatError: an unreadable card or manifest, an empty manifest, or manifest rows
            that belong to another card.
        ShardFetchError: storage kept failing.
    """
    from fsspec.core import url_to_fs

    url = url.rstrip("/") or url
    fs, root = url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")

    def read(rel: str) -> bytes:
        return with_retries(lambda: fs.cat_file(f"{root}/{rel}"), what=f"reading {url}/{rel}", attempts=attempts)

    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - best effort: s3fs caches listings
        pass
    try:
        card = DatasetCard.from_json(read(DATASET_CARD))
    except FileNotFoundError:
        raise CorpusNotFinalizedError(
            f"{url} is not a trajflow corpus: there is no {DATASET_CARD} (check the URL)"
        ) from None
    try:
        manifest_bytes = read(MANIFEST)
        shards = manifest_from_parquet_bytes(manifest_bytes)
    except FileNotFoundError:
        def list_commits() -> list[str]:
            try:
                return [p for p in fs.ls(f"{root}/{COMMITS_DIR}", detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return []

        committed = with_retries(list_commits, what=f"listing {url}/{COMMITS_DIR}", attempts=attempts)
        if committed:
            raise CorpusNotFinalizedError(
                f"corpus {url} is not finalized: {len(committed)} shard(s) are committed under {COMMITS_DIR}/ "
                f"but there is no {MANIFEST}. The trainer reads finalized corpora only (a fixed shard set "
                "makes the sample order and the resume state well defined): let generation finish, or "
                "re-run the same `trajflow generate` command, which resumes and finalizes it"
            ) from None
        raise CorpusNotFinalizedError(
            f"corpus {url} has a {DATASET_CARD} but no {MANIFEST} and no commit records: generation has not "
            "committed anything yet"
        ) from None
    if not shards:
        raise CorpusFormatError(f"corpus {url}: {MANIFEST} lists no shards")
    card_fp = card.fingerprint()
    for commit in shards:
        if commit.card_fingerprint != card_fp:
            raise CorpusFormatError(
                f"corpus {url}: manifest row {commit.shard_id!r} belongs to a corpus with card fingerprint "
                f"{commit.card_fingerprint[:12]}…, but {DATASET_CARD} has {card_fp[:12]}…"
            )
    # the card's validation split and the manifest's copy of it agree (a card saying "no validation" over a
    # manifest naming one would train on the validation shards)
    try:
        check_split_consistency(card, manifest_bytes)
    except CorpusFormatError as e:  # SplitError / SchemaError: one line
        raise type(e)(f"corpus {url}: {e}") from None
    total = sum(c.num_samples for c in shards)
    if total != card.num_trajectories:
        log.warning("corpus %s: the manifest lists %d samples, the card plans %d", url, total,
                    card.num_trajectories)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "all":
        held_out = set(card.validation_shard_ids)
        shards = [c for c in shards if (c.shard_id in held_out) == (split == "validation")]
        if not shards and split == "train":
            raise CorpusFormatError(f"corpus {url}: every shard is in the validation split")
    return Corpus(url=url, card=card, shards=tuple(shards), fingerprint=corpus_fingerprint(card, shards))


def manifest_problems(corpus: Corpus) -> dict[int, str]:
    """Manifest rows whose claimed sample indices cannot be right, by row: a second row with a shard
    id already listed, a row whose ``first_index..last_index`` or ``num_samples`` is not what the
    card's plan gives its shard number (shard k holds ``[k*shard_size, min((k+1)*shard_size, N))``),
    or a row whose range overlaps an earlier row's. Such a shard (e.g. a byte copy of another shard,
    committed under another id with the same indices) would train its samples twice an epoch; its
    record keys agree with its row, so only this check finds it."""
    card = corpus.card
    shard_size, planned = card.shard_size, card.num_trajectories
    problems: dict[int, str] = {}
    seen_ids: dict[str, int] = {}
    claimed: list[tuple[int, int, str]] = []
    for row, commit in enumerate(corpus.shards):
        sid = commit.shard_id
        if sid in seen_ids:
            problems[row] = f"the manifest lists shard {sid!r} twice (rows {seen_ids[sid]} and {row})"
            continue
        seen_ids[sid] = row
        number = shard_number(sid)
        first, last = number * shard_size, min((number + 1) * shard_size, planned) - 1
        if commit.num_samples != commit.last_index - commit.first_index + 1:
            problems[row] = (f"its manifest row claims {commit.num_samples} samples for indices "
                             f"{commit.first_index}..{commit.last_index}")
        elif (commit.first_index, commit.last_index) != (first, last):
            problems[row] = (f"its manifest row claims indices {commit.first_index}..{commit.last_index}, but the "
                             f"card's plan (shard_size {shard_size}, {planned} trajectories) gives shard {number} "
                             f"indices {first}..{last}: a copy of another shard's samples is not trained twice")
        else:
            claimed.append((commit.first_index, commit.last_index, sid))
    claimed.sort()
    for (a0, a1, aid), (b0, b1, bid) in itertools.pairwise(claimed):
        if b0 <= a1:  # cannot happen once every row matches the plan; kept as a guard
            problems[seen_ids[bid]] = f"its indices {b0}..{b1} overlap shard {aid!r}'s {a0}..{a1}"
    return problems
