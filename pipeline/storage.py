"""Object storage at the edge: fsspec URLs with retries, backoff and verified uploads.

``s3://`` goes through s3fs (endpoint and credentials from the standard AWS environment —
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... — or ``storage_options``), ``gs://`` through gcsfs if
installed, plain paths and ``file://`` through the local filesystem, ``memory://`` for tests.
Credentials are never printed: ``describe_options`` masks them for logs and errors.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from storage_schemas.limits import refuse_local_symlink
from storage_schemas.retry import is_transient  # noqa: F401 - re-exported (failed verifications are OSErrors)
from storage_schemas.retry import with_retries as _with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

_SECRET_HINTS = ("secret", "token", "password", "key", "credential")


class StorageError(RuntimeError):
    """An object-storage operation failed for good (after retries), with the object named."""


class UploadVerificationError(OSError):
    """A read-back of an uploaded object did not match what was written (transient: retried)."""


def describe_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """storage_options with every secret-looking value masked, safe to print."""

    def mask(k, v):
        if isinstance(v, dict):
            return {kk: mask(kk, vv) for kk, vv in v.items()}
        if any(h in str(k).lower() for h in _SECRET_HINTS) and "endpoint" not in str(k).lower():
            return "***"
        return v

    return {k: mask(k, v) for k, v in (options or {}).items()}


#: ``storage_schemas.retry.with_retries`` (its policy and defaults) raising :class:`StorageError` naming ``what``
with_retries = functools.partial(_with_retries, error=StorageError)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """A corpus root on any fsspec filesystem; all paths below are relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 6):
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = dict(storage_options or {})
        self.attempts = attempts
        try:
            self.fs, self.root = url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open {url!r}: {exc} (options {describe_options(storage_options)})") from None
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what=what, attempts=self.attempts)

    def _local_check(self, rel: str) -> None:
        """On a local disk, refuse a path below the root that is (or passes through) a symlink: it
        could point outside the root (read or overwritten there). A permanent error, not retried."""
        if self.is_local and rel:
            refuse_local_symlink(self.root, rel, self.url)

    def _refresh(self, rel: str = "") -> None:
        try:
            self.fs.invalidate_cache(self.path(rel))
        except Exception:  # noqa: BLE001 - cache invalidation is best effort
            pass

    # -- reads -----------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        self._refresh(rel)
        return self._retry(lambda: self._local_check(rel) or self.fs.exists(self.path(rel)),
                           f"checking {self.url}/{rel}")

    def read_bytes(self, rel: str) -> bytes:
        return self._retry(lambda: self._local_check(rel) or self.fs.cat_file(self.path(rel)),
                           f"reading {self.url}/{rel}")

    def size(self, rel: str) -> int:
        self._refresh(rel)
        return int(self._retry(lambda: self._local_check(rel) or self.fs.info(self.path(rel))["size"],
                               f"stat {self.url}/{rel}"))

    def sizes(self, rel_dir: str) -> dict[str, int]:
        """{name: size in bytes} of the files directly under ``rel_dir`` (one listing); {} when it
        does not exist. On a local disk a symlink among them is refused (StorageError)."""
        self._refresh(rel_dir)

        def ls():
            self._local_check(rel_dir)
            try:
                entries = self.fs.ls(self.path(rel_dir), detail=True)
            except FileNotFoundError:
                return {}
            out = {}
            for e in entries:
                if e.get("type") == "directory":
                    continue
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if self.is_local:
                    self._local_check(f"{rel_dir}/{name}")
                out[name] = int(e.get("size") or 0)
            return out

        return self._retry(ls, f"listing {self.url}/{rel_dir}")

    def sha256(self, rel: str, chunk: int = 8 << 20) -> str:
        """sha256 hex of a stored object, streamed (memory: one chunk)."""

        def digest():
            self._local_check(rel)
            h = hashlib.sha256()
            with self.fs.open(self.path(rel), "rb") as f:
                while True:
                    block = f.read(chunk)
                    if not block:
                        return h.hexdigest()
                    h.update(block)

        self._refresh(rel)
        return self._retry(digest, f"hashing {self.url}/{rel}")

    def list(self, rel_dir: str) -> list[str]:
        """Names (not paths) of the files directly under ``rel_dir``; [] when it does not exist."""
        self._refresh(rel_dir)

        def ls():
            try:
                entries = self.fs.ls(self.path(rel_dir), detail=True)
            except FileNotFoundError:
                return []
            return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory"]

        return sorted(self._retry(ls, f"listing {self.url}/{rel_dir}"))

    def walk_files(self) -> list[str]:
        """Every object under the root, as paths relative to it."""
        self._refresh()
        found = self._retry(lambda: self.fs.find(self.root), f"listing {self.url}")
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)

    # -- writes ----------------------------------------------------------------------------
    def _pipe(self, rel: str, data: bytes) -> None:
        full = self.path(rel)
        if self.is_local:
            self._local_check(rel)
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(full, data)

    def _local_temp(self, rel: str, data: bytes) -> str:
        """``data`` written and fsynced to a unique temporary file next to ``rel`` (local disks)."""
        self._local_check(rel)
        full = self.path(rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = f"{full}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return tmp

    def _retry_write(self, fn: Callable[[], T], what: str) -> T:
        try:
            return self._retry(fn, what)
        except FileNotFoundError as e:  # on a write this means the bucket (or mount) does not exist
            raise StorageError(f"{what} failed: the bucket or directory does not exist ({e})") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._retry_write(lambda: self._pipe(rel, data), f"writing {self.url}/{rel}")

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` so that readers see the old object or the whole new one,
        never a part: a temporary file + ``os.replace`` on local disks (a disk that fills up leaves
        the old file and no temporary), one PUT on object storage (atomic there)."""

        def write():
            if not self.is_local:
                return self.fs.pipe_file(self.path(rel), data)
            tmp = self._local_temp(rel, data)
            try:
                os.replace(tmp, self.path(rel))
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise

        self._retry_write(write, f"writing {self.url}/{rel}")

    def create_only(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if no object of that name exists: True if this call
        created it, False if one was already there (whatever its content; read it to compare).

        Object storage: a conditional PUT (``If-None-Match: *`` on S3, ``mode="create"`` in fsspec),
        so of concurrent creators exactly one wins. Local disks: the complete content goes to a
        temporary file that is then hard-linked to the name (``link`` fails if the name exists), so
        the object appears whole or not at all; where hard links are not supported, an exclusive
        create (``O_EXCL``). A retried create that finds the object made by its own lost first
        attempt also returns False: callers compare content, not who wrote it."""

        def create() -> bool:
            full = self.path(rel)
            try:
                if not self.is_local:
                    try:
                        self.fs.pipe_file(full, data, mode="create")
                    except TypeError:  # a filesystem without conditional writes: best effort
                        log.warning("%s has no create-only writes; checking %s before writing it",
                                    type(self.fs).__name__, rel)
                        if self.fs.exists(full):
                            return False
                        self.fs.pipe_file(full, data)
                    return True
                tmp = self._local_temp(rel, data)
                try:
                    try:
                        os.link(tmp, full)
                    except FileExistsError:
                        raise
                    except OSError:  # no hard links here (some FUSE/SMB mounts): exclusive create
                        with open(full, "xb") as f:
                            f.write(data)
                            f.flush()
                            os.fsync(f.fileno())
                finally:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        pass
                return True
            except FileExistsError:
                return False

        created = self._retry_write(create, f"creating {self.url}/{rel}")
        self._refresh(rel)
        return created

    def put_verified(self, rel: str, data: bytes) -> tuple[str, int]:
        """Upload ``data`` and read it back: returns (sha256, num_bytes) only once the stored object
        has exactly that size and hash. A mismatch is retried; past the retries, StorageError.

        ``data`` is hashed once; the read-back is compared with it byte for byte, which implies
        the same size and sha256 (and is much cheaper than hashing it again)."""
        data = bytes(data)
        expected = sha256_hex(data)

        def upload_and_verify():
            self._pipe(rel, data)
            self._refresh(rel)
            try:
                stored = self.fs.cat_file(self.path(rel))
            except FileNotFoundError as e:  # not yet visible (eventual consistency) or raced: upload again
                raise UploadVerificationError(f"read-back of {rel}: object missing right after upload") from e
            if stored != data:
                raise UploadVerificationError(
                    f"read-back of {rel} gave {len(stored)} bytes / sha256 {sha256_hex(stored)[:12]}, "
                    f"expected {len(data)} / {expected[:12]}"
                )

        self._retry_write(upload_and_verify, f"uploading {self.url}/{rel}")
        return expected, len(data)

    def remove(self, rel: str) -> None:
        def rm():
            self._local_check(rel)
            try:
                self.fs.rm_file(self.path(rel))
            except FileNotFoundError:
                pass

        self._retry(rm, f"removing {self.url}/{rel}")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
