"""The sample order of one epoch: which sample sits at each position, a pure function of its inputs.

:class:`Order` holds what every order shares: the epoch's shard permutation, the stream of N items
it makes, :meth:`~Order.locate`, and a small LRU of block permutations. Its subclasses,
:class:`PartitionedOrder` (``"partitioned"``, the default) and :class:`GlobalOrder` (``"global"``,
also importable as ``EpochOrder``), say how positions map to stream items and fill the hooks a
:class:`~trainer.data.CorpusStream` uses (how a rank's positions are dealt, grouped into shuffle
blocks and prefetched), so the stream never asks which order it has. :data:`ORDER_TYPES` maps
:attr:`StreamConfig.order <trainer.data.StreamConfig.order>` to the class.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from storage_schemas._fields import seed63

ORDER_VERSION = "trajflow-order-v1"
"""Names the order algorithm; part of every generator seed, so a new algorithm gets new seeds."""


def _randperm(n: int, *parts: object) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(seed63(ORDER_VERSION, *parts))
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


def usable_end(num_positions: int, global_batch: int, cursor: int) -> int:
    """End of the positions an epoch uses from ``cursor``: whole steps of ``global_batch`` only."""
    if not 0 <= cursor <= num_positions:
        raise ValueError(f"cursor {cursor} out of range [0, {num_positions}]")
    return cursor + ((num_positions - cursor) // global_batch) * global_batch


def rank_positions(num_positions: int, batch_size: int, cursor: int, rank: int, world_size: int) -> range:
    """The global positions ``rank`` of ``world_size`` consumes from ``cursor`` to the epoch's usable end,
    in the global order.

    Step s (from the cursor) takes positions ``[cursor + s*W*b, cursor + (s+1)*W*b)``; position p goes
    to rank ``(p - cursor) % W``. So the rank's own batch of step s is ``result[s*b:(s+1)*b]``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    end = usable_end(num_positions, world_size * batch_size, cursor)
    return range(cursor + rank, end, world_size)


class Order:
    """What the orders share: a pure function of (seed, epoch, shard sizes, ...).

    The shards are permuted by a ``torch.Generator`` seeded from (seed, epoch); their samples, in
    that order, form a stream of N items (shards may differ in size). A subclass decides which
    stream item sits at each position (:meth:`stream_item`, shuffling blocks of items with
    generators it seeds) and implements the hooks below. Block permutations are generated lazily
    and the last few are kept (``_cached_blocks``).
    """

    kind: ClassVar[str]
    """The :attr:`StreamConfig.order <trainer.data.StreamConfig.order>` value that selects this order."""
    _cached_blocks = 4
    block_size: int
    """Stream items per shuffle block."""

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int) -> None:
        if not shard_sizes or any(s < 1 for s in shard_sizes):
            raise ValueError(f"{type(self).__name__} needs at least one shard, each with at least one sample")
        self.seed, self.epoch = seed, epoch
        self.shard_sizes = tuple(shard_sizes)
        self.shard_order = _randperm(len(shard_sizes), seed, epoch, "shards")
        """Stream slot j holds manifest shard ``shard_order[j]``."""
        starts = [0]
        for j in self.shard_order:
            starts.append(starts[-1] + shard_sizes[j])
        self.slot_starts = starts
        """Stream position of each slot's first sample; ``slot_starts[-1] == N``."""
        self.num_positions = starts[-1]
        self._blocks: OrderedDict[Hashable, list[int]] = OrderedDict()

    # -- what a stream asks for ---------------------------------------------------------------------
    @classmethod
    def create(cls, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int,
               partitions: int) -> Order:
        """The order of an epoch as a stream makes it (``partitions``: the stream's, see
        :meth:`stream_partitions`)."""
        raise NotImplementedError

    @classmethod
    def stream_partitions(cls, requested: int | None, world_size: int) -> int:
        """The canonical partitions of a new stream's order (the resume state's ``partitions``), from
        :attr:`StreamConfig.partitions <trainer.data.StreamConfig.partitions>` and the world size."""
        raise NotImplementedError

    def stream_item(self, position: int) -> int:
        """The stream item (before block shuffling) at a position."""
        raise NotImplementedError

    def block_key(self, position: int) -> int:
        """The shuffle block a position falls in; nondecreasing in the position."""
        raise NotImplementedError

    def step_positions(self, start: int, global_batch: int, batch_size: int, rank: int) -> list[int]:
        """Rank ``rank``'s positions of the step ``[start, start + global_batch)``, in reading order."""
        raise NotImplementedError

    def step_block_keys(self, start: int, positions: Sequence[int]) -> Iterable[int]:
        """The key of the block each of ``positions`` (a rank's chunk of the step that starts at
        ``start``) is read in: a stream decodes consecutive positions with one key as one block."""
        raise NotImplementedError

    def prefetch_shards(self, positions: Sequence[int], located: Sequence[tuple[int, int]],
                        extra: int) -> list[int]:
        """Manifest rows to fetch in the background when a worker starts reading the block of these
        positions (``located``: their ``(shard row, offset)``): the block's shards and about ``extra``
        shards that follow."""
        raise NotImplementedError

    def digest(self) -> str:
        """A short hash of the order: detects an RNG that changed between the run that saved a state
        and the one that loads it (e.g. a torch upgrade)."""
        raise NotImplementedError

    def rank_positions(self, cursor: int, batch_size: int, rank: int, world: int) -> Sequence[int]:
        """Positions ``rank`` of ``world`` consumes from ``cursor`` to the usable end, step by step."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world_size {world}")
        g = world * batch_size
        steps = (usable_end(self.num_positions, g, cursor) - cursor) // g
        return [p for s in range(steps) for p in self.step_positions(cursor + s * g, g, batch_size, rank)]

    # -- shared -------------------------------------------------------------------------------------
    def locate(self, position: int) -> tuple[int, int]:
        """``(manifest shard row, offset inside the shard)`` of the sample at ``position``."""
        item = self.stream_item(position)
        slot = bisect.bisect_right(self.slot_starts, item) - 1
        return self.shard_order[slot], item - self.slot_starts[slot]

    def slot_of_item(self, item: int) -> int:
        """The stream slot (index into ``shard_order``) that holds a stream item."""
        return bisect.bisect_right(self.slot_starts, item) - 1

    def _cached(self, key: Hashable) -> list[int] | None:
        """A block permutation of the LRU (now the most recently used), or None."""
        perm = self._blocks.get(key)
        if perm is not None:
            self._blocks.move_to_end(key)
        return perm

    def _remember(self, key: Hashable, perm: list[int]) -> list[int]:
        """Keep a new block permutation, dropping the least recently used beyond ``_cached_blocks``."""
        self._blocks[key] = perm
        while len(self._blocks) > self._cached_blocks:
            self._blocks.popitem(last=False)
        return perm


class GlobalOrder(Order):
    """The global sample order of one epoch: a pure function of (seed, epoch, shard sizes, block size).

    1. The shards are permuted by a ``torch.Generator`` seeded from (seed, epoch).
    2. Their samples, in shard order, form a stream of N positions (shards may differ in size).
    3. The stream is cut into blocks of ``shuffle_buffer`` consecutive positions (the last one may be
       shorter), each permuted by a generator seeded from (seed, epoch, block), generated lazily.

    Position ``p`` of a step goes to rank ``(p - start) % world``, so every rank reads every shard of
    a block. Setup is O(num_shards); :meth:`locate` costs one cached block permutation lookup and a
    bisect.
    """

    kind = "global"

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int) -> None:
        super().__init__(shard_sizes, seed=seed, epoch=epoch)
        self.block_size = shuffle_buffer
        self.num_blocks = -(-self.num_positions // shuffle_buffer)
        self._max_span: int | None = None

    @classmethod
    def create(cls, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int,
               partitions: int) -> GlobalOrder:
        return cls(shard_sizes, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer)

    @classmethod
    def stream_partitions(cls, requested: int | None, world_size: int) -> int:
        return 0

    def block_perm(self, block: int) -> list[int]:
        """The permutation of block ``block``: position ``block*B + o`` holds stream item ``block*B + perm[o]``."""
        perm = self._cached(block)
        if perm is None:
            if not 0 <= block < self.num_blocks:
                raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
            length = min(self.block_size, self.num_positions - block * self.block_size)
            perm = self._remember(block, _randperm(length, self.seed, self.epoch, "block", block))
        return perm

    def stream_item(self, position: int) -> int:
        if not 0 <= position < self.num_positions:
            raise IndexError(f"position {position} out of range [0, {self.num_positions})")
        block, offset = divmod(position, self.block_size)
        return block * self.block_size + self.block_perm(block)[offset]

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

    def step_block_keys(self, start: int, positions: Sequence[int]) -> Iterable[int]:
        """Each position's own block: a step may straddle two."""
        return [p // self.block_size for p in positions]

    def prefetch_shards(self, positions: Sequence[int], located: Sequence[tuple[int, int]],
                        extra: int) -> list[int]:
        """The shards of the block, then the next ``extra`` of the stream."""
        slots = self.block_slots(positions[0] // self.block_size)
        end = min(len(self.shard_order), slots.stop + extra)
        return [self.shard_order[j] for j in range(slots.start, end)]

    def rank_positions(self, cursor: int, batch_size: int, rank: int, world: int) -> range:
        """Every W-th position from ``cursor + rank`` (:func:`rank_positions`)."""
        return rank_positions(self.num_positions, batch_size, cursor, rank, world)

    def digest(self) -> str:
        """A short hash of the shard permutation and block 0's permutation."""
        data = json.dumps([self.shard_order, self.block_perm(0)], separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]


EpochOrder = GlobalOrder
"""The former name of :class:`GlobalOrder`."""


class PartitionedOrder(Order):
    """The partitioned sample order of one epoch: a pure function of (seed, epoch, shard sizes,
    shuffle_buffer, partitions) that lets each rank read about ``1 / world`` of the shards.

    1. The shards are permuted by a generator seeded from (seed, epoch) (as in :class:`GlobalOrder`),
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
        super().__init__(shard_sizes, seed=seed, epoch=epoch)
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, found {partitions}")
        self.partitions = p = partitions
        n = self.num_positions
        self.part_starts = [q * n // p for q in range(p + 1)]
        """Stream item where each part starts; ``part_starts[-1] == N``."""
        self.block_size = max(1, -(-shuffle_buffer // p))
        self.rounds = n // p  # L: positions [0, P*L) are whole rounds over all parts
        self.long_parts = [q for q in range(p) if self.part_starts[q + 1] - self.part_starts[q] > self.rounds]
        self.slot_of_shard = [0] * len(shard_sizes)
        for j, shard in enumerate(self.shard_order):
            self.slot_of_shard[shard] = j
        self._cached_blocks = max(4, 2 * p)

    @classmethod
    def create(cls, shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle_buffer: int,
               partitions: int) -> PartitionedOrder:
        return cls(shard_sizes, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, partitions=partitions)

    @classmethod
    def stream_partitions(cls, requested: int | None, world_size: int) -> int:
        """The requested partitions, else the world size."""
        return requested or world_size

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
        perm = self._cached(key)
        if perm is None:
            length = min(self.block_size, self.part_length(part) - block * self.block_size)
            if length < 1:
                raise IndexError(f"block {block} of part {part} is empty")
            perm = self._remember(key, _randperm(length, self.seed, self.epoch, "part", self.partitions, part, block))
        return perm

    def stream_item(self, position: int) -> int:
        k, q = self.round_and_part(position)
        block, offset = divmod(k, self.block_size)
        return self.part_starts[q] + block * self.block_size + self.block_perm(q, block)[offset]

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

    def step_block_keys(self, start: int, positions: Sequence[int]) -> Iterable[int]:
        """One key for the whole step, its start's: a step's chunk is sorted by part, not by position."""
        return itertools.repeat(self.block_key(start), len(positions))

    def prefetch_shards(self, positions: Sequence[int], located: Sequence[tuple[int, int]],
                        extra: int) -> list[int]:
        """The shards of the block, then the next ``extra`` of each part the block reads (within the part)."""
        wanted = list(dict.fromkeys(shard for shard, _ in located))
        last_slot: dict[int, int] = {}
        for p, (shard, _) in zip(positions, located):
            part, slot = self.part_of(p), self.slot_of_shard[shard]
            last_slot[part] = max(slot, last_slot.get(part, -1))
        for part, slot in sorted(last_slot.items()):
            stop = min(self.part_last_slot(part), slot + extra)
            wanted.extend(self.shard_order[j] for j in range(slot + 1, stop + 1))
        return list(dict.fromkeys(wanted))

    def digest(self) -> str:
        """A short hash of the shard permutation, the partitions and part 0's first block permutation."""
        first = self.block_perm(0, 0) if self.part_length(0) > 0 else []
        data = json.dumps(["partitioned", self.partitions, self.shard_order, first], separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]


ORDER_TYPES: dict[str, type[Order]] = {cls.kind: cls for cls in (PartitionedOrder, GlobalOrder)}
"""The order class of each :attr:`StreamConfig.order <trainer.data.StreamConfig.order>` value."""
