"""Read-only object access for the auditor: fsspec, with ``storage_schemas.retry``'s retries.

``s3://`` goes through s3fs (endpoint and credentials from the standard AWS environment, e.g.
``AWS_ENDPOINT_URL``, or ``storage_options``), plain paths and ``file://`` through the local
filesystem, ``memory://`` in tests. The auditor never writes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from fsspec.core import url_to_fs

from storage_schemas.limits import SymlinkRefused, refuse_local_symlink  # noqa: F401 - SymlinkRefused re-exported
from storage_schemas.retry import is_transient  # noqa: F401 - re-exported
from storage_schemas.retry import with_retries as _with_retries

T = TypeVar("T")

READ_CHUNK = 4 << 20
OPEN_BLOCK_SIZE = 8 << 20
"""Read-ahead block of remote file objects: bounds the memory one shard being read holds."""


class StorageReadError(RuntimeError):
    """An object could not be read after retries (or at all: permissions, bad URL)."""


#: ``storage_schemas.retry.with_retries`` (its policy) raising :class:`StorageReadError` naming ``what``; the
#: auditor's shorter budget: 4 attempts, backoff capped at 4 s
with_retries = functools.partial(_with_retries, attempts=4, max_delay=4.0, error=StorageReadError)


class HashingReader:
    """A sequential reader over an open binary file that hashes and counts every byte read."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._sha = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size if size is not None and size >= 0 else READ_CHUNK)
        if chunk:
            self._sha.update(chunk)
            self.count += len(chunk)
        return chunk

    def drain(self) -> None:
        """Read (and hash) whatever is left, so the digest covers the whole object."""
        while self.read(READ_CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class CorpusStore:
    """A corpus root on any fsspec filesystem, read-only; paths are relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 4) -> None:
        self.url = url.rstrip("/") or url
        self.attempts = attempts
        self.fs, root = url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/") or root
        self.is_remote = "file" not in _protocols(self.fs) and "local" not in _protocols(self.fs)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what=what, attempts=self.attempts)

    def refresh(self) -> None:
        """Forget cached listings and object infos (ETags): fsspec instances are shared and cached, and
        an object rewritten since a previous listing must be read as it is now."""
        try:
            self.fs.invalidate_cache()  # s3fs drops only the path and its parents when given a path
        except Exception:  # noqa: BLE001 - best effort
            pass

    def relative(self, path: str) -> str | None:
        stripped = self.fs._strip_protocol(path) if hasattr(self.fs, "_strip_protocol") else path
        for candidate in (stripped, path):
            prefix = self.root + "/"
            if candidate.startswith(prefix) and len(candidate) > len(prefix):
                return candidate[len(prefix):]
        return None

    def root_is_file(self) -> bool:
        try:
            return bool(self._retry(lambda: self.fs.isfile(self.root), f"stat {self.url}"))
        except (StorageReadError, FileNotFoundError):
            return False

    def listing(self) -> dict[str, int]:
        """Every object under the root: relative path -> size in bytes (directories left out)."""
        self.refresh()
        try:
            found = self._retry(lambda: self.fs.find(self.root, detail=True), f"listing {self.url}")
        except FileNotFoundError:
            return {}
        out: dict[str, int] = {}
        for name, info in found.items():
            if info.get("type") == "directory" or name.endswith("/"):
                continue
            rel = self.relative(name)
            if rel is None:
                continue
            size = info.get("size")
            out[rel] = int(size) if isinstance(size, int | float) else -1
        return out

    def refuse_symlink(self, rel: str) -> None:
        """On a local disk: SymlinkRefused (one line) when ``rel`` is, or lies under, a symbolic link
        below the root. Links are never followed: they can point outside the corpus."""
        if not self.is_remote:
            refuse_local_symlink(self.root, rel, self.url)

    def cat(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The whole object; with ``max_bytes``, at most that many bytes plus one are read (a
        caller that gets more than ``max_bytes`` refuses the object without holding it whole)."""
        self.refuse_symlink(rel)
        if max_bytes is None:
            return self._retry(lambda: self.fs.cat_file(self.path(rel)), f"reading {self.url}/{rel}")
        return self._retry(lambda: self.fs.cat_file(self.path(rel), start=0, end=max_bytes + 1),
                           f"reading {self.url}/{rel}")

    def open(self, rel: str) -> BinaryIO:
        """A sequential binary reader (remote reads go through a bounded read-ahead block)."""
        self.refuse_symlink(rel)
        path = self.path(rel)

        def do_open():
            if self.is_remote:
                try:
                    return self.fs.open(path, "rb", block_size=OPEN_BLOCK_SIZE, cache_type="readahead")
                except TypeError:  # a filesystem without these options
                    return self.fs.open(path, "rb")
            return self.fs.open(path, "rb")

        return self._retry(do_open, f"opening {self.url}/{rel}")


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
