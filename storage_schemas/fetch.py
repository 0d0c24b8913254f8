"""Local copies of remote files (teacher weights and the like), shared by the pipeline and the trainer.

A cached copy is trusted only when its bytes still have the digest recorded when it was downloaded: each
entry ``<cache_dir>/<hash of the URL>-<name>`` has a sidecar ``<entry>.sha256.json`` (``{"sha256", "num_bytes",
"url"}``). An entry that is missing, not a regular file (a FIFO, a symlink, a device: never opened, so
never a hang), without a sidecar (written before digests existed) or whose bytes differ is downloaded
again and replaced; a directory in its place is a one-line error naming it. Entry and sidecar are each
written to a temporary name and renamed, the entry first: a crash in between leaves a pair that does not
verify, which the next fetch replaces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import uuid
from typing import Any

from fsspec.core import url_to_fs

from storage_schemas.locations import is_file_url, local_path
from storage_schemas.retry import with_retries

__all__ = ["DIGEST_SUFFIX", "CacheEntryError", "NotARegularFile", "fetch_to_local", "read_regular_file",
           "verified_entry"]

log = logging.getLogger(__name__)

#: the sidecar of a cache entry: ``<entry>`` + this suffix
DIGEST_SUFFIX = ".sha256.json"
_MAX_SIDECAR_BYTES = 64 * 1024
_CHUNK = 1 << 20


class NotARegularFile(OSError):
    """A path that is not a regular file (a FIFO, a socket, a device, a directory, a symlink): not opened."""


class CacheEntryError(OSError):
    """A cache entry that can be neither used nor replaced (a directory in its place); one line naming it."""


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path`` when it is a regular file (not followed if a symlink); else
    ``NotARegularFile``. Opened non-blocking and checked again after the open: a FIFO swapped in between
    cannot block the open or the read."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"{path} is not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, opened only if it is a regular file (``NotARegularFile`` otherwise; never
    blocks on a FIFO). ``max_bytes``: a larger file raises ValueError without being read."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{path} holds {size} bytes, more than the {max_bytes} expected")
        chunks = []
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _file_digest(path: str) -> tuple[str, int]:
    fd = _open_regular(path)
    h, n = hashlib.sha256(), 0
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def verified_entry(path: str) -> bool:
    """Whether the cache entry ``path`` is a regular file whose bytes match its sidecar's digest. A
    directory in its place raises ``CacheEntryError``; anything else that does not verify is False (with
    a warning naming the file when something is there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise CacheEntryError(f"the cache entry {path} is a directory, not a file: remove it")
    try:
        side = json.loads(read_regular_file(path + DIGEST_SUFFIX, max_bytes=_MAX_SIDECAR_BYTES))
        want = side["sha256"] if isinstance(side, dict) else None
    except FileNotFoundError:
        log.warning("cache entry %s has no digest (written before digests were kept): fetching it again", path)
        return False
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("cache entry %s: its digest %s cannot be read (%s): fetching it again", path,
                    path + DIGEST_SUFFIX, exc)
        return False
    try:
        got, _ = _file_digest(path)
    except OSError as exc:
        log.warning("cache entry %s cannot be used (%s): fetching it again", path, exc)
        return False
    if got != want:
        log.warning("cache entry %s does not match its digest (sha256 %s…, recorded %s…): fetching it again",
                    path, got[:12], str(want)[:12])
        return False
    return True


def _replace(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CacheEntryError(f"cannot write the cache entry {path}: {exc.strerror or exc}") from None


def fetch_to_local(url: str, cache_dir: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local path for ``url``: local files as they are (``file:`` URLs as the path they name, see
    ``storage_schemas.locations``), remote objects downloaded into ``cache_dir`` (named by a hash of the
    URL) and reused while their bytes match the digest recorded beside them (module docstring)."""
    if is_file_url(url):
        return local_path(url)
    fs, path = url_to_fs(url, **(storage_options or {}))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(path))
    if verified_entry(local):
        return local
    tag = f".part{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, side_tmp = local + tag, local + DIGEST_SUFFIX + tag
    try:
        with_retries(lambda: fs.get_file(path, tmp), what=f"downloading {url}")
        digest, size = _file_digest(tmp)
        with open(side_tmp, "w") as f:
            json.dump({"sha256": digest, "num_bytes": size, "url": url}, f)
        _replace(tmp, local)
        _replace(side_tmp, local + DIGEST_SUFFIX)
    finally:
        for leftover in (tmp, side_tmp):
            try:
                os.unlink(leftover)
            except OSError:
                pass
    return local
