"""Reading shards in a worker: the shard cache, the checked shard indexes, and the decoded samples
of the current shuffle block (:class:`Block`), from whose rows a batch is gathered (:func:`gather_batch`)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from storage_schemas import CorpusFormatError, DatasetCard, ShardCommit, sample_key, shard_number
from storage_schemas.record import decode_spans_into
from storage_schemas.shard import MemberSpans, index_shard_members

from ..shard_cache import CorruptShardError, ShardCache
from .buffers import (
    LAYOUT,
    PACKED,
    SLOT,
    BufferPool,
    SlotRing,
    alloc_views,
    batch_specs,
    buffer_size,
    buffer_views,
    with_offsets,
)
from .config import StreamConfig
from .corpus import Corpus

log = logging.getLogger(__name__)


def _index_cache_shards() -> int:
    """The package's :data:`~trainer.data.INDEX_CACHE_SHARDS`, read at use (a test lowers it)."""
    from . import INDEX_CACHE_SHARDS

    return INDEX_CACHE_SHARDS


class Block:
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
        specs = [spec for spec in batch_specs(total, card) if spec[0] not in ("position", "shard", "epoch")]
        specs = with_offsets(spec[:3] for spec in specs)
        size = buffer_size(specs)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(max(1, size), dtype=torch.uint8)
        self.buffer = buffer
        views = buffer_views(buffer, specs)
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


def gather_batch(pieces: Sequence[tuple[Block, int, int]], epoch: int, card: DatasetCard, pack: bool | SlotRing,
                 pool: Callable[[], BufferPool]) -> dict[str, Any]:
    """A batch of the rows ``block.rows[j0:j1]`` of each ``(block, j0, j1)`` piece, in order, gathered
    into one buffer: of the worker's slot ring (``pack`` a :class:`SlotRing`: the message names the
    slot, with the buffer the first time it crosses), a fresh shared one (``pack`` True: a packed item,
    :func:`~.buffers.unpack_item`), or ``pool()``'s (``pack`` False: the dict of tensors)."""
    n = sum(j1 - j0 for _, j0, j1 in pieces)
    specs = batch_specs(n, card)
    slot = None
    if isinstance(pack, SlotRing):  # a worker of make_dataloader: a shared buffer the main process returned
        buffer, slot, fresh = pack.get(max(1, buffer_size(specs)))
        views = buffer_views(buffer, specs)
    else:
        buffer, views = alloc_views(specs, shared=pack, pool=pool())
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
        assert isinstance(pack, SlotRing)
        message = {SLOT: [pack.worker, slot], LAYOUT: [list(spec) for spec in specs], **extra}
        if fresh:
            message[PACKED] = buffer
        return message
    if pack:
        return {PACKED: buffer, LAYOUT: [list(spec) for spec in specs], **extra}
    return {**views, **extra}


class ShardReader:
    """One process's access to shards: the disk cache plus, in memory, only this worker's samples of
    the current shuffle block (a :class:`Block`).

    At the start of a block the worker announces the positions it will read there
    (:meth:`begin_block`). The first time a shard is needed, its bytes are read whole and checked
    with :func:`storage_schemas.shard.index_shard_members` (which rejects unsafe members and
    truncated or corrupt tars) and against its manifest row (keys, count); the resulting index of
    payload offsets is kept in a small LRU (:data:`~trainer.data.INDEX_CACHE_SHARDS`), so a shard
    that straddles blocks is not checked again. For each block, the samples this worker needs from the shard are
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
                    reuse: bool = False) -> Block:
        """A block for the ``(shard row, offset)`` of every sample this worker reads in it, in order.

        ``reuse``: nothing keeps views of a block's rows once its batches are gathered (batched
        reading), so the memory of the block before the previous one is reused (two are alive when
        a step straddles a block boundary)."""
        buffer = None
        if reuse:
            buffer = self._spare.pop(0) if len(self._spare) >= 2 else None
        block = Block(self.corpus.card, located, positions, self._shard_numbers, buffer)
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
        while len(self._index) > _index_cache_shards():
            self._index.popitem(last=False)
        return index

    def _decode_into(self, block: Block, shard_index: int) -> dict[int, CorpusFormatError]:
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

    def ensure(self, block: Block, shard_index: int) -> None:
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
