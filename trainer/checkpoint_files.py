"""The checkpoint's file primitives, below ``trainer.checkpoint.CheckpointStore`` and ``trainer.run_lock``:
the exceptions a damaged or foreign checkpoint raises, the bounded readers (``parse_json_bounded``,
``check_step``, ``safetensors_header``), atomic local writes (``write_local_atomic``) and the temporary files
and folders a killed process may leave (``temp_name``, ``clean_stale_temp``). See ``trainer.checkpoint`` for
what they guarantee together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import uuid
from typing import Any

from storage_schemas.limits import MAX_JSON_DEPTH, json_depth_exceeds
from storage_schemas.retry import with_retries

#: steps are integers in [0, MAX_STEP)
MAX_STEP = 10**12
#: largest state.json accepted (a sharded checkpoint's holds the optimizer's per-parameter scalars)
MAX_STATE_BYTES = 64 << 20
#: largest latest.json / owner.json / best.json accepted
MAX_SMALL_JSON_BYTES = 1 << 20
#: largest safetensors header accepted (the safetensors library's own limit)
MAX_SAFETENSORS_HEADER = 100 << 20
#: temporary folders/files of another host (or whose process cannot be checked) are removed once this old (s)
STALE_TEMP_AGE = 6 * 3600.0
#: the prefix of every temporary folder or file the checkpoint modules make
TEMP_PREFIX = "trajflow-ckpt-"
_TEMP_NAME = re.compile(r"trajflow-ckpt-([0-9a-f]{8})-([0-9]+)-")
#: the checkpoint's messages keep the logger name they always had (``trainer.checkpoint``)
log = logging.getLogger("trainer.checkpoint")


class CheckpointCorrupt(ValueError):
    """A checkpoint file that cannot be used (missing, truncated, not what its header says, unbounded JSON,
    a bad step, sharded chunks that do not cover their tensors). ``path``: the file (or folder) named;
    ``reason``: why. Its message is one line naming the file."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, one_line(reason, 300)
        super().__init__(f"checkpoint file {path} is unusable: {self.reason}")


class CheckpointMismatch(ValueError):
    """The checkpoint's files are sound but hold another student than the live one (other tensor names,
    shapes or dtypes). One line, without the file's path: the caller names the checkpoint and the settings."""


class RunLocked(ValueError):
    """Another live run owns this ``--out`` (its ``checkpoints/owner.json``). One line naming the owner."""


def one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


# (the config redaction, ``public_config``, is in ``trainer.checkpoint``; the run lock needs this one below it)
def redact_url(url: str) -> str:
    """``url`` without credentials: ``scheme://user:pass@host/p`` -> ``scheme://***@host/p``; query strings
    (signed URLs carry their signature there) -> ``?***``."""
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    host, sep, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    out = f"{scheme}://{host}{sep}{path}"
    return out.split("?", 1)[0] + "?***" if "?" in out else out


def retry_io(fn, what: str, attempts: int = 5):
    return with_retries(fn, what=what, attempts=attempts, max_delay=4.0, error=OSError)


# -- bounded readers -----------------------------------------------------------------------------------
def parse_json_bounded(data: bytes, name: str, *, max_bytes: int = MAX_STATE_BYTES,
                       max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``data`` parsed as JSON, or :class:`CheckpointCorrupt` naming ``name``: over ``max_bytes``, not JSON,
    or nested deeper than ``max_depth`` (a 200,000-deep ``[[[`` is refused, never a RecursionError)."""
    if len(data) > max_bytes:
        raise CheckpointCorrupt(name, f"{len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise CheckpointCorrupt(name, f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise CheckpointCorrupt(name, f"not valid JSON ({one_line(e, 120)})") from None
    if json_depth_exceeds(doc, max_depth):
        raise CheckpointCorrupt(name, f"JSON nested deeper than {max_depth} levels")
    return doc


def check_step(value: Any, name: str) -> int:
    """``value`` as a step: an integer in [0, MAX_STEP); else :class:`CheckpointCorrupt` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointCorrupt(name, f"its step {one_line(repr(value), 40)} is not an integer")
    if not 0 <= value < MAX_STEP:
        raise CheckpointCorrupt(name, f"its step {value} is outside [0, {MAX_STEP})")
    return value


#: bits per element of the safetensors dtypes
_ST_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                  "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                  "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def safetensors_header(source: bytes | str, name: str) -> dict[str, Any]:
    """The header of a safetensors file (``source``: its bytes, or a local path: only the header is read),
    checked against the file: every tensor's dtype, shape and byte range consistent, the ranges tiling the
    data exactly, the file neither truncated nor padded. :class:`CheckpointCorrupt` naming ``name`` otherwise
    (what safetensors reports as "header too small" or "incomplete metadata, file not fully covered")."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[:8])
        size = len(source)
        n = struct.unpack("<Q", data)[0] if len(data) == 8 else 0
        raw = bytes(source[8:8 + n]) if len(data) == 8 and n <= MAX_SAFETENSORS_HEADER else b""
    else:
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read(8)
                n = struct.unpack("<Q", data)[0] if len(data) == 8 else 0
                raw = f.read(n) if len(data) == 8 and n <= MAX_SAFETENSORS_HEADER else b""
        except FileNotFoundError:
            raise CheckpointCorrupt(name, "missing") from None
        except OSError as e:
            raise CheckpointCorrupt(name, f"unreadable ({one_line(e, 120)})") from None
    if size < 8:
        raise CheckpointCorrupt(name, f"truncated: {size} bytes, not even the 8-byte header length")
    if n < 2 or n > MAX_SAFETENSORS_HEADER:
        raise CheckpointCorrupt(name, f"its header length {n} is impossible (file of {size} bytes)")
    if 8 + n > size:
        raise CheckpointCorrupt(name, f"truncated: a {n}-byte header in a file of {size} bytes")
    header = parse_json_bounded(raw, name, max_bytes=MAX_SAFETENSORS_HEADER, max_depth=8)
    if not isinstance(header, dict):
        raise CheckpointCorrupt(name, "its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointCorrupt(name, "its __metadata__ is not a map of strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _int_list(info.get("shape"))
                and _int_list(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
            raise CheckpointCorrupt(name, f"tensor {key!r} has a malformed header entry")
        begin, end = info["data_offsets"]
        bits = _ST_DTYPE_BITS.get(info["dtype"])
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end < begin or (bits is not None and bits % 8 == 0 and end - begin != numel * bits // 8):
            raise CheckpointCorrupt(name, f"tensor {key!r}: {info['dtype']} {info['shape']} does not match its "
                                          f"{end - begin}-byte range")
        spans.append((begin, end, key))
    spans.sort()
    at = 0
    for begin, end, key in spans:
        if begin != at:
            raise CheckpointCorrupt(name, f"tensor {key!r} starts at byte {begin} of the data, not {at} "
                                          "(overlapping or gapped ranges)")
        at = end
    data_len = size - 8 - n
    if at > data_len:
        raise CheckpointCorrupt(name, f"truncated: the tensors need {at} bytes of data, the file holds {data_len}")
    if at < data_len:
        raise CheckpointCorrupt(name, f"{data_len - at} bytes after the last tensor's data")
    return header


# -- temporary files and folders ---------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(stem: str = "") -> str:
    """A unique temporary name (``<stem>trajflow-ckpt-<host hash>-<pid>-<random>``): ``clean_stale_temp``
    recognises the host and the process that made it."""
    return f"{stem}{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``; None elsewhere): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _temp_stale(name: str, path: str, max_age: float, legacy: bool) -> bool:
    """Whether the temporary ``name`` (at ``path``) is a leftover: its process (on this host) is gone, or it
    is older than ``max_age``. ``legacy``: names without host and pid count too (age only)."""
    m = _TEMP_NAME.search(name)
    if m is None and not (legacy and name.startswith(TEMP_PREFIX)):
        return False
    if m is not None and m.group(1) == _host_tag():
        pid = int(m.group(2))
        if pid != os.getpid() and not pid_alive(pid):
            return True
    try:
        return time.time() - os.lstat(path).st_mtime > max_age
    except OSError:
        return False


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def clean_stale_temp(local_root: str | None = None, *, max_age: float = STALE_TEMP_AGE,
                     tmp_dir: str | None = None) -> list[str]:
    """Remove the temporary folders and files a killed process left: ``trajflow-ckpt-*`` in the temporary
    directory (``tmp_dir``, default ``tempfile.gettempdir()``: a remote --out's staging folders) and, below
    ``local_root`` (a local --out), the staging folders and temporary files of atomic writes. Only those
    whose process is gone (made on this host) or older than ``max_age`` seconds. Returns what was removed."""
    removed = []
    tmp_dir = tmp_dir or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp_dir):
            path = os.path.join(tmp_dir, name)
            if _temp_stale(name, path, max_age, legacy=True):
                remove_path(path)
                removed.append(path)
    if local_root and os.path.isdir(local_root):
        for top, dirs, files in os.walk(local_root):
            for name in list(dirs) + files:
                path = os.path.join(top, name)
                if _temp_stale(name, path, max_age, legacy=False):
                    remove_path(path)
                    removed.append(path)
                    if name in dirs:
                        dirs.remove(name)
    for path in removed:
        log.info("removed %s (a temporary left by a killed process)", path)
    return removed


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new_file(path: str, data: bytes) -> None:
    """``data`` written and fsynced to ``path``, which must not exist yet (``FileExistsError`` if it does)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def local_temp_file(path: str, data: bytes) -> str:
    """``data`` written and fsynced to a new temporary file next to ``path`` (the umask's permissions)."""
    folder, base = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, temp_name(f".{base}.") + ".tmp")
    try:
        write_new_file(tmp, data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_local_atomic(path: str, data: bytes) -> None:
    """Replace the local file ``path`` with ``data``: readers (and a kill at any moment) see the old file or
    the whole new one. A temporary file in the same folder, fsynced, ``os.replace``d, the folder fsynced."""
    tmp = local_temp_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def move_files_into(src: str, dest: str) -> list[str]:
    """Move every file of the local folder ``src`` into ``dest``, each fsynced then ``os.replace``d (same
    filesystem): a file appears in ``dest`` whole or not at all."""
    os.makedirs(dest, exist_ok=True)
    moved = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, os.path.join(dest, name))
        moved.append(name)
    fsync_dir(dest)
    return moved
