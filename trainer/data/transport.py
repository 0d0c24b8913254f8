"""How a loader worker's batches cross to the main process: one buffer per item.

A batch's tensors are views of one uint8 buffer laid out by :func:`~.buffers.batch_specs` (the
reader's blocks use the same layout). A DataLoader worker of :func:`make_dataloader` writes each batch
into a shared-memory buffer of its slot ring (:class:`~.buffers.SlotRing`), which crosses to the main
process once; later batches in it travel as the slot's number, and the main process
(:class:`_Unpacked`) hands a slot back once nothing uses its batch. Single samples travel packed
(:func:`~.buffers.pack_item`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .buffers import LAYOUT, PACKED, SLOT, USERS, SlotRing, buffer_views, unpack_item

if TYPE_CHECKING:
    from .stream import CorpusStream


RING_SLOTS = 6
"""Batch buffers per loader worker that go back and forth with the main process (see :class:`~.buffers.SlotRing`)."""


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
        pack: bool | SlotRing = info is not None
        if info is not None and self.ring_flags is not None and self.stream.batched:
            pack = SlotRing(self.ring_flags[worker], worker)
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
        if not (isinstance(obj, dict) and SLOT in obj):
            return unpack_item(obj)
        where = (int(obj[SLOT][0]), int(obj[SLOT][1]))
        if PACKED in obj:
            self._slots[where] = obj[PACKED]
        self._given.append(where)
        out: dict[str, Any] = buffer_views(self._slots[where], obj[LAYOUT])
        out.update((k, v) for k, v in obj.items() if k not in (PACKED, LAYOUT, SLOT))
        return out

    def _release(self) -> None:
        """Hand back to their workers the slots whose batches nothing uses any more."""
        if not self._given or self._ring_flags is None or USERS is None:
            return
        kept = []
        for where in self._given:
            if USERS(self._slots[where]) == 1:  # only this cache's tensor: every view was dropped
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
        if isinstance(dataset, _Epochs) and not self.pin_memory and USERS is not None:
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
