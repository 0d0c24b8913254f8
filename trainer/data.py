"""The trainer's streaming dataset: a finalized corpus on object storage, in a sample order that is a
pure function of its inputs, with O(1) exact and elastic resume.

Vocabulary (see ``docs/training_data.md`` for the full story):

- **position**: an integer in ``[0, N)``, N = the number of samples the manifest lists. An epoch
  consumes positions in increasing order; a training step consumes ``world * batch_size``
  consecutive positions, cut into one chunk of ``batch_size`` per rank.
- **order**: which sample sits at each position in an epoch. ``"partitioned"`` (default,
  :class:`PartitionedOrder`): a pure function of ``(seed, epoch, manifest, shuffle_buffer,
  partitions)``; the epoch's shard permutation is cut into ``partitions`` parts, a step's positions
  are dealt to ranks by part, so each rank (and node) reads about ``1/world`` of the shards.
  ``"global"`` (:class:`EpochOrder`): a function of ``(seed, epoch, manifest, shuffle_buffer)``;
  position ``p`` goes to rank ``(p - cursor) % world`` and every rank reads every shard.
- **cursor**: how many positions of the current epoch all ranks together have consumed. The
  resume state is ``(corpus fingerprint, seed, epoch, cursor, order, partitions)``
  (:class:`StreamState`), so a run resumes exactly, on any number of ranks and DataLoader workers.
- A loader made with ``make_dataloader(stream, epochs=None)`` keeps its workers for every epoch:
  each rolls into the next epoch itself (:meth:`CorpusStream.iter_worker`).

The module imports neither Ray nor ``pipeline``; storage is reached through fsspec only
(:mod:`trainer.shard_cache`), data is decoded by :mod:`storage_schemas`; no pickle.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage_schemas import (
    COMMITS_DIR,
    DATASET_CARD,
    MANIFEST,
    CorpusFormatError,
    DatasetCard,
    ShardCommit,
    manifest_from_parquet_bytes,
    sample_key,
    shard_number,
)
from storage_schemas.record import decode_spans_into
from storage_schemas.shard import MemberSpans, index_shard_members

from .shard_cache import CorruptShardError, ShardCache, ShardFetchError, with_retries

__all__ = [
    "Corpus",
    "CorpusNotFinalizedError",
    "CorpusStream",
    "CorruptShardError",
    "EpochOrder",
    "PartitionedOrder",
    "SampleLocator",
    "ShardFetchError",
    "StreamConfig",
    "StreamState",
    "StreamStateMismatch",
    "corpus_fingerprint",
    "make_dataloader",
    "manifest_problems",
    "open_corpus",
    "rank_positions",
    "usable_end",
]

log = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")
ORDERS = ("partitioned", "global")
STATE_VERSION = 2
"""Version 2 adds ``order`` and ``partitions``; a version-1 state is read as ``order="global"``."""
ORDER_VERSION = "trajflow-order-v1"
"""Names the order algorithm; part of every generator seed, so a new algorithm gets new seeds."""


class CorpusNotFinalizedError(ValueError):
    """The URL holds no usable corpus: no card, or no ``manifest.parquet`` (e.g. still generating)."""


class StreamStateMismatch(ValueError):
    """A saved :class:`StreamState` does not belong to this corpus / seed / order algorithm."""


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """How a rank streams a corpus. Everything but ``url`` and ``batch_size`` has a default.

    The sample order depends on ``seed`` and ``shuffle_buffer`` (and the manifest) only: changing
    either changes the order, so a run must resume with the same values (``seed`` is checked).
    """

    url: str
    """Corpus root: an fsspec URL (``s3://bucket/corpus``, ``gs://...``, ``memory://...``) or a path."""
    batch_size: int
    """Samples per rank per step; a step consumes ``world_size * batch_size`` global positions."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``); never logged."""
    seed: int = 0
    """Seed of the global order (shard permutation and block shuffles), >= 0."""
    shuffle_buffer: int = 4096
    """Samples per shuffle block: positions are permuted within consecutive blocks of this size.
    Larger mixes better; each DataLoader worker holds the shards one block spans in memory."""
    cache_dir: str | None = None
    """Local shard cache directory; None: ``$TRAJFLOW_SHARD_CACHE`` or ``~/.cache/trajflow/shards``.
    Share one per node (all ranks and workers) so each shard is downloaded once per node."""
    cache_max_bytes: int = 20 * 10**9
    """Bound on the cache directory's total size; least recently used shards are evicted."""
    verify_sha256: bool = True
    """Check each downloaded shard's sha256 against the manifest (its size is always checked)."""
    on_corrupt: str = "error"
    """``"error"``: a corrupt shard raises :class:`CorruptShardError` naming it (also from a
    DataLoader worker). ``"skip"``: its positions yield placeholder samples with ``valid=False``."""
    prefetch_shards: int = 4
    """Shards fetched ahead, beyond those of the current shuffle block, by a background thread."""
    drop_remainder: bool = True
    """The only supported policy: the last ``(N - cursor) % (world * batch_size)`` positions of an
    epoch are dropped (and counted in ``CorpusStream.dropped_per_epoch``)."""
    fetch_attempts: int = 6
    """Tries per shard download for transient storage errors (jittered exponential backoff)."""
    order: str = "partitioned"
    """``"partitioned"`` (default): the shards are split into ``partitions`` contiguous parts of the
    epoch's shard permutation and each rank reads about its share of them (:class:`PartitionedOrder`).
    ``"global"``: one order independent of everything but the seed; every rank reads every shard of
    each shuffle block (:class:`EpochOrder`). Part of the resume state (checked)."""
    partitions: int | None = None
    """Canonical partitions of the partitioned order (like mosaicml/streaming's canonical nodes): the
    order is a pure function of (seed, epoch, manifest, shuffle_buffer, partitions) and does not
    depend on the world size. None: the saved state's value on resume, else the world size of the
    stream. Reads stay local when the world size divides it or is a multiple of it."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip("/"):
            raise ValueError(f"StreamConfig.url must be a corpus URL or path, found {self.url!r}")
        _check_int("batch_size", self.batch_size, minimum=1)
        if not isinstance(self.storage_options, dict):
            raise ValueError("StreamConfig.storage_options must be a dict of fsspec options")
        _check_int("seed", self.seed, minimum=0)
        _check_int("shuffle_buffer", self.shuffle_buffer, minimum=1)
        _check_int("cache_max_bytes", self.cache_max_bytes, minimum=1)
        _check_int("prefetch_shards", self.prefetch_shards, minimum=0)
        _check_int("fetch_attempts", self.fetch_attempts, minimum=1)
        if self.order not in ORDERS:
            raise ValueError(f"StreamConfig.order must be one of {ORDERS}, found {self.order!r}")
        if self.partitions is not None:
            _check_int("partitions", self.partitions, minimum=1)
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"StreamConfig.cache_dir must be a path or None, found {self.cache_dir!r}")
        if not isinstance(self.verify_sha256, bool):
            raise ValueError(f"StreamConfig.verify_sha256 must be a bool, found {self.verify_sha256!r}")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"StreamConfig.on_corrupt must be one of {ON_CORRUPT}, found {self.on_corrupt!r}")
        if self.drop_remainder is not True:
            raise ValueError(
                "StreamConfig.drop_remainder must be True: the only supported remainder policy drops the "
                "epoch's last (N - cursor) % (world_size * batch_size) positions (counted in dropped_per_epoch); "
                "padding or a short last step would make ranks disagree on the step count"
            )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"StreamConfig.{name} must be an int >= {minimum}, found {value!r}")


# --- the corpus ----------------------------------------------------------------------------------


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
        shards = manifest_from_parquet_bytes(read(MANIFEST))
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


# --- the global order ----------------------------------------------------------------------------


def _rng_seed(*parts: object) -> int:
    text = ":".join([ORDER_VERSION, *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def _randperm(n: int, *parts: object) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(_rng_seed(*parts))
    return torch.randperm(n, generator=generator).tolist()


@dataclass(frozen=True)
class SampleLocator:
    """Where the sample at a global position lives."""

    position: int
    shard_index: int
    """Row of the shard in the manifest."""
    shard_id: str
    offset: int
    """The sample's place inside its shard (0 = first)."""
    index: int
    """The sample's global index (``first_index + offset``)."""


class EpochOrder:
    """The global sample order of one epoch: a pure function of (seed, epoch, shard sizes, block size).

    1. The shards are permuted by a ``torch.Generator`` seeded from (seed, epoch).
    2. Their samples, in shard order, form a stream of N positions (shards may differ in size).
    3. The stream is cut into blocks of ``shuffle_buffer`` consecutive positions (the last one may be
       shorter), each permuted by a generator seeded from (seed, epoch, block), generated lazily.

    Setup is O(num_shards); :meth:`locate` costs one cached block permutation lookup and a bisect.
    """

    _CACHED_BLOCKS = 4
    kind = "global"

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int) -> None:
        if not shard_sizes or any(s < 1 for s in shard_sizes):
            raise ValueError("EpochOrder needs at least one shard, each with at least one sample")
        self.seed, self.epoch, self.block_size = seed, epoch, shuffle_buffer
        self.shard_sizes = tuple(shard_sizes)
        self.shard_order = _randperm(len(shard_sizes), seed, epoch, "shards")
        """Stream slot j holds manifest shard ``shard_order[j]``."""
        starts = [0]
        for j in self.shard_order:
            starts.append(starts[-1] + shard_sizes[j])
        self.slot_starts = starts
        """Stream position of each slot's first sample; ``slot_starts[-1] == N``."""
        self.num_positions = starts[-1]
        self.num_blocks = -(-self.num_positions // shuffle_buffer)
        self._blocks: OrderedDict[int, list[int]] = OrderedDict()
        self._max_span: int | None = None

    def block_perm(self, block: int) -> list[int]:
        """The permutation of block ``block``: position ``block*B + o`` holds stream item ``block*B + perm[o]``."""
        perm = self._blocks.get(block)
        if perm is None:
            if not 0 <= block < self.num_blocks:
                raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
            length = min(self.block_size, self.num_positions - block * self.block_size)
            perm = _randperm(length, self.seed, self.epoch, "block", block)
            self._blocks[block] = perm
            while len(self._blocks) > self._CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(block)
        return perm

    def stream_item(self, position: int) -> int:
        """The stream item (before block shuffling) at a position."""
        if not 0 <= position < self.num_positions:
            raise IndexError(f"position {position} out of range [0, {self.num_positions})")
        block, offset = divmod(position, self.block_size)
        return block * self.block_size + self.block_perm(block)[offset]

    def locate(self, position: int) -> tuple[int, int]:
        """``(manifest shard row, offset inside the shard)`` of the sample at ``position``."""
        item = self.stream_item(position)
        slot = bisect.bisect_right(self.slot_starts, item) - 1
        return self.shard_order[slot], item - self.slot_starts[slot]

    def block_slots(self, block: int) -> range:
        """The stream slots (indices into ``shard_order``) whose samples block ``block`` holds."""
        first = block * self.block_size
        last = min(first + self.block_size, self.num_positions) - 1
        return range(bisect.bisect_right(self.slot_starts, first) - 1,
                     bisect.bisect_right(self.slot_starts, last))

    @property
    def max_block_span(self) -> int:
        """The most shards one block touches (what a worker keeps decoded in memory)."""
        if self._max_span is None:
            self._max_span = max(len(self.block_slots(b)) for b in range(self.num_blocks))
        return self._max_span

    def block_key(self, position: int) -> int:
        return position // self.block_size

    def step_positions(self, start: int, global_batch: int, batch_size: int, rank: int) -> list[int]:
        """Rank ``rank``'s positions of the step ``[start, start + global_batch)``: every W-th from
        ``start + rank`` (W = ``global_batch // batch_size``)."""
        return list(range(start + rank, start + global_batch, global_batch // batch_size))

    def digest(self) -> str:
        """A short hash of the shard permutation and block 0's permutation: detects an RNG that
        changed between the run that saved a state and the one that loads it (e.g. a torch upgrade)."""
        data = json.dumps([self.shard_order, self.block_perm(0)], separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]


class PartitionedOrder:
    """The partitioned sample order of one epoch: a pure function of (seed, epoch, shard sizes,
    shuffle_buffer, partitions) that lets each rank read about ``1 / world`` of the shards.

    1. The shards are permuted by a generator seeded from (seed, epoch) (as in :class:`EpochOrder`),
       and their samples, in that order, form a stream of N items.
    2. The stream is cut into ``P = partitions`` contiguous parts: part q holds stream items
       ``[q*N//P, (q+1)*N//P)`` (lengths differ by at most one; a shard may straddle two parts).
    3. Each part is shuffled in blocks of ``B = ceil(shuffle_buffer / P)`` items, each permuted by a
       generator seeded from (seed, epoch, P, part, block). A global batch then mixes as many shards
       as the global order's blocks of ``shuffle_buffer`` do, and a worker holds as many samples.
    4. Positions interleave the parts: position ``g < P*L`` (``L = N // P``) holds item ``g // P`` of
       part ``g % P``; the last ``N % P`` positions hold the last items of the longer parts.

    A step's positions are dealt to ranks sorted by (part, position) and cut into ``batch_size``
    chunks (:meth:`step_positions`): rank r of W reads parts ``r*P/W ..`` only, when W divides P or P
    divides W and P divides ``W * batch_size``.
    """

    kind = "partitioned"

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int,
                 partitions: int) -> None:
        if not shard_sizes or any(s < 1 for s in shard_sizes):
            raise ValueError("PartitionedOrder needs at least one shard, each with at least one sample")
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, found {partitions}")
        self.seed, self.epoch, self.partitions = seed, epoch, partitions
        self.shard_sizes = tuple(shard_sizes)
        self.shard_order = _randperm(len(shard_sizes), seed, epoch, "shards")
        starts = [0]
        for j in self.shard_order:
            starts.append(starts[-1] + shard_sizes[j])
        self.slot_starts = starts
        self.num_positions = n = starts[-1]
        p = partitions
        self.part_starts = [q * n // p for q in range(p + 1)]
        """Stream item where each part starts; ``part_starts[-1] == N``."""
        self.block_size = max(1, -(-shuffle_buffer // p))
        self.rounds = n // p  # L: positions [0, P*L) are whole rounds over all parts
        self.long_parts = [q for q in range(p) if self.part_starts[q + 1] - self.part_starts[q] > self.rounds]
        self.slot_of_shard = [0] * len(shard_sizes)
        for j, shard in enumerate(self.shard_order):
            self.slot_of_shard[shard] = j
        self._blocks: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self._cached_blocks = max(4, 2 * p)

    def part_length(self, part: int) -> int:
        return self.part_starts[part + 1] - self.part_starts[part]

    def round_and_part(self, position: int) -> tuple[int, int]:
        """``(item inside its part, part)`` of a position."""
        if not 0 <= position < self.num_positions:
            raise IndexError(f"position {position} out of range [0, {self.num_positions})")
        full = self.partitions * self.rounds
        if position < full:
            return divmod(position, self.partitions)
        return self.rounds, self.long_parts[position - full]

    def part_of(self, position: int) -> int:
        return self.round_and_part(position)[1]

    def block_key(self, position: int) -> int:
        """The shuffle block (inside every part) a position falls in; nondecreasing in the position."""
        return self.round_and_part(position)[0] // self.block_size

    def block_perm(self, part: int, block: int) -> list[int]:
        key = (part, block)
        perm = self._blocks.get(key)
        if perm is None:
            length = min(self.block_size, self.part_length(part) - block * self.block_size)
            if length < 1:
                raise IndexError(f"block {block} of part {part} is empty")
            perm = _randperm(length, self.seed, self.epoch, "part", self.partitions, part, block)
            self._blocks[key] = perm
            while len(self._blocks) > self._cached_blocks:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return perm

    def stream_item(self, position: int) -> int:
        k, q = self.round_and_part(position)
        block, offset = divmod(k, self.block_size)
        return self.part_starts[q] + block * self.block_size + self.block_perm(q, block)[offset]

    def locate(self, position: int) -> tuple[int, int]:
        """``(manifest shard row, offset inside the shard)`` of the sample at ``position``."""
        item = self.stream_item(position)
        slot = bisect.bisect_right(self.slot_starts, item) - 1
        return self.shard_order[slot], item - self.slot_starts[slot]

    def slot_of_item(self, item: int) -> int:
        return bisect.bisect_right(self.slot_starts, item) - 1

    def part_last_slot(self, part: int) -> int:
        return self.slot_of_item(self.part_starts[part + 1] - 1)

    def step_positions(self, start: int, global_batch: int, batch_size: int, rank: int) -> list[int]:
        """Rank ``rank``'s positions of the step ``[start, start + global_batch)``: the step's
        positions sorted by (part, position), chunk ``rank`` of ``batch_size``."""
        end = start + global_batch
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        p = self.partitions
        if end <= p * self.rounds:  # whole rounds only: part q's positions are start.. with g % P == q
            out: list[int] = []
            before = 0
            for q in range(p):
                g0 = start + (q - start) % p
                count = 0 if g0 >= end else (end - 1 - g0) // p + 1
                a, b = max(lo, before), min(hi, before + count)
                if a < b:
                    out.extend(range(g0 + (a - before) * p, g0 + (b - before) * p, p))
                before += count
                if before >= hi:
                    break
            return out
        ordered = sorted(range(start, end), key=lambda g: (self.part_of(g), g))
        return ordered[lo:hi]

    def digest(self) -> str:
        """A short hash of the shard permutation, the partitions and part 0's first block permutation."""
        first = self.block_perm(0, 0) if self.part_length(0) > 0 else []
        data = json.dumps(["partitioned", self.partitions, self.shard_order, first], separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def usable_end(num_positions: int, global_batch: int, cursor: int) -> int:
    """End of the positions an epoch uses from ``cursor``: whole steps of ``global_batch`` only."""
    if not 0 <= cursor <= num_positions:
        raise ValueError(f"cursor {cursor} out of range [0, {num_positions}]")
    return cursor + ((num_positions - cursor) // global_batch) * global_batch


def rank_positions(num_positions: int, batch_size: int, cursor: int, rank: int, world_size: int) -> range:
    """The global positions ``rank`` of ``world_size`` consumes from ``cursor`` to the epoch's usable end.

    Step s (from the cursor) takes positions ``[cursor + s*W*b, cursor + (s+1)*W*b)``; position p goes
    to rank ``(p - cursor) % W``. So the rank's own batch of step s is ``result[s*b:(s+1)*b]``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    end = usable_end(num_positions, world_size * batch_size, cursor)
    return range(cursor + rank, end, world_size)


# --- resume state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamState:
    """Everything needed to resume exactly: O(1) in size, JSON-able, valid for any world size.

    ``cursor`` counts the global positions of ``epoch`` consumed by all ranks together (ranks move
    in lockstep). ``order`` and ``partitions`` name the order algorithm and its canonical partitions
    (0 for the global order). ``order_digest`` (optional) fingerprints the epoch's order to catch an
    RNG change.
    """

    corpus_fingerprint: str
    seed: int
    epoch: int
    cursor: int
    order_digest: str = ""
    order: str = "global"
    partitions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "corpus_fingerprint": self.corpus_fingerprint, "seed": self.seed,
                "epoch": self.epoch, "cursor": self.cursor, "order_digest": self.order_digest,
                "order": self.order, "partitions": self.partitions}

    @classmethod
    def from_dict(cls, obj: Any) -> StreamState:
        if isinstance(obj, StreamState):
            return obj
        if not isinstance(obj, dict):
            raise StreamStateMismatch(f"a stream state must be a dict, found {type(obj).__name__}")
        version = obj.get("version")
        if version not in (1, STATE_VERSION) or isinstance(version, bool):
            raise StreamStateMismatch(
                f"stream state version {version!r} is not supported (this trajflow reads 1 and {STATE_VERSION})"
            )
        fields = [("corpus_fingerprint", str), ("seed", int), ("epoch", int), ("cursor", int)]
        if version == STATE_VERSION:
            fields += [("order", str), ("partitions", int)]
        for name, kind in fields:
            value = obj.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise StreamStateMismatch(f"stream state field {name!r} must be {kind.__name__}, found {value!r}")
        if obj["epoch"] < 0 or obj["cursor"] < 0 or obj["seed"] < 0:
            raise StreamStateMismatch(f"stream state has a negative seed, epoch or cursor: {obj}")
        digest = obj.get("order_digest", "")
        if not isinstance(digest, str):
            raise StreamStateMismatch(f"stream state field 'order_digest' must be str, found {digest!r}")
        known = {"version", "corpus_fingerprint", "seed", "epoch", "cursor", "order_digest"}
        if version == STATE_VERSION:
            known |= {"order", "partitions"}
        unknown = set(obj) - known
        if unknown:
            raise StreamStateMismatch(f"stream state has unknown field(s) {sorted(unknown)}")
        order, partitions = obj.get("order", "global"), obj.get("partitions", 0)
        if order not in ORDERS:
            raise StreamStateMismatch(f"stream state field 'order' must be one of {ORDERS}, found {order!r}")
        if (order == "partitioned") != (partitions >= 1) or partitions < 0:
            raise StreamStateMismatch(f"stream state has order {order!r} with partitions {partitions}")
        return cls(obj["corpus_fingerprint"], obj["seed"], obj["epoch"], obj["cursor"], digest, order, partitions)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> StreamState:
        return cls.from_dict(json.loads(text))


# --- reading shards in a worker ------------------------------------------------------------------


INDEX_CACHE_SHARDS = 16
"""Shard indexes (checked tar structure, payload offsets) a reader keeps, least recently used first
out. A shard that straddles shuffle blocks is checked once, not once per block."""


class _Block:
    """The samples one worker reads in one shuffle block, decoded into rows: one tensor per item field
    (rows grouped by shard, offsets in increasing order within a shard), so a batch is a gather of
    rows and a sample a view of one. A sample that cannot be used keeps its error in :attr:`errors`
    and placeholder values in its row."""

    def __init__(self, card: DatasetCard, located: Sequence[tuple[int, int]], positions: Sequence[int],
                 shard_numbers: Sequence[int], buffer: torch.Tensor | None = None) -> None:
        offsets: dict[int, list[int]] = {}
        for shard, offset in located:
            offsets.setdefault(shard, []).append(offset)
        self.shards: dict[int, tuple[int, list[int]]] = {}
        """shard row -> (its first row here, its offsets in this block, increasing)."""
        row_of: dict[int, dict[int, int]] = {}
        total = 0
        for shard, offs in offsets.items():
            offs = sorted(set(offs))
            self.shards[shard] = (total, offs)
            row_of[shard] = {o: total + i for i, o in enumerate(offs)}
            total += len(offs)
        self.rows = [row_of[s][o] for s, o in located]
        """Row of each of the block's positions, in the order they are read."""
        self.rows_t = torch.tensor(self.rows, dtype=torch.long)
        self.positions_t = torch.tensor(positions, dtype=torch.long)
        self.shard_t = torch.tensor([shard_numbers[s] for s, _ in located], dtype=torch.long)
        # the fields are views of one buffer: a reused one (batched reading: batches are copies, so a
        # block's memory is free once its batches are gathered) costs no fresh pages
        specs = [spec for spec in _batch_specs(total, card) if spec[0] not in ("position", "shard", "epoch")]
        specs = _with_offsets(spec[:3] for spec in specs)
        size = _buffer_size(specs)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(max(1, size), dtype=torch.uint8)
        self.buffer = buffer
        views = _views(buffer, specs)
        self.states, self.sigmas = views["states"], views["sigmas"]
        self.class_id, self.guidance, self.index = views["class_id"], views["guidance"], views["index"]
        self.seed, self.valid = views["seed"], views["valid"]
        self.valid.fill_(True)
        prompts = card.conditioning.kind == "prompt"
        self.prompt: list[str] | None = [""] * total if prompts else None
        self.prompt_id: list[str] | None = [""] * total if prompts else None
        self.errors: dict[int, CorruptShardError] = {}
        """Row -> why its sample cannot be used (the row holds a placeholder)."""
        self.ready: set[int] = set()
        """Shard rows decoded (or found bad) into this block."""
        self.card = card

    def fail(self, rows: Sequence[int], error: CorruptShardError, first_index: int,
             offsets: Sequence[int]) -> None:
        """Record ``error`` for these rows and give them placeholder values."""
        if not rows:
            return
        rows_t = torch.tensor(rows, dtype=torch.long)
        self.states[rows_t] = 0.0
        self.sigmas[rows_t] = torch.tensor(self.card.saved_sigmas, dtype=torch.float32)
        self.class_id[rows_t] = -1
        self.guidance[rows_t] = 0.0
        self.index[rows_t] = torch.tensor([first_index + o for o in offsets], dtype=torch.long)
        self.seed[rows_t] = -1
        self.valid[rows_t] = False
        for row in rows:
            self.errors[row] = error
            if self.prompt is not None and self.prompt_id is not None:
                self.prompt[row] = self.prompt_id[row] = ""


class _ShardReader:
    """One process's access to shards: the disk cache plus, in memory, only this worker's samples of
    the current shuffle block (a :class:`_Block`).

    At the start of a block the worker announces the positions it will read there
    (:meth:`begin_block`). The first time a shard is needed, its bytes are read whole and checked
    with :func:`storage_schemas.shard.index_shard_members` (which rejects unsafe members and
    truncated or corrupt tars) and against its manifest row (keys, count); the resulting index of
    payload offsets is kept in a small LRU (:data:`INDEX_CACHE_SHARDS`), so a shard that straddles
    blocks is not checked again. For each block, the samples this worker needs from the shard are
    decoded and validated together (:func:`storage_schemas.record.decode_spans_into`), straight
    from the shard bytes into the block's rows, and the bytes are dropped. A worker uses about
    ``1 / (world * workers)`` of every shard, so this keeps its memory at about
    ``shuffle_buffer / (world * workers)`` samples (plus one shard's bytes while it is decoded) and
    its decoding work at its own samples.
    """

    def __init__(self, cfg: StreamConfig, corpus: Corpus, bad_rows: dict[int, str] | None = None) -> None:
        self.pid = os.getpid()
        self.corpus = corpus
        self.cache = ShardCache(corpus.url, cfg.storage_options, cache_dir=cfg.cache_dir,
                                max_bytes=cfg.cache_max_bytes, verify_sha256=cfg.verify_sha256,
                                attempts=cfg.fetch_attempts)
        self._index: OrderedDict[int, list[tuple[str, MemberSpans]]] = OrderedDict()
        self._bad: dict[int, CorruptShardError] = {
            row: CorruptShardError(corpus.shards[row].shard_id, reason) for row, reason in (bad_rows or {}).items()}
        self._cache_checked: set[int] = set()
        self._shard_numbers = [shard_number(c.shard_id) for c in corpus.shards]
        self._spare: list[torch.Tensor] = []  # the buffers of the last two blocks (batched reading)
        self._buf: bytearray | None = None
        self.shards_indexed = 0
        """How many times this reader checked a shard's whole structure (for tests and stats)."""

    def close(self) -> None:
        self.cache.close()

    def begin_block(self, located: Sequence[tuple[int, int]], positions: Sequence[int], *,
                    reuse: bool = False) -> _Block:
        """A block for the ``(shard row, offset)`` of every sample this worker reads in it, in order.

        ``reuse``: nothing keeps views of a block's rows once its batches are gathered (batched
        reading), so the memory of the block before the previous one is reused (two are alive when
        a step straddles a block boundary)."""
        buffer = None
        if reuse:
            buffer = self._spare.pop(0) if len(self._spare) >= 2 else None
        block = _Block(self.corpus.card, located, positions, self._shard_numbers, buffer)
        if reuse:
            self._spare.append(block.buffer)
        return block

    def prefetch(self, shard_indices: Sequence[int]) -> None:
        self.cache.prefetch([self.corpus.shards[i] for i in shard_indices])

    def _shard_index(self, shard_index: int, data: bytes) -> list[tuple[str, MemberSpans]]:
        """The checked index of a shard's bytes, from the LRU or by checking them now."""
        index = self._index.get(shard_index)
        if index is not None:
            self._index.move_to_end(shard_index)
            return index
        commit = self.corpus.shards[shard_index]
        index = index_shard_members(data, commit.shard_id)
        self.shards_indexed += 1
        for offset, (key, _) in enumerate(index):
            expected = sample_key(commit.first_index + offset) if offset < commit.num_samples else None
            if key != expected:
                raise CorpusFormatError(
                    f"shard {commit.shard_id!r}: sample {offset} has key {key!r}, but the manifest's index "
                    f"range {commit.first_index}..{commit.last_index} "
                    + (f"says {expected!r}" if expected else f"holds only {commit.num_samples} samples")
                )
        if len(index) != commit.num_samples:
            raise CorpusFormatError(
                f"shard {commit.shard_id!r} holds {len(index)} samples, the manifest says {commit.num_samples}"
            )
        self._index[shard_index] = index
        while len(self._index) > INDEX_CACHE_SHARDS:
            self._index.popitem(last=False)
        return index

    def _decode_into(self, block: _Block, shard_index: int) -> dict[int, CorpusFormatError]:
        """Decode this block's samples of a shard into their rows; returns row -> error of those that
        do not decode. Raises for the whole shard (CorruptShardError: the stored object; else
        CorpusFormatError: the cached copy's size or structure)."""
        commit = self.corpus.shards[shard_index]
        with self.cache.open(commit) as f:
            size = os.fstat(f.fileno()).st_size
            if size != commit.num_bytes:  # the cached copy changed since it was verified
                raise CorpusFormatError(
                    f"shard {commit.shard_id!r}: the cached copy holds {size} bytes, the manifest says "
                    f"{commit.num_bytes}"
                )
            data = self._read_into(f, size)
        index = self._shard_index(shard_index, data)
        first_row, offsets = block.shards[shard_index]
        rows = slice(first_row, first_row + len(offsets))
        metas = decode_spans_into(data, [index[o] for o in offsets], self.corpus.card, block.states[rows],
                                  block.sigmas[rows], shard_id=commit.shard_id)
        del data
        errors: dict[int, CorpusFormatError] = {}
        good = metas
        if not all(isinstance(m, dict) for m in metas):
            errors = {first_row + j: m for j, m in enumerate(metas) if not isinstance(m, dict)}
            filler = {"class_id": -1, "guidance": 0.0, "index": -1, "seed": -1}
            good = [m if isinstance(m, dict) else filler for m in metas]
        # the per-sample scalars, for all of the shard's rows at once
        block.class_id[rows] = torch.tensor([int(m.get("class_id", -1)) for m in good], dtype=torch.long)
        block.guidance[rows] = torch.tensor([float(m["guidance"]) for m in good], dtype=torch.float32)
        block.index[rows] = torch.tensor([int(m["index"]) for m in good], dtype=torch.long)
        block.seed[rows] = torch.tensor([int(m["seed"]) for m in good], dtype=torch.long)
        if block.prompt is not None and block.prompt_id is not None:
            for j, m in enumerate(good):
                block.prompt[first_row + j] = str(m.get("prompt", ""))
                block.prompt_id[first_row + j] = "" if m.get("prompt_id") is None else str(m["prompt_id"])
        return errors

    def _read_into(self, f: Any, size: int) -> bytearray:
        """The file's ``size`` bytes in this reader's reused buffer (a fresh one costs a page fault per
        4 KiB; a corpus' shards mostly have one size). Decoding copies out what it keeps and the
        index holds offsets only, so the next shard can overwrite it."""
        if self._buf is None or len(self._buf) != size:
            self._buf = bytearray(size)
        if f.readinto(self._buf) != size:
            raise CorpusFormatError("the cached copy changed while it was read")
        return self._buf

    def _recheck(self, commit: ShardCommit, shard_index: int, exc: Exception) -> bool:
        """After a parse or decode error: True if the cached copy turned out damaged on this disk (it was
        removed; decode again, which fetches it again). Checked once per shard."""
        if shard_index in self._cache_checked:
            return False
        self._cache_checked.add(shard_index)
        if self.cache.verify_cached(commit):
            return False
        log.warning("shard %s: the cached copy is damaged (%s); fetching it again", commit.shard_id, exc)
        self.cache.invalidate(commit)
        self._index.pop(shard_index, None)
        return True

    def ensure(self, block: _Block, shard_index: int) -> None:
        """Decode the block's samples of this shard, once (errors are recorded in the block).

        Raises ShardFetchError (storage kept failing)."""
        if shard_index in block.ready:
            return
        commit = self.corpus.shards[shard_index]
        first_row, offsets = block.shards[shard_index]
        all_rows = range(first_row, first_row + len(offsets))
        error: CorruptShardError | None = self._bad.get(shard_index)
        errors: dict[int, CorpusFormatError] = {}
        for attempt in range(2):
            if error is not None:
                break
            try:
                errors = self._decode_into(block, shard_index)
            except CorruptShardError as exc:  # the stored object is missing or disagrees with the manifest
                error = self._bad[shard_index] = exc
                break
            except CorpusFormatError as exc:  # the whole shard is unreadable
                # the bytes were verified when they were cached: if the local copy no longer matches,
                # it was damaged on this disk; drop it and fetch it again (once)
                if attempt == 0 and self._recheck(commit, shard_index, exc):
                    continue
                error = self._bad[shard_index] = CorruptShardError(commit.shard_id, str(exc))
                break
            if errors and attempt == 0 and self._recheck(commit, shard_index, next(iter(errors.values()))):
                errors = {}
                continue
            break
        block.ready.add(shard_index)
        if error is not None:
            block.fail(list(all_rows), error, commit.first_index, offsets)
            return
        for row, exc in sorted(errors.items()):
            block.fail([row], CorruptShardError(commit.shard_id, str(exc)), commit.first_index,
                       [offsets[row - first_row]])


# --- the dataset ---------------------------------------------------------------------------------


class CorpusStream(IterableDataset):
    """One rank's stream of a finalized corpus, as a ``torch.utils.data.IterableDataset``.

    Iterating yields exactly this rank's positions of the current epoch, from the cursor to the
    epoch's usable end (see :func:`rank_positions`), as dicts:

    ========== ======================= ==================================================
    key        value                   note
    ========== ======================= ==================================================
    states     [K, *sample_shape] f32  the teacher's solver states at ``sigmas``
    sigmas     [K] f32                 strictly decreasing, 1.0 ... 0.0
    class_id   long                    -1 if the corpus is not class-conditioned
    guidance   f32                     the CFG scale the trajectory was solved with
    index      long                    the sample's global index in the corpus
    seed       long                    its noise seed (-1 for a placeholder)
    position   long                    the global position it was consumed at
    shard      long                    the number of the shard it came from
    valid      bool                    False: a placeholder for a corrupt sample (``on_corrupt="skip"``)
    prompt     str                     only for prompt-conditioned corpora ("" if none)
    prompt_id  str                     only for prompt-conditioned corpora ("" if none)
    ========== ======================= ==================================================

    With ``batched=True`` it yields one collated batch per training step instead (the rank's
    ``batch_size`` samples of that step, in order); use :func:`make_dataloader` either way.

    In DataLoader workers the rank's positions (or steps, when batched) go round-robin to the
    workers; the DataLoader (in order) re-interleaves them, so what the trainer sees is identical
    for any number of workers.

    The trainer owns the cursor: after each optimizer step call :meth:`advance` (all ranks move by
    ``world_size * batch_size``), at the end of an epoch :meth:`set_epoch`. An iterator created
    afterwards starts from the new cursor; one already running is not affected.

    Args:
        cfg: the stream configuration.
        rank, world_size: this process's place in the job (e.g. ``accelerator.process_index`` and
            ``accelerator.num_processes``).
        state: a saved :class:`StreamState` (or its dict) to resume from.
        batched: yield one collated batch per step rather than single samples.
        corpus: an already opened :class:`Corpus` (default: read from ``cfg.url``).
    """

    def __init__(self, cfg: StreamConfig, rank: int = 0, world_size: int = 1,
                 state: StreamState | dict[str, Any] | None = None, *, batched: bool = False,
                 corpus: Corpus | None = None) -> None:
        super().__init__()
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, found {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), found {rank!r}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.batched = batched
        self.corpus = corpus if corpus is not None else open_corpus(cfg.url, cfg.storage_options,
                                                                    attempts=cfg.fetch_attempts)
        self._shard_sizes = [c.num_samples for c in self.corpus.shards]
        self._shard_numbers = [shard_number(c.shard_id) for c in self.corpus.shards]
        self._num_positions = sum(self._shard_sizes)
        self._bad_rows = manifest_problems(self.corpus)
        if self._bad_rows and cfg.on_corrupt == "error":
            row = min(self._bad_rows)
            raise CorruptShardError(self.corpus.shards[row].shard_id, self._bad_rows[row])
        for row in sorted(self._bad_rows):
            log.warning("skipping corrupt data (on_corrupt='skip'): corrupt shard %r: %s",
                        self.corpus.shards[row].shard_id, self._bad_rows[row])
        self._partitions = 0 if cfg.order == "global" else (cfg.partitions or world_size)
        self._epoch = 0
        self._cursor = 0
        self._order: EpochOrder | PartitionedOrder | None = None
        self._reader: _ShardReader | None = None
        self._pool: _BufferPool | None = None
        self._pool_pid = 0
        self.skipped_samples = 0
        """Placeholder samples this process yielded (``on_corrupt="skip"``; not counted in workers)."""
        self._corrupt_shards: set[str] = {self.corpus.shards[row].shard_id for row in self._bad_rows}
        if state is not None:
            self.load_state_dict(state)

    # -- sizes and positions -----------------------------------------------------------------------
    @property
    def card(self) -> DatasetCard:
        return self.corpus.card

    @property
    def num_positions(self) -> int:
        """N: the samples the manifest lists (positions per epoch before dropping the remainder)."""
        return self._num_positions

    @property
    def global_batch(self) -> int:
        return self.world_size * self.cfg.batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def usable_end(self) -> int:
        """The position where this epoch stops for the current world size and cursor."""
        return usable_end(self.num_positions, self.global_batch, self._cursor)

    @property
    def dropped_per_epoch(self) -> int:
        """Positions of the current epoch that no step will use: ``N - usable_end``."""
        return self.num_positions - self.usable_end

    @property
    def remaining_steps(self) -> int:
        """Steps left in the current epoch from the cursor."""
        return (self.usable_end - self._cursor) // self.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a whole epoch (from cursor 0) at the current world size."""
        return self.num_positions // self.global_batch

    @property
    def corrupt_shards(self) -> list[str]:
        """Shards in which this process found corruption (``on_corrupt="skip"``)."""
        return sorted(self._corrupt_shards)

    @property
    def order(self) -> str:
        """``"partitioned"`` or ``"global"`` (:attr:`StreamConfig.order`)."""
        return self.cfg.order

    @property
    def partitions(self) -> int:
        """The canonical partitions of the partitioned order (0 for the global order)."""
        return self._partitions

    def _make_order(self, epoch: int, partitions: int | None = None) -> EpochOrder | PartitionedOrder:
        partitions = self._partitions if partitions is None else partitions
        if self.cfg.order == "global":
            return EpochOrder(self._shard_sizes, seed=self.cfg.seed, epoch=epoch, shuffle_buffer=self.cfg.shuffle_buffer)
        return PartitionedOrder(self._shard_sizes, seed=self.cfg.seed, epoch=epoch,
                                shuffle_buffer=self.cfg.shuffle_buffer, partitions=partitions)

    def step_positions(self, epoch: int, cursor: int, step: int, rank: int | None = None,
                       world: int | None = None) -> list[int]:
        """Positions ``rank`` of ``world`` (default: this stream's) consumes at ``step`` steps after
        ``cursor`` in ``epoch``: its chunk of ``[cursor + step*W*b, cursor + (step+1)*W*b)`` (a pure function)."""
        rank = self.rank if rank is None else rank
        world = self.world_size if world is None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world_size {world}")
        g = world * self.cfg.batch_size
        return self.global_order(epoch).step_positions(cursor + step * g, g, self.cfg.batch_size, rank)

    def rank_positions(self, epoch: int, cursor: int, rank: int, world: int) -> Sequence[int]:
        """Positions ``rank`` of ``world`` consumes in ``epoch`` from ``cursor`` (a pure function), step by step.

        For the global order this is a ``range`` (every W-th position from ``cursor + rank``); for the
        partitioned order, the rank's chunks of each step (see :meth:`PartitionedOrder.step_positions`).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, found {epoch}")
        if self.cfg.order == "global":
            return rank_positions(self.num_positions, self.cfg.batch_size, cursor, rank, world)
        steps = (usable_end(self.num_positions, world * self.cfg.batch_size, cursor) - cursor) // (world * self.cfg.batch_size)
        return [p for s in range(steps) for p in self.step_positions(epoch, cursor, s, rank, world)]

    def global_order(self, epoch: int | None = None) -> EpochOrder | PartitionedOrder:
        """The epoch's order (default: the current epoch): :class:`PartitionedOrder` or :class:`EpochOrder`."""
        epoch = self._epoch if epoch is None else epoch
        if self._order is None or self._order.epoch != epoch:
            self._order = self._make_order(epoch)
        return self._order

    def locate(self, position: int, epoch: int | None = None) -> SampleLocator:
        """Which sample sits at ``position`` in ``epoch`` (default: the current one)."""
        shard_index, offset = self.global_order(epoch).locate(position)
        commit = self.corpus.shards[shard_index]
        return SampleLocator(position, shard_index, commit.shard_id, offset, commit.first_index + offset)

    # -- cursor and state --------------------------------------------------------------------------
    def advance(self, num_global_positions: int | None = None) -> None:
        """Mark positions as consumed by all ranks (default: one step, ``world_size * batch_size``)."""
        n = self.global_batch if num_global_positions is None else num_global_positions
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"advance takes a non-negative int, found {n!r}")
        if self._cursor + n > self.usable_end:
            raise ValueError(
                f"cannot advance by {n} from cursor {self._cursor}: epoch {self._epoch} ends at position "
                f"{self.usable_end}; call set_epoch({self._epoch + 1}) to start the next epoch"
            )
        self._cursor += n

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at cursor 0 (no-op if it is already the current epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, found {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._cursor = epoch, 0

    def begin_step(self, batch: dict[str, Any] | None = None) -> None:
        """Call with each batch of a loader that serves several epochs (``make_dataloader(...,
        epochs=None)``), before using it: starts the next epoch when the current one is used up
        (as ``set_epoch(epoch + 1)``) and checks that the batch is the step the cursor names (its
        ``epoch`` and this rank's ``position`` chunk), so a loader that went out of step with the
        cursor fails loudly instead of training on other samples."""
        if self.remaining_steps == 0:
            self.set_epoch(self._epoch + 1)
        if batch is None or "epoch" not in batch or not self.batched:
            return
        epochs = batch["epoch"].reshape(-1).tolist()
        positions = batch["position"].reshape(-1).tolist()
        expected = self.step_positions(self._epoch, self._cursor, 0)
        if any(e != self._epoch for e in epochs) or positions != expected:
            raise RuntimeError(
                f"the loader is out of step with the stream: it gave epoch {epochs[0]} positions {positions[:4]}…, the "
                f"cursor is at epoch {self._epoch} position {self._cursor} (expected {expected[:4]}…). Create the loader "
                "after loading a state or jumping with set_epoch, and call advance() once per step"
            )

    @property
    def state(self) -> StreamState:
        return StreamState(self.corpus.fingerprint, self.cfg.seed, self._epoch, self._cursor,
                           self.global_order().digest(), self.cfg.order, self._partitions)

    def state_dict(self) -> dict[str, Any]:
        """The resume state as a JSON-able dict (identical on every rank)."""
        return self.state.to_dict()

    def load_state_dict(self, state: StreamState | dict[str, Any]) -> None:
        """Resume from a saved state (any world size, any number of workers).

        Raises:
            StreamStateMismatch: the state belongs to another corpus, seed or order algorithm, or its
                cursor is past the end of the corpus.
        """
        state = StreamState.from_dict(state)
        if state.corpus_fingerprint != self.corpus.fingerprint:
            raise StreamStateMismatch(
                f"the saved stream state belongs to another corpus (fingerprint {state.corpus_fingerprint[:12]}…), "
                f"not to {self.corpus.url} (fingerprint {self.corpus.fingerprint[:12]}…): its card or manifest "
                "differs, so the saved cursor would not mean the same samples. Resume with the original corpus, "
                "or start a fresh stream state"
            )
        if state.seed != self.cfg.seed:
            raise StreamStateMismatch(
                f"the saved stream state was made with seed {state.seed}, this StreamConfig has seed {self.cfg.seed}: "
                "resume with the same seed (the sample order depends on it)"
            )
        if state.cursor > self.num_positions:
            raise StreamStateMismatch(
                f"the saved cursor {state.cursor} is past the corpus' {self.num_positions} positions"
            )
        if state.order != self.cfg.order:
            raise StreamStateMismatch(
                f"the saved stream state uses the {state.order} sample order, this StreamConfig the {self.cfg.order} "
                f"one: resume with StreamConfig(order={state.order!r}) (the order decides which sample sits at "
                "each position)"
            )
        if self.cfg.partitions is not None and state.partitions != self.cfg.partitions:
            raise StreamStateMismatch(
                f"the saved stream state was made with {state.partitions} partitions, this StreamConfig asks for "
                f"{self.cfg.partitions}: resume with partitions={state.partitions} (or None, which takes the "
                "state's); the partitioned order depends on it"
            )
        order = self._make_order(state.epoch, state.partitions)
        if state.order_digest and state.order_digest != order.digest():
            raise StreamStateMismatch(
                f"the sample order of epoch {state.epoch} differs from the one the state was saved with (order "
                f"digest {order.digest()} != {state.order_digest}): shuffle_buffer changed, or the random "
                f"generator of this torch ({torch.__version__}) differs from the saving run's"
            )
        self._epoch, self._cursor, self._order = state.epoch, state.cursor, order
        self._partitions = state.partitions

    # -- statistics --------------------------------------------------------------------------------
    def cache_stats(self) -> dict[str, int]:
        """This process's shard-cache counters (iteration in DataLoader workers counts there, not here)."""
        return self._reader.cache.stats.as_dict() if self._reader is not None else {}

    def close(self) -> None:
        """Stop this process's prefetch thread."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn get no reader
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_pool"] = None
        return state

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.iter_worker(worker, num_workers, epochs=1)

    def iter_worker(self, worker: int = 0, num_workers: int = 1, *, epochs: int | None = 1,
                    pack: bool | _SlotRing = False) -> Iterator[dict[str, Any]]:
        """What DataLoader worker ``worker`` of ``num_workers`` yields for this rank: the rest of the
        current epoch from the cursor, then (``epochs`` > 1, or None: endlessly) the following epochs
        from cursor 0. The rank's steps (``batched``) or samples are dealt round-robin to the workers
        across the epoch boundaries, so an in-order DataLoader sees one sequence for any worker count.

        The epoch and cursor are read now: ``advance()`` / ``set_epoch()`` do not affect a running
        iterator, which rolls into the next epoch by itself (the order is a pure function of the epoch).

        ``pack`` (what :func:`make_dataloader`'s workers do): each item's tensors travel as one
        shared-memory buffer (:func:`unpack_item` restores the dict in the main process), so a batch
        crosses to the main process as one tensor instead of ten.
        """
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} out of range for {num_workers} workers")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be an int >= 1 or None (endless), found {epochs!r}")
        return self._iter_epochs(worker, num_workers, self._epoch, self._cursor, epochs, pack)

    def _iter_epochs(self, worker: int, num_workers: int, epoch: int, cursor: int,
                     epochs: int | None, pack: bool | _SlotRing = False) -> Iterator[dict[str, Any]]:
        b, g = self.cfg.batch_size, self.global_batch
        done = 0  # this rank's units (steps when batched, else samples) in the epochs before
        e = epoch
        while epochs is None or e < epoch + epochs:
            steps = (usable_end(self.num_positions, g, cursor) - cursor) // g
            if steps == 0 and cursor == 0 and epochs is None:
                raise ValueError(f"corpus {self.corpus.url} holds {self.num_positions} samples, fewer than one "
                                 f"global batch ({self.world_size} x {b}): no epoch has a step")
            order = self._make_order(e)

            def tagged(step_ids: Iterable[int], order=order, cursor=cursor) -> Iterator[tuple[int, int]]:
                for s in step_ids:
                    start = cursor + s * g
                    positions = order.step_positions(start, g, b, self.rank)
                    if order.kind == "global":
                        yield from ((p, p // order.block_size) for p in positions)
                    else:  # one key per step: a step's chunk is sorted by part, not by position
                        key = order.block_key(start)
                        yield from ((p, key) for p in positions)

            first = (worker - done) % num_workers
            if self.batched:
                yield from self._iter_batches(order, tagged(range(first, steps, num_workers)), e, pack)
                done += steps
            else:
                mine = itertools.islice(tagged(range(steps)), first, None, num_workers)
                items = self._iter_items(order, mine, e)
                yield from (map(pack_item, items) if pack is not False else items)
                done += steps * b
            e, cursor = e + 1, 0

    def _iter_blocks(self, order: EpochOrder | PartitionedOrder, tagged: Iterable[tuple[int, int]], *,
                     reuse: bool = False) -> Iterator[tuple[_ShardReader, _Block, list[int], list[tuple[int, int]]]]:
        """Per shuffle block: the reader, the block (its samples decoded on demand, shard by shard),
        its positions and their ``(shard row, offset)``; prefetch started."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = _ShardReader(self.cfg, self.corpus, self._bad_rows)  # one per process: never across a fork
        reader = self._reader
        for _, in_block in itertools.groupby(tagged, key=lambda pk: pk[1]):
            block_positions = [p for p, _ in in_block]
            located = [order.locate(p) for p in block_positions]
            block = reader.begin_block(located, block_positions, reuse=reuse)
            self._prefetch(reader, order, block_positions, located)
            yield reader, block, block_positions, located

    def _check_rows(self, block: _Block, rows: Sequence[int], located: Sequence[tuple[int, int]]) -> None:
        """Placeholders among these rows: raise the first one's error (``on_corrupt="error"``), or count them."""
        for row, (shard_index, _) in zip(rows, located):
            error = block.errors.get(row)
            if error is None:
                continue
            if self.cfg.on_corrupt == "error":
                raise error
            shard_id = self.corpus.shards[shard_index].shard_id
            if shard_id not in self._corrupt_shards:
                self._corrupt_shards.add(shard_id)
                log.warning("skipping corrupt data (on_corrupt='skip'): %s", error)
            self.skipped_samples += 1

    def _iter_items(self, order: EpochOrder | PartitionedOrder, tagged: Iterable[tuple[int, int]],
                    epoch: int) -> Iterator[dict[str, Any]]:
        epoch_t = torch.tensor(epoch, dtype=torch.long)
        prompts = self.card.conditioning.kind == "prompt"
        for reader, block, _, located in self._iter_blocks(order, tagged):
            # 0-dim views of the block's rows, made at once (the rows fill as their shards are decoded)
            fields = (block.states.unbind(0), block.sigmas.unbind(0), block.class_id.unbind(0),
                      block.guidance.unbind(0), block.index.unbind(0), block.seed.unbind(0), block.valid.unbind(0))
            position_t, shard_t = block.positions_t.unbind(0), block.shard_t.unbind(0)
            for j, (row, where) in enumerate(zip(block.rows, located)):
                reader.ensure(block, where[0])
                if block.errors:
                    self._check_rows(block, (row,), (where,))
                states, sigmas, class_id, guidance, index, seed, valid = (f[row] for f in fields)
                item: dict[str, Any] = {"states": states, "sigmas": sigmas, "class_id": class_id,
                                        "guidance": guidance, "index": index, "seed": seed,
                                        "position": position_t[j], "shard": shard_t[j], "valid": valid,
                                        "epoch": epoch_t}
                if prompts:
                    item["prompt"] = block.prompt[row]  # type: ignore[index]
                    item["prompt_id"] = block.prompt_id[row]  # type: ignore[index]
                yield item

    def _iter_batches(self, order: EpochOrder | PartitionedOrder, tagged: Iterable[tuple[int, int]],
                      epoch: int, pack: bool | _SlotRing) -> Iterator[dict[str, Any]]:
        """The rank's batches, each gathered from the decoded rows of its block(s) straight into one
        buffer (shared memory when ``pack``), without a dict per sample."""
        b = self.cfg.batch_size
        pieces: list[tuple[_Block, int, int]] = []
        have = 0
        for reader, block, positions, located in self._iter_blocks(order, tagged, reuse=True):
            j = 0
            while j < len(positions):  # a step of the global order may straddle two blocks
                take = min(b - have, len(positions) - j)
                for shard_index, _ in located[j:j + take]:
                    reader.ensure(block, shard_index)
                if block.errors:
                    self._check_rows(block, block.rows[j:j + take], located[j:j + take])
                pieces.append((block, j, j + take))
                have, j = have + take, j + take
                if have == b:
                    yield self._gather(pieces, epoch, pack)
                    pieces, have = [], 0
        if pieces:  # not reached: a rank's positions are whole steps
            yield self._gather(pieces, epoch, pack)

    def _gather(self, pieces: Sequence[tuple[_Block, int, int]], epoch: int, pack: bool | _SlotRing) -> dict[str, Any]:
        n = sum(j1 - j0 for _, j0, j1 in pieces)
        card = self.card
        specs = _batch_specs(n, card)
        slot = None
        if isinstance(pack, _SlotRing):  # a worker of make_dataloader: a shared buffer the main process returned
            buffer, slot, fresh = pack.get(max(1, _buffer_size(specs)))
            views = _views(buffer, specs)
        else:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool, self._pool_pid = _BufferPool(), os.getpid()
            buffer, views = _alloc_views(specs, shared=pack, pool=self._pool)
        offset = 0
        for block, j0, j1 in pieces:
            rows = block.rows_t[j0:j1]
            end = offset + (j1 - j0)
            for name in ("states", "sigmas", "class_id", "guidance", "index", "seed", "valid"):
                torch.index_select(getattr(block, name), 0, rows, out=views[name][offset:end])
            views["position"][offset:end] = block.positions_t[j0:j1]
            views["shard"][offset:end] = block.shard_t[j0:j1]
            offset = end
        views["epoch"].fill_(epoch)
        extra: dict[str, Any] = {}
        if card.conditioning.kind == "prompt":
            extra["prompt"] = [block.prompt[r] for block, j0, j1 in pieces for r in block.rows[j0:j1]]  # type: ignore[index]
            extra["prompt_id"] = [block.prompt_id[r] for block, j0, j1 in pieces for r in block.rows[j0:j1]]  # type: ignore[index]
        if slot is not None:  # the buffer travels once per slot; afterwards only the slot's number
            assert isinstance(pack, _SlotRing)
            message = {_SLOT: [pack.worker, slot], _LAYOUT: [list(spec) for spec in specs], **extra}
            if fresh:
                message[_PACKED] = buffer
            return message
        if pack:
            return {_PACKED: buffer, _LAYOUT: [list(spec) for spec in specs], **extra}
        return {**views, **extra}

    def _prefetch(self, reader: _ShardReader, order: EpochOrder | PartitionedOrder, positions: Sequence[int],
                  located: Sequence[tuple[int, int]]) -> None:
        """Fetch in the background the shards of this block, then the next ``prefetch_shards`` of the
        stream (global order) or of each part this block reads (partitioned order)."""
        if self.cfg.prefetch_shards == 0 or not positions:
            return
        extra = self.cfg.prefetch_shards
        if order.kind == "global":
            slots = order.block_slots(positions[0] // order.block_size)
            end = min(len(order.shard_order), slots.stop + extra)
            reader.prefetch([order.shard_order[j] for j in range(slots.start, end)])
            return
        wanted = list(dict.fromkeys(shard for shard, _ in located))
        last_slot: dict[int, int] = {}
        for p, (shard, _) in zip(positions, located):
            part, slot = order.part_of(p), order.slot_of_shard[shard]
            last_slot[part] = max(slot, last_slot.get(part, -1))
        for part, slot in sorted(last_slot.items()):
            stop = min(order.part_last_slot(part), slot + extra)
            wanted.extend(order.shard_order[j] for j in range(slot + 1, stop + 1))
        reader.prefetch(list(dict.fromkeys(wanted)))


# --- one buffer per item: how a worker's batches cross to the main process ------------------------

_PACKED = "_trajflow_packed"
_LAYOUT = "_trajflow_layout"
_SLOT = "_trajflow_slot"
RING_SLOTS = 6
"""Batch buffers per loader worker that go back and forth with the main process (see :class:`_SlotRing`)."""
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                                       torch.int32, torch.bool, torch.uint8)}
_ALIGN = 64


def _batch_specs(n: int, card: DatasetCard) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of a batch's tensors in one buffer, in item order."""
    fields = [("states", "float32", (n, *card.states_shape)), ("sigmas", "float32", (n, len(card.saved_sigmas))),
              ("class_id", "int64", (n,)), ("guidance", "float32", (n,)), ("index", "int64", (n,)),
              ("seed", "int64", (n,)), ("position", "int64", (n,)), ("shard", "int64", (n,)),
              ("valid", "bool", (n,)), ("epoch", "int64", (n,))]
    return _with_offsets(fields)


def _with_offsets(fields: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...], int]]:
    specs, offset = [], 0
    for name, dtype, shape in fields:
        specs.append((name, dtype, tuple(shape), offset))
        nbytes = _DTYPES[dtype].itemsize * (1 if not shape else int(torch.Size(shape).numel()))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return specs


def _buffer_size(specs: Sequence[tuple[str, str, tuple[int, ...], int]]) -> int:
    name, dtype, shape, offset = specs[-1]
    return offset + _DTYPES[dtype].itemsize * int(torch.Size(shape).numel())


def _views(buffer: torch.Tensor, specs: Iterable[Sequence[Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, dtype, shape, offset in specs:
        dt = _DTYPES[dtype]
        size = dt.itemsize * int(torch.Size(shape).numel())
        out[name] = buffer[offset:offset + size].view(dt).view(tuple(shape))
    return out


def _storage_users() -> Any:
    """``buffer -> how many tensors use its storage`` (torch's storage use count, minus the temporary
    storage object asked), or None where this torch does not say it reliably."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None

    def users(buffer: torch.Tensor) -> int:
        return int(count(buffer.untyped_storage()._cdata)) - 1

    try:  # check the meaning once: a view adds a user, dropping it removes one
        probe = torch.empty(8, dtype=torch.uint8)
        alone = users(probe)
        view = probe[2:4]
        with_view = users(probe)
        del view
        if (alone, with_view, users(probe)) != (1, 2, 1):
            return None
    except Exception:  # noqa: BLE001 - a private API: without it, buffers are simply not reused
        return None
    return users


_USERS = _storage_users()


class _BufferPool:
    """Batch buffers of the main process, reused once nothing but the pool uses them (the consumer
    dropped every tensor of that batch): a fresh buffer costs a page fault per 4 KiB, about as much
    as decoding the samples. A buffer anything still uses is never handed out again."""

    KEEP = 4

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def get(self, size: int) -> torch.Tensor:
        if _USERS is not None:
            for i, buffer in enumerate(self._buffers):
                if buffer.numel() >= size and _USERS(buffer) == 1:
                    self._buffers.append(self._buffers.pop(i))
                    return buffer
        buffer = torch.empty(size, dtype=torch.uint8)
        if _USERS is not None:
            self._buffers.append(buffer)
            if len(self._buffers) > self.KEEP:
                self._buffers.pop(0)
        return buffer


def _alloc_views(specs: Sequence[tuple[str, str, tuple[int, ...], int]], *, shared: bool,
                 pool: _BufferPool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One uint8 buffer (in shared memory when ``shared``: a DataLoader worker's result is then sent
    without a copy; else from ``pool`` when given) and the typed views of its tensors."""
    size = max(1, _buffer_size(specs))
    if shared:
        buffer = _new_shared(size)
    elif pool is not None:
        buffer = pool.get(size)
    else:
        buffer = torch.empty(size, dtype=torch.uint8)
    return buffer, _views(buffer, specs)


def _new_shared(size: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))


class _SlotRing:
    """A loader worker's batch buffers, in shared memory, reused once the main process is done with them.

    A fresh shared buffer per batch costs the worker a page fault per 4 KiB it writes and the main
    process a file-descriptor hand-over (a socket round trip) and a fault per 4 KiB it reads. Instead,
    each of :data:`RING_SLOTS` buffers crosses once; later batches in it travel as its number. The
    main process (:class:`_Unpacked`) keeps the buffers and sets a slot's flag in ``flags`` (shared,
    1 = free) once no tensor of the batch it gave out is alive (the storage's use count); the worker
    writes only into a free slot, and into a fresh buffer when none is (it never waits)."""

    def __init__(self, flags: torch.Tensor, worker: int) -> None:
        self.flags, self.worker = flags, worker
        self.buffers: list[torch.Tensor | None] = [None] * len(flags)

    def get(self, size: int) -> tuple[torch.Tensor, int | None, bool]:
        """(buffer, slot or None, whether the buffer is new to the main process)."""
        for k, free in enumerate(self.flags.tolist()):
            if free:
                buffer = self.buffers[k]
                fresh = buffer is None or buffer.numel() < size
                if fresh:
                    buffer = self.buffers[k] = _new_shared(size)
                self.flags[k] = 0
                return buffer, k, fresh  # type: ignore[return-value]
        return _new_shared(size), None, True


def pack_item(item: dict[str, Any]) -> dict[str, Any]:
    """An item (sample or batch) with all its tensors copied into one shared-memory buffer; other
    values (strings, lists of strings) are kept. :func:`unpack_item` gives the dict back."""
    tensors = {k: v for k, v in item.items() if isinstance(v, torch.Tensor)}
    specs = _with_offsets((k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())
    buffer, views = _alloc_views(specs, shared=True)
    for name, value in tensors.items():
        views[name].copy_(value)
    return {_PACKED: buffer, _LAYOUT: [list(spec) for spec in specs],
            **{k: v for k, v in item.items() if k not in tensors}}


def unpack_item(obj: Any) -> Any:
    """The item dict of a packed item (views of its one buffer); anything else unchanged."""
    if not (isinstance(obj, dict) and _PACKED in obj):
        return obj
    out: dict[str, Any] = _views(obj[_PACKED], obj[_LAYOUT])
    out.update((k, v) for k, v in obj.items() if k not in (_PACKED, _LAYOUT))
    return out


def worker_context():
    """The multiprocessing context of the loader's workers: ``spawn`` in a process that holds a Ray
    driver (``trajflow train`` with an embedded teacher pool, a notebook, the test session), else
    the platform default (``fork`` on Linux).

    ``fork`` copies the whole training process into each worker, including Ray's gRPC channels and
    the background threads that use them (a Serve handle's long-poll, task event reporting); a fork
    taken while one of them is mid-call can leave the parent's connection to the cluster hung for
    good (seen: a later ``ray.cluster_resources()`` never returned). A spawned worker starts a fresh
    interpreter instead (about 2 s per worker, paid once per loader: a loader made with
    ``epochs=None`` keeps its workers for the whole run)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        import multiprocessing

        return multiprocessing.get_context("spawn")
    return None


class _Epochs(IterableDataset):
    """What a loader's workers iterate: ``stream.iter_worker(worker, num_workers, epochs=epochs)``."""

    def __init__(self, stream: CorpusStream, epochs: int | None) -> None:
        super().__init__()
        self.stream, self.epochs = stream, epochs
        self.ring_flags: torch.Tensor | None = None
        """``[num_workers, RING_SLOTS]`` shared flags of the current iterator's slot rings (None: no rings)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        pack: bool | _SlotRing = info is not None
        if info is not None and self.ring_flags is not None and self.stream.batched:
            pack = _SlotRing(self.ring_flags[worker], worker)
        return self.stream.iter_worker(worker, num_workers, epochs=self.epochs, pack=pack)


class _Unpacked:
    """A DataLoader iterator whose items come packed from its workers (:func:`pack_item`): yields
    them unpacked; everything else (``_shutdown_workers``, ...) is the DataLoader iterator's."""

    def __init__(self, inner: Any, ring_flags: torch.Tensor | None = None) -> None:
        self._inner = inner
        self._ring_flags = ring_flags
        self._slots: dict[tuple[int, int], torch.Tensor] = {}
        self._given: list[tuple[int, int]] = []

    def __iter__(self) -> _Unpacked:
        return self

    def __next__(self) -> Any:
        self._release()
        obj = next(self._inner)
        if not (isinstance(obj, dict) and _SLOT in obj):
            return unpack_item(obj)
        where = (int(obj[_SLOT][0]), int(obj[_SLOT][1]))
        if _PACKED in obj:
            self._slots[where] = obj[_PACKED]
        self._given.append(where)
        out: dict[str, Any] = _views(self._slots[where], obj[_LAYOUT])
        out.update((k, v) for k, v in obj.items() if k not in (_PACKED, _LAYOUT, _SLOT))
        return out

    def _release(self) -> None:
        """Hand back to their workers the slots whose batches nothing uses any more."""
        if not self._given or self._ring_flags is None or _USERS is None:
            return
        kept = []
        for where in self._given:
            if _USERS(self._slots[where]) == 1:  # only this cache's tensor: every view was dropped
                self._ring_flags[where] = 1
            else:
                kept.append(where)
        self._given = kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _StreamLoader(DataLoader):
    """:func:`make_dataloader`'s DataLoader: its workers send each item as one shared-memory buffer
    (one tensor to pass between processes, not ten), unpacked into the usual dict here."""

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        dataset = self.dataset
        flags = None
        # slot rings when the batches are read here as they come (pinned copies would not be the slots)
        if isinstance(dataset, _Epochs) and not self.pin_memory and _USERS is not None:
            flags = torch.ones(self.num_workers, RING_SLOTS, dtype=torch.uint8).share_memory_()
            dataset.ring_flags = flags  # before the workers start: they inherit (fork) or receive (spawn) it
        inner = super().__iter__()
        return _Unpacked(inner, flags)


def make_dataloader(stream: CorpusStream, *, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int | None = None, multiprocessing_context: Any = None,
                    timeout: float = 0, epochs: int | None = 1, worker_init_fn: Any = None) -> DataLoader:
    """The DataLoader for a :class:`CorpusStream`: ``batch_size=None`` (the stream decides what an item
    is: a sample, or a whole step's batch when ``stream.batched``), in order, no sampler.

    ``iter(loader)`` starts its workers from the stream's cursor and epoch at that moment. With
    ``epochs=1`` (default) it yields the rest of the current epoch; with ``epochs=None`` it goes on
    into the following epochs for as long as it is read, with the same workers (started once, by
    fork or spawn: :func:`worker_context`), each rolling into the next epoch itself. With such a
    loader, call :meth:`CorpusStream.begin_step` with each batch (it moves the stream to the next
    epoch when one is used up and checks the batch against the cursor) and :meth:`~CorpusStream.advance`
    after each step. Create a new iterator after loading a state or a ``set_epoch`` that jumps.
    Do not pass the loader to ``accelerator.prepare``: the stream already shards by rank.
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor if prefetch_factor is not None else 2
        kwargs["persistent_workers"] = False  # one iterator serves every epoch (epochs=None) instead
        context = multiprocessing_context or worker_context()
        if context is not None:
            kwargs["multiprocessing_context"] = context
        if worker_init_fn is not None:
            kwargs["worker_init_fn"] = worker_init_fn
    # the loader's base seed comes from its own generator, not from the global RNG: creating a loader
    # (once per run, or again after a resume) must not move the RNG state that checkpoints save and restore
    kwargs["generator"] = torch.Generator().manual_seed(0)
    return _StreamLoader(_Epochs(stream, epochs), batch_size=None, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, timeout=timeout, **kwargs)
