"""A node-local, content-addressed disk cache of corpus shards, with verified fetches and prefetch.

The trainer reads shards through :class:`ShardCache`:

- **Fetch**: one GET of ``<root>/<commit.path>`` through fsspec (``s3://``, ``gs://``, ``memory://``,
  local paths), with retries and jittered exponential backoff for transient errors (throttling, 5xx,
  dropped connections). The bytes land in a temporary file which is checked against the manifest row
  (size always, sha256 unless ``verify_sha256=False``) before it is renamed into place with
  ``os.replace``: a cached file is always complete and verified. A mismatch is fetched once more
  (a corrupted transfer heals); if the stored object itself is wrong, :class:`CorruptShardError`.
- **Content addressed**: a shard is stored as ``<cache_dir>/<sha256>.tar``, so corpora and runs that
  share shards share cache entries, and a stale entry can never be mistaken for a newer shard.
- **Shared safely**: several processes (DataLoader workers, the ranks of one node) may use one
  directory. A per-shard ``flock`` makes only one of them download a given shard while the others
  wait and then read the file; eviction runs under a directory lock. Readers open a file before
  using it, and POSIX keeps an open file readable after another process unlinks it.
- **Verified once per cache entry**: a verified file gets the modification time
  :data:`VERIFIED_MTIME_NS`, which no write produces. Each use checks it (one ``stat``): a file
  written, truncated or replaced since it was verified has a new modification time and is re-hashed
  (and fetched again if it no longer matches) before it is used; an unchanged one is not re-hashed.
- **Bounded**: after each fetch the least recently used files (by access time, set on every use)
  are deleted until the total is at most ``max_bytes``. Files this process asked to prefetch are
  evicted last. A single shard larger than the budget is still kept (and a warning logged).
- **Prefetch**: :meth:`ShardCache.prefetch` hands an ordered list of shards to a background thread
  that fetches the ones not cached yet, so the training step does not wait on storage.

Stats (:class:`CacheStats`) are per process. No pickle, no Ray, no ``pipeline`` import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, TypeVar

from storage_schemas import CorpusFormatError, CorpusLayout, ShardCommit
from storage_schemas.limits import SymlinkRefused, refuse_local_symlink
from storage_schemas.retry import is_transient  # noqa: F401 - re-exported for callers of this module
from storage_schemas.retry import with_retries as _with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

_SHARD_NAME = re.compile(r"([0-9a-f]{64})\.tar")
_HASH_CHUNK = 8 << 20
VERIFIED_MTIME_NS = 1_000_000_000 * 10**9
"""The modification time (2001-09-09T01:46:40Z, whole seconds) a cache entry gets when its sha256 is
verified. Writing to the file changes it, so a different value means: changed since verified (or
cached by a trajflow that did not stamp its entries), re-hash before use."""
STALE_TMP_SECONDS = 3600.0
"""Temporary files older than this are left-overs of a dead process and are removed at eviction."""
PREFETCH_IDLE_SECONDS = 5.0
"""The prefetch thread ends after this long without work (a new request starts another)."""


class CorruptShardError(CorpusFormatError):
    """A shard listed in the manifest cannot be used: its stored bytes disagree with the manifest
    (size or sha256), it is missing, truncated, not a valid tar, or a sample in it does not decode
    (schema, shape, dtype, NaN/Inf, unsafe member).

    Attributes:
        shard_id: the shard, e.g. ``"shard-000003"`` (``None`` if it could not be recovered).
        reason: what is wrong with it.

    Also constructible from one message string (how a DataLoader re-raises a worker's exception in
    the main process); the shard id is then recovered from the message.
    """

    def __init__(self, shard_id: str, reason: str | None = None) -> None:
        if reason is None:  # a single message, e.g. re-raised by torch's DataLoader
            message = shard_id
            match = re.search(r"corrupt shard '(shard-[0-9]+)'", message)
            self.shard_id = match.group(1) if match else None
            self.reason = message
            super().__init__(message)
            return
        self.shard_id = shard_id
        self.reason = reason
        super().__init__(f"corrupt shard {shard_id!r}: {reason}")

    def __reduce__(self):
        if self.shard_id is None:
            return (type(self), (self.reason,))
        return (type(self), (self.shard_id, self.reason))


class ShardFetchError(RuntimeError):
    """Storage kept failing (after retries), or refused for good (permissions, no bucket); names the object.

    Not a data problem: ``on_corrupt="skip"`` does not apply to it.
    """


# --- retries (one policy for pipeline, trainer and audit: storage_schemas.retry) -----------------


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.2,
                 max_delay: float = 8.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """``storage_schemas.retry.with_retries`` raising :class:`ShardFetchError` naming ``what``."""
    return _with_retries(fn, what=what, attempts=attempts, base_delay=base_delay, max_delay=max_delay,
                         sleep=sleep, error=ShardFetchError)


# --- the cache -----------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counters of one process's :class:`ShardCache` (not shared between processes)."""

    hits: int = 0
    """Foreground requests served by a file already in the cache."""
    misses: int = 0
    """Foreground requests that had to wait for a download (by this process or a concurrent one)."""
    fetches: int = 0
    """Shards this process downloaded and verified (foreground and prefetch)."""
    remote_reads: int = 0
    """Object reads (GETs) this process started, retries and failed verifications included."""
    bytes_fetched: int = 0
    prefetch_fetches: int = 0
    """Of ``fetches``, those done by the background prefetch thread."""
    verify_failures: int = 0
    """Downloads whose size or sha256 disagreed with the manifest."""
    evictions: int = 0
    evicted_bytes: int = 0
    invalidations: int = 0
    """Cached files removed because they were found damaged (see :meth:`ShardCache.invalidate`)."""
    rehashes: int = 0
    """Cached files re-hashed because they changed since they were verified (their stamp differs)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def default_cache_dir() -> str:
    """``$TRAJFLOW_SHARD_CACHE``, else ``$XDG_CACHE_HOME/trajflow/shards``, else ``~/.cache/trajflow/shards``."""
    explicit = os.environ.get("TRAJFLOW_SHARD_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "trajflow", "shards")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_and_hash(source: BinaryIO, dest: BinaryIO) -> tuple[int, str]:
    """Copy ``source`` to ``dest`` in chunks, hashing each chunk as it passes: one read of the bytes
    instead of a copy and a second pass to hash. Returns (bytes copied, sha256 hex)."""
    digest, size = hashlib.sha256(), 0
    chunk = bytearray(_HASH_CHUNK)
    view = memoryview(chunk)
    while n := source.readinto(chunk):
        digest.update(view[:n])  # hashlib releases the GIL for large updates
        dest.write(view[:n])
        size += n
    return size, digest.hexdigest()


_LOCK_FDS: set[int] = set()
"""Descriptors of the lock files this process has open."""
_LOCK_FDS_GUARD = threading.Lock()
"""Held while a lock descriptor is opened or closed, and across ``fork``: a child always knows
exactly which inherited descriptors are lock files."""


def _before_fork() -> None:
    _LOCK_FDS_GUARD.acquire()


def _after_fork_in_parent() -> None:
    _LOCK_FDS_GUARD.release()


def _after_fork_in_child() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the descriptors of the locks its parent's
    # threads hold. A flock belongs to the open file description, so an inherited descriptor would
    # keep the parent's lock held for as long as the child lives, and the child would block on it.
    global _LOCK_FDS_GUARD
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _LOCK_FDS_GUARD = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), between processes and threads alike."""
    with _LOCK_FDS_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _LOCK_FDS.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with _LOCK_FDS_GUARD:
            _LOCK_FDS.discard(fd)
            os.close(fd)  # closing the (last) descriptor releases the lock


class ShardCache:
    """Verified, content-addressed local copies of the shards of the corpus at ``url``.

    Args:
        url: the corpus root (fsspec URL or local path); shard paths are the manifest's, relative to it.
        storage_options: passed to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``); never logged.
        cache_dir: the cache directory (created); ``None``: :func:`default_cache_dir`.
        max_bytes: bound on the total size of cached shards.
        verify_sha256: check each download's sha256 against the manifest (its size is always checked).
        attempts: tries per download for transient storage errors.
        base_delay: first retry delay in seconds (doubles, jittered, capped at 8 s).

    The filesystem object and the prefetch thread are created lazily, in the process that uses them,
    so an instance made before a ``fork`` must not be used on both sides of it (``CorpusStream``
    creates one per process).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 cache_dir: str | None = None, max_bytes: int = 20 * 10**9, verify_sha256: bool = True,
                 attempts: int = 6, base_delay: float = 0.2) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, found {max_bytes}")
        self.layout = CorpusLayout(url)
        self.storage_options = dict(storage_options or {})
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.max_bytes = int(max_bytes)
        self.verify_sha256 = verify_sha256
        self.attempts = attempts
        self.base_delay = base_delay
        self.stats = CacheStats()
        for sub in ("", "locks", "tmp"):
            os.makedirs(os.path.join(self.cache_dir, sub), exist_ok=True)
        self._lock = threading.Lock()
        self._fs = None
        self._fs_root = ""
        self._pinned: set[str] = set()
        self._prefetch_queue: list[ShardCommit] = []
        self._prefetch_cv = threading.Condition(self._lock)
        self._prefetch_thread: threading.Thread | None = None
        self._corrupt: dict[str, CorruptShardError] = {}
        self._closed = False
        self._warned_oversize = False

    def __repr__(self) -> str:
        return f"ShardCache({self.layout.root!r}, cache_dir={self.cache_dir!r}, max_bytes={self.max_bytes})"

    # -- paths -------------------------------------------------------------------------------------
    def local_path(self, commit: ShardCommit) -> str:
        """Where the shard's verified copy lives (whether or not it is there now)."""
        return os.path.join(self.cache_dir, f"{commit.sha256}.tar")

    def _lock_path(self, commit: ShardCommit) -> str:
        return os.path.join(self.cache_dir, "locks", f"{commit.sha256}.lock")

    def remote_url(self, commit: ShardCommit) -> str:
        return self.layout.join(commit.path)

    def _filesystem(self):
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._fs_root = url_to_fs(self.layout.root, **self.storage_options)
        return self._fs

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    # -- foreground --------------------------------------------------------------------------------
    def is_cached(self, commit: ShardCommit) -> bool:
        return os.path.exists(self.local_path(commit))

    def get(self, commit: ShardCommit) -> str:
        """A local path holding the shard's verified bytes, downloading them first if needed.

        Raises:
            CorruptShardError: the stored shard is missing or disagrees with its manifest row.
            ShardFetchError: storage kept failing.
        """
        path = self.local_path(commit)
        if self._touch(path):
            self._count(hits=1)
            return path
        self._count(misses=1)  # not cached, or changed since verified: _ensure re-hashes it
        self._ensure(commit, background=False)
        return path

    def open(self, commit: ShardCommit) -> BinaryIO:
        """The shard's verified bytes as an open binary file (see :meth:`get`).

        Opening holds the data even if another process evicts the file right after.
        """
        for _ in range(5):
            path = self.get(commit)
            try:
                return open(path, "rb")  # noqa: SIM115 - the caller owns the file
            except FileNotFoundError:  # evicted by another process between get() and open()
                continue
        raise ShardFetchError(f"{self.remote_url(commit)}: the cached copy kept disappearing "
                              f"(cache_max_bytes={self.max_bytes} is too small for the processes sharing "
                              f"{self.cache_dir})")

    def verify_cached(self, commit: ShardCommit) -> bool:
        """Re-hash the cached copy: True if present with the manifest's size and sha256 (it is then
        stamped verified again)."""
        path = self.local_path(commit)
        try:
            if os.path.getsize(path) != commit.num_bytes or sha256_file(path) != commit.sha256:
                return False
            self._stamp(path)
            return True
        except FileNotFoundError:
            return False

    def is_verified(self, commit: ShardCommit) -> bool:
        """True if the cached copy is there and unchanged since its sha256 was verified (no hashing)."""
        try:
            return os.stat(self.local_path(commit)).st_mtime_ns == VERIFIED_MTIME_NS
        except FileNotFoundError:
            return False

    def invalidate(self, commit: ShardCommit) -> None:
        """Remove a damaged cached copy (the next :meth:`get` downloads it again)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path(commit))
            self._count(invalidations=1)

    def cached_bytes(self) -> int:
        """Total size of the shards in the cache directory (all processes' files)."""
        return sum(size for _, size, _ in self._scan())

    @staticmethod
    def _stamp(path: str) -> None:
        """Mark a verified file: access time now (its LRU stamp), modification time the verified mark."""
        os.utime(path, ns=(time.time_ns(), VERIFIED_MTIME_NS))

    def _touch(self, path: str) -> bool:
        """Refresh the LRU stamp of a verified, unchanged file; False if the file is not there or was
        changed since it was verified (its modification time is not the verified mark)."""
        try:
            if os.stat(path).st_mtime_ns != VERIFIED_MTIME_NS:
                return False
            self._stamp(path)
            return True
        except FileNotFoundError:
            return False

    # -- fetching ----------------------------------------------------------------------------------
    def _ensure(self, commit: ShardCommit, *, background: bool) -> None:
        path = self.local_path(commit)
        with _flock(self._lock_path(commit)):
            if self._touch(path):  # another process or thread fetched it while we waited
                return
            if os.path.exists(path):  # there, but changed since it was verified: re-hash it
                self._count(rehashes=1)
                if self.verify_cached(commit):
                    return
                log.warning("shard %s: the cached copy changed since it was verified and no longer matches "
                            "the manifest; fetching it again", commit.shard_id)
                self.invalidate(commit)
            with self._lock:
                known = self._corrupt.get(commit.sha256)
            if known is not None:  # this process already found the stored object bad
                raise known
            try:
                self._download(commit, path)
            except CorruptShardError as exc:
                with self._lock:
                    self._corrupt[commit.sha256] = exc
                raise
            self._count(fetches=1, prefetch_fetches=int(background), bytes_fetched=commit.num_bytes)
        self._evict(keep=path)

    def _download(self, commit: ShardCommit, path: str) -> None:
        url = self.remote_url(commit)
        fs = self._filesystem()
        remote = f"{self._fs_root}/{commit.path}"
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        local = "file" in protocols or "local" in protocols
        if local:
            try:  # a shard of a local corpus that is a symlink could point anywhere: refused, like audit does
                refuse_local_symlink(self._fs_root, commit.path, url.rsplit("/" + commit.path, 1)[0])
            except SymlinkRefused as exc:
                raise CorruptShardError(commit.shard_id, str(exc)) from None
        tmp = os.path.join(self.cache_dir, "tmp", f"{commit.sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        problem = ""
        try:
            for _ in range(2):  # a corrupted transfer is fetched once more before blaming the object
                digest = ""

                def get() -> None:
                    nonlocal digest
                    self._count(remote_reads=1)
                    if local and self.verify_sha256:  # hashed while it is copied: one pass over the bytes
                        with fs.open(remote, "rb") as src, open(tmp, "wb") as dst:
                            digest = copy_and_hash(src, dst)[1]
                    else:  # one streaming GET into the file; hashed right after, from the page cache
                        fs.get_file(remote, tmp)
                        digest = ""

                try:
                    with_retries(get, what=f"reading shard {commit.shard_id} ({url})",
                                 attempts=self.attempts, base_delay=self.base_delay)
                except FileNotFoundError:
                    raise CorruptShardError(
                        commit.shard_id, f"the manifest lists {commit.path} but there is no such object at {url}"
                    ) from None
                size = os.path.getsize(tmp)
                if size != commit.num_bytes:
                    problem = f"stored object has {size} bytes, the manifest says {commit.num_bytes}"
                elif self.verify_sha256 and (digest := digest or sha256_file(tmp)) != commit.sha256:
                    problem = f"sha256 of the stored object is {digest}, the manifest says {commit.sha256}"
                else:
                    os.replace(tmp, path)
                    self._stamp(path)  # after the rename (a stale-temp sweep goes by mtime); under the shard lock
                    return
                self._count(verify_failures=1)
                log.warning("shard %s: %s; fetching it again", commit.shard_id, problem)
            raise CorruptShardError(commit.shard_id, f"{problem} ({url})")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # -- eviction ----------------------------------------------------------------------------------
    def _scan(self) -> list[tuple[str, int, float]]:
        """(path, size, atime) of every cached shard, least recently used first."""
        found = []
        with os.scandir(self.cache_dir) as entries:
            for entry in entries:
                if not _SHARD_NAME.fullmatch(entry.name):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((entry.path, st.st_size, st.st_atime_ns))
        found.sort(key=lambda item: item[2])
        return found

    def _evict(self, keep: str | None = None) -> None:
        """Delete least recently used shards until the total fits ``max_bytes`` (never ``keep``)."""
        with _flock(os.path.join(self.cache_dir, ".evict.lock")):
            files = self._scan()
            total = sum(size for _, size, _ in files)
            if total > self.max_bytes:
                with self._lock:
                    pinned = set(self._pinned)
                # unpinned files first (oldest first), then this process's prefetched-but-unused ones
                candidates = [f for f in files if f[0] != keep]
                order = [f for f in candidates if _sha_of(f[0]) not in pinned] + [
                    f for f in candidates if _sha_of(f[0]) in pinned]
                for path, size, _ in order:
                    if total <= self.max_bytes:
                        break
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    total -= size
                    self._count(evictions=1, evicted_bytes=size)
                if total > self.max_bytes and not self._warned_oversize:
                    self._warned_oversize = True
                    log.warning("shard cache %s holds %d bytes, over its %d-byte budget: the shards in use "
                                "do not fit; raise cache_max_bytes", self.cache_dir, total, self.max_bytes)
            self._clean_stale_tmp()

    def _clean_stale_tmp(self) -> None:
        now = time.time()
        tmp_dir = os.path.join(self.cache_dir, "tmp")
        with os.scandir(tmp_dir) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                        os.unlink(entry.path)

    # -- prefetch ----------------------------------------------------------------------------------
    def prefetch(self, commits: Iterable[ShardCommit]) -> None:
        """Fetch these shards in the background, in this order (replaces the previous request).

        They are also protected from this process's eviction until the next request. A failure is
        only logged here: the foreground :meth:`get` of the same shard raises it (a corrupt object is
        remembered, not fetched again; a transient storage error is retried).
        """
        wanted = list(commits)
        with self._prefetch_cv:
            self._pinned = {c.sha256 for c in wanted}
            self._prefetch_queue = [c for c in wanted if not self.is_verified(c)]
            if self._prefetch_queue and self._prefetch_thread is None and not self._closed:
                self._prefetch_thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                         name="trajflow-shard-prefetch")
                self._prefetch_thread.start()
            self._prefetch_cv.notify_all()

    def _prefetch_loop(self) -> None:
        while True:
            with self._prefetch_cv:
                if not self._prefetch_queue and not self._closed:
                    self._prefetch_cv.wait(timeout=PREFETCH_IDLE_SECONDS)
                if self._closed or not self._prefetch_queue:  # closed, or idle: the next request restarts it
                    self._prefetch_thread = None
                    return
                commit = self._prefetch_queue.pop(0)
            if self.is_verified(commit):
                continue
            try:
                self._ensure(commit, background=True)
            except CorruptShardError as exc:  # remembered; the foreground get() raises it
                log.debug("prefetch: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the foreground get() retries it
                log.warning("prefetch of shard %s failed: %s", commit.shard_id, exc)

    def close(self) -> None:
        """Stop the prefetch thread (cached files stay)."""
        with self._prefetch_cv:
            self._closed = True
            self._prefetch_queue = []
            self._prefetch_cv.notify_all()
            thread = self._prefetch_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sha_of(path: str) -> str:
    return os.path.basename(path)[:-4]
