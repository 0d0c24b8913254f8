"""Batch buffers: a batch's (or a block's) tensors as typed views of one uint8 buffer laid out by
:func:`batch_specs`, the buffers' reuse (:class:`BufferPool` in the main process, a loader worker's
:class:`SlotRing` in shared memory), and an item packed into one shared-memory buffer
(:func:`pack_item` / :func:`unpack_item`). A leaf: it imports nothing of the package."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from storage_schemas import DatasetCard

PACKED = "_trajflow_packed"
LAYOUT = "_trajflow_layout"
SLOT = "_trajflow_slot"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                                       torch.int32, torch.bool, torch.uint8)}
_ALIGN = 64


def batch_specs(n: int, card: DatasetCard) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of a batch's tensors in one buffer, in item order."""
    fields = [("states", "float32", (n, *card.states_shape)), ("sigmas", "float32", (n, len(card.saved_sigmas))),
              ("class_id", "int64", (n,)), ("guidance", "float32", (n,)), ("index", "int64", (n,)),
              ("seed", "int64", (n,)), ("position", "int64", (n,)), ("shard", "int64", (n,)),
              ("valid", "bool", (n,)), ("epoch", "int64", (n,))]
    return with_offsets(fields)


def with_offsets(fields: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...], int]]:
    specs, offset = [], 0
    for name, dtype, shape in fields:
        specs.append((name, dtype, tuple(shape), offset))
        nbytes = _DTYPES[dtype].itemsize * (1 if not shape else int(torch.Size(shape).numel()))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return specs


def buffer_size(specs: Sequence[tuple[str, str, tuple[int, ...], int]]) -> int:
    name, dtype, shape, offset = specs[-1]
    return offset + _DTYPES[dtype].itemsize * int(torch.Size(shape).numel())


def buffer_views(buffer: torch.Tensor, specs: Iterable[Sequence[Any]]) -> dict[str, torch.Tensor]:
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


USERS = _storage_users()


class BufferPool:
    """Batch buffers of the main process, reused once nothing but the pool uses them (the consumer
    dropped every tensor of that batch): a fresh buffer costs a page fault per 4 KiB, about as much
    as decoding the samples. A buffer anything still uses is never handed out again."""

    KEEP = 4

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def get(self, size: int) -> torch.Tensor:
        if USERS is not None:
            for i, buffer in enumerate(self._buffers):
                if buffer.numel() >= size and USERS(buffer) == 1:
                    self._buffers.append(self._buffers.pop(i))
                    return buffer
        buffer = torch.empty(size, dtype=torch.uint8)
        if USERS is not None:
            self._buffers.append(buffer)
            if len(self._buffers) > self.KEEP:
                self._buffers.pop(0)
        return buffer


def alloc_views(specs: Sequence[tuple[str, str, tuple[int, ...], int]], *, shared: bool,
                 pool: BufferPool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One uint8 buffer (in shared memory when ``shared``: a DataLoader worker's result is then sent
    without a copy; else from ``pool`` when given) and the typed views of its tensors."""
    size = max(1, buffer_size(specs))
    if shared:
        buffer = _new_shared(size)
    elif pool is not None:
        buffer = pool.get(size)
    else:
        buffer = torch.empty(size, dtype=torch.uint8)
    return buffer, buffer_views(buffer, specs)


def _new_shared(size: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))


class SlotRing:
    """A loader worker's batch buffers, in shared memory, reused once the main process is done with them.

    A fresh shared buffer per batch costs the worker a page fault per 4 KiB it writes and the main
    process a file-descriptor hand-over (a socket round trip) and a fault per 4 KiB it reads. Instead,
    each of :data:`~trainer.data.transport.RING_SLOTS` buffers crosses once; later batches in it travel as its number. The
    main process (the loader's iterator, :mod:`.transport`) keeps the buffers and sets a slot's flag in ``flags`` (shared,
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
    specs = with_offsets((k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())
    buffer, views = alloc_views(specs, shared=True)
    for name, value in tensors.items():
        views[name].copy_(value)
    return {PACKED: buffer, LAYOUT: [list(spec) for spec in specs],
            **{k: v for k, v in item.items() if k not in tensors}}


def unpack_item(obj: Any) -> Any:
    """The item dict of a packed item (views of its one buffer); anything else unchanged."""
    if not (isinstance(obj, dict) and PACKED in obj):
        return obj
    out: dict[str, Any] = buffer_views(obj[PACKED], obj[LAYOUT])
    out.update((k, v) for k, v in obj.items() if k not in (PACKED, LAYOUT))
    return out
