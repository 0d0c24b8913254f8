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
  ``"global"`` (:class:`GlobalOrder`, formerly ``EpochOrder``): a function of ``(seed, epoch,
  manifest, shuffle_buffer)``; position ``p`` goes to rank ``(p - cursor) % world`` and every rank
  reads every shard.
- **cursor**: how many positions of the current epoch all ranks together have consumed. The
  resume state is ``(corpus fingerprint, seed, epoch, cursor, order, partitions)``
  (:class:`StreamState`), so a run resumes exactly, on any number of ranks and DataLoader workers.
- A loader made with ``make_dataloader(stream, epochs=None)`` keeps its workers for every epoch:
  each rolls into the next epoch itself (:meth:`CorpusStream.iter_worker`).

The modules, one concept each:

- :mod:`.config`: :class:`StreamConfig`, how a rank streams a corpus.
- :mod:`.corpus`: :class:`Corpus`, :func:`open_corpus` and the manifest checks.
- :mod:`.order`: the sample orders (:class:`Order`, :class:`PartitionedOrder`, :class:`GlobalOrder`).
- :mod:`.state`: :class:`StreamState`, the resume state.
- :mod:`.buffers`: a batch's tensors as views of one buffer, the buffers' reuse, packed items (a leaf).
- :mod:`.reader`: a worker's shard reader, the decoded samples of a shuffle block, the batches
  gathered from them.
- :mod:`.stream`: :class:`CorpusStream`, the ``IterableDataset``.
- :mod:`.transport`: :func:`make_dataloader` and how its workers' batches cross to the main process.

The package imports neither Ray nor ``pipeline``; storage is reached through fsspec only
(:mod:`trainer.shard_cache`), data is decoded by :mod:`storage_schemas`; no pickle.
"""

from __future__ import annotations

from ..shard_cache import CorruptShardError, ShardFetchError
from .config import StreamConfig
from .corpus import Corpus, CorpusNotFinalizedError, corpus_fingerprint, manifest_problems, open_corpus
from .order import EpochOrder, GlobalOrder, Order, PartitionedOrder, SampleLocator, rank_positions, usable_end
from .state import StreamState, StreamStateMismatch
from .stream import CorpusStream
from .transport import make_dataloader
from .transport import worker_context as worker_context  # named in docs/training_data.md

INDEX_CACHE_SHARDS = 16
"""Shard indexes (checked tar structure, payload offsets) a reader keeps, least recently used first
out. A shard that straddles shuffle blocks is checked once, not once per block. Read at use by
:mod:`.reader`: set it here (``trainer.data.INDEX_CACHE_SHARDS``)."""

__all__ = [
    "Corpus",
    "CorpusNotFinalizedError",
    "CorpusStream",
    "CorruptShardError",
    "EpochOrder",
    "GlobalOrder",
    "Order",
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
