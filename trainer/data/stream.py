"""One rank's stream of a finalized corpus: :class:`CorpusStream`, a ``torch.utils.data.IterableDataset``
that owns the cursor and the resume state and reads its positions' samples block by block."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage_schemas import DatasetCard, shard_number

from ..shard_cache import CorruptShardError
from .buffers import BufferPool, SlotRing, pack_item
from .config import StreamConfig
from .corpus import Corpus, manifest_problems, open_corpus
from .order import ORDER_TYPES, Order, SampleLocator, usable_end
from .reader import Block, ShardReader, gather_batch
from .state import StreamState, StreamStateMismatch

log = logging.getLogger(__name__)


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
        self._order_type = ORDER_TYPES[cfg.order]
        self._partitions = self._order_type.stream_partitions(cfg.partitions, world_size)
        self._epoch = 0
        self._cursor = 0
        self._order: Order | None = None
        self._reader: ShardReader | None = None
        self._pool: BufferPool | None = None
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

    def _make_order(self, epoch: int, partitions: int | None = None) -> Order:
        partitions = self._partitions if partitions is None else partitions
        return self._order_type.create(self._shard_sizes, seed=self.cfg.seed, epoch=epoch,
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
        return self.global_order(epoch).rank_positions(cursor, self.cfg.batch_size, rank, world)

    def global_order(self, epoch: int | None = None) -> Order:
        """The epoch's order (default: the current epoch): a :class:`PartitionedOrder` or :class:`GlobalOrder`."""
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
                    pack: bool | SlotRing = False) -> Iterator[dict[str, Any]]:
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
                     epochs: int | None, pack: bool | SlotRing = False) -> Iterator[dict[str, Any]]:
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
                    yield from zip(positions, order.step_block_keys(start, positions))

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

    def _iter_blocks(self, order: Order, tagged: Iterable[tuple[int, int]], *,
                     reuse: bool = False) -> Iterator[tuple[ShardReader, Block, list[int], list[tuple[int, int]]]]:
        """Per shuffle block: the reader, the block (its samples decoded on demand, shard by shard),
        its positions and their ``(shard row, offset)``; prefetch started."""
        if self._reader is None or self._reader.pid != os.getpid():
            self._reader = ShardReader(self.cfg, self.corpus, self._bad_rows)  # one per process: never across a fork
        reader = self._reader
        for _, in_block in itertools.groupby(tagged, key=lambda pk: pk[1]):
            block_positions = [p for p, _ in in_block]
            located = [order.locate(p) for p in block_positions]
            block = reader.begin_block(located, block_positions, reuse=reuse)
            self._prefetch(reader, order, block_positions, located)
            yield reader, block, block_positions, located

    def _check_rows(self, block: Block, rows: Sequence[int], located: Sequence[tuple[int, int]]) -> None:
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

    def _iter_items(self, order: Order, tagged: Iterable[tuple[int, int]],
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

    def _iter_batches(self, order: Order, tagged: Iterable[tuple[int, int]],
                      epoch: int, pack: bool | SlotRing) -> Iterator[dict[str, Any]]:
        """The rank's batches, each gathered from the decoded rows of its block(s) straight into one
        buffer (shared memory when ``pack``), without a dict per sample."""
        b = self.cfg.batch_size
        pieces: list[tuple[Block, int, int]] = []
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
                    yield gather_batch(pieces, epoch, self.card, pack, self._buffer_pool)
                    pieces, have = [], 0
        if pieces:  # not reached: a rank's positions are whole steps
            yield gather_batch(pieces, epoch, self.card, pack, self._buffer_pool)

    def _buffer_pool(self) -> BufferPool:
        """This process's pool of batch buffers (one per process: never across a fork)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = BufferPool(), os.getpid()
        return self._pool

    def _prefetch(self, reader: ShardReader, order: Order, positions: Sequence[int],
                  located: Sequence[tuple[int, int]]) -> None:
        """Fetch in the background the shards of this block, then the next ``prefetch_shards`` ones
        (:meth:`Order.prefetch_shards`: of the stream, or of each part this block reads)."""
        if self.cfg.prefetch_shards == 0 or not positions:
            return
        reader.prefetch(order.prefetch_shards(positions, located, self.cfg.prefetch_shards))
