"""How a rank streams a corpus: :class:`StreamConfig` and the names of its choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ON_CORRUPT = ("error", "skip")
ORDERS = ("partitioned", "global")


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
    each shuffle block (:class:`GlobalOrder`). Part of the resume state (checked)."""
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
