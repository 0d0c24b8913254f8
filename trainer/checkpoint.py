"""Checkpoints on any fsspec URL: safetensors weights, optimizer via torch.save / weights_only load,
JSON trainer + data state. ``checkpoints/latest.json`` is written last: it is the commit point, so a
run killed mid-save resumes from the previous complete checkpoint.

Sharded (FSDP2) checkpoints (``trainer.fsdp``) keep the same commit protocol: the ranks write their
safetensors shards under ``step-XXXXXXXX/sharded/`` (``local_folder``), then the main process writes
rng.safetensors and state.json and commits latest.json (``commit``).

Reliability (what a kill, a second run or a damaged file can and cannot do):

- Every write is atomic: readers see the old file or the whole new one. Local disks (plain paths and
  ``file://``): a temporary file next to the target, fsynced, then ``os.replace``. Object storage: one PUT
  of the whole object (s3fs switches to a multipart upload above 100 MiB, and such an object only appears
  at ``CompleteMultipartUpload``, whole). ``local_folder(..., "w")`` commits each file the same way (local:
  written into a temporary folder, then moved into place; remote: whole-file uploads).
- Everything read back is checked before use: JSON documents are size- and depth-bounded
  (``parse_json_bounded``), steps are integers in [0, ``MAX_STEP``), safetensors files are checked against
  their own header (``safetensors_header``: a truncated or padded file, or a header that does not tile the
  data, is refused). A damaged file is a :class:`CheckpointCorrupt` naming it (one line).
- ``candidates()`` gives the committed checkpoints newest first, so a resume that finds one unusable falls
  back to the previous one (with a warning naming the file).
- A run owns its ``--out``: ``acquire_run_lock`` creates ``checkpoints/owner.json`` create-only (local: a
  hard-linked temporary file; S3: ``If-None-Match: *``). A second live run gets :class:`RunLocked`; the lock
  of a dead run (same host, process gone) or one whose heartbeat is older than ``stale_after`` is taken over.
- Temporary folders and files (``trajflow-ckpt-<host>-<pid>-...``) left by a killed process are removed at
  the next start (``clean_stale_temp``: their process is gone, or they are older than ``STALE_TEMP_AGE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
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
from collections.abc import Iterator
from typing import Any

import torch
from fsspec.core import url_to_fs
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage_schemas.limits import MAX_JSON_DEPTH, json_depth_exceeds
from storage_schemas.retry import with_retries

LATEST = "checkpoints/latest.json"
#: the run lock: who owns this --out (created create-only; see ``CheckpointStore.acquire_run_lock``)
OWNER = "checkpoints/owner.json"
#: a checkpoint's folder under out (8 digits; more once a run passes 10**8 steps)
_STEP_DIR = re.compile(r"checkpoints/step-([0-9]{8,12})")
#: steps are integers in [0, MAX_STEP)
MAX_STEP = 10**12
#: largest state.json accepted (a sharded checkpoint's holds the optimizer's per-parameter scalars)
MAX_STATE_BYTES = 64 << 20
#: largest latest.json / owner.json / best.json accepted
MAX_SMALL_JSON_BYTES = 1 << 20
#: largest safetensors header accepted (the safetensors library's own limit)
MAX_SAFETENSORS_HEADER = 100 << 20
#: a run lock whose heartbeat is older than this (seconds) is stale, unless its process is alive on this host
LOCK_STALE_AFTER = 600.0
#: temporary folders/files of another host (or whose process cannot be checked) are removed once this old (s)
STALE_TEMP_AGE = 6 * 3600.0
#: the prefix of every temporary folder or file this module makes
TEMP_PREFIX = "trajflow-ckpt-"
_TEMP_NAME = re.compile(r"trajflow-ckpt-([0-9a-f]{8})-([0-9]+)-")
log = logging.getLogger(__name__)


class CheckpointCorrupt(ValueError):
    """A checkpoint file that cannot be used (missing, truncated, not what its header says, unbounded JSON,
    a bad step, sharded chunks that do not cover their tensors). ``path``: the file (or folder) named;
    ``reason``: why. Its message is one line naming the file."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, _one_line(reason, 300)
        super().__init__(f"checkpoint file {path} is unusable: {self.reason}")


class CheckpointMismatch(ValueError):
    """The checkpoint's files are sound but hold another student than the live one (other tensor names,
    shapes or dtypes). One line, without the file's path: the caller names the checkpoint and the settings."""


class RunLocked(ValueError):
    """Another live run owns this ``--out`` (its ``checkpoints/owner.json``). One line naming the owner."""


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


#: config keys never written at rest (checkpoints, logs, exports): storage options carry credentials
SECRET_KEYS = frozenset({"storage_options"})
#: key names that look like credentials, at any depth (compared lower-case, as substrings)
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "token", "credential", "api_key", "apikey", "access_key",
                     "private_key", "session_key", "auth")


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


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run config safe to keep at rest (state.json, TensorBoard hparams, student files): no storage options,
    no credential-like keys at any depth, URLs without user info or query strings. Resume takes the
    secrets again from the flags and the environment."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()
                    if not any(w in str(k).lower() for w in _CREDENTIAL_WORDS)}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return redact_url(v) if isinstance(v, str) else v

    return {k: clean(v) for k, v in config.items() if k not in SECRET_KEYS}


def _retry(fn, what: str, attempts: int = 5):
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
        raise CheckpointCorrupt(name, f"not valid JSON ({_one_line(e, 120)})") from None
    if json_depth_exceeds(doc, max_depth):
        raise CheckpointCorrupt(name, f"JSON nested deeper than {max_depth} levels")
    return doc


def check_step(value: Any, name: str) -> int:
    """``value`` as a step: an integer in [0, MAX_STEP); else :class:`CheckpointCorrupt` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointCorrupt(name, f"its step {_one_line(repr(value), 40)} is not an integer")
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
            raise CheckpointCorrupt(name, f"unreadable ({_one_line(e, 120)})") from None
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


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pid_start(pid: int) -> str | None:
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
        if pid != os.getpid() and not _pid_alive(pid):
            return True
    try:
        return time.time() - os.lstat(path).st_mtime > max_age
    except OSError:
        return False


def _remove(path: str) -> None:
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
                _remove(path)
                removed.append(path)
    if local_root and os.path.isdir(local_root):
        for top, dirs, files in os.walk(local_root):
            for name in list(dirs) + files:
                path = os.path.join(top, name)
                if _temp_stale(name, path, max_age, legacy=False):
                    _remove(path)
                    removed.append(path)
                    if name in dirs:
                        dirs.remove(name)
    for path in removed:
        log.info("removed %s (a temporary left by a killed process)", path)
    return removed


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local_temp_file(path: str, data: bytes) -> str:
    """``data`` written and fsynced to a new temporary file next to ``path`` (the umask's permissions)."""
    folder, base = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, temp_name(f".{base}.") + ".tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_local_atomic(path: str, data: bytes) -> None:
    """Replace the local file ``path`` with ``data``: readers (and a kill at any moment) see the old file or
    the whole new one. A temporary file in the same folder, fsynced, ``os.replace``d, the folder fsynced."""
    tmp = _local_temp_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def _move_files_into(src: str, dest: str) -> list[str]:
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
    _fsync_dir(dest)
    return moved


def _precondition_failed(e: BaseException) -> bool:
    """Whether ``e`` is an object store's 412 (a conditional write whose condition did not hold)."""
    seen = 0
    while e is not None and seen < 5:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return True
        text = str(e).lower()
        if "precondition" in text or "pre-condition" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _iso(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


class CheckpointStore:
    """Reads and writes a run's checkpoints under ``out`` (an fsspec URL or a path)."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = url_to_fs(out, **(storage_options or {}))
        self.out = out
        self._cleaned = False

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def where(self, rel: str) -> str:
        """``rel`` as users see it in messages: ``<out>/<rel>``, the out without credentials."""
        return f"{redact_url(self.out).rstrip('/')}/{rel}"

    @property
    def is_local(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        return "file" in protocols or "local" in protocols

    # -- bytes ------------------------------------------------------------------------------------
    def write(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` atomically: a local temporary file + ``os.replace``; one whole-object
        PUT on object storage (see the module docstring). Readers never see a part."""
        path = self._path(rel)
        if self.is_local:
            _retry(lambda: write_local_atomic(path, data), f"writing {self.where(rel)}")
            return
        _retry(lambda: self.fs.pipe_file(path, data), f"writing {self.where(rel)}")

    def check_writable(self) -> None:
        """Write and delete a probe object under ``checkpoints/`` so that an unwritable ``--out`` (missing bucket,
        no permission, read-only disk) fails before training starts, not at the first checkpoint."""
        rel = f"checkpoints/.write-probe-{uuid.uuid4().hex}"
        try:
            self.write(rel, b"")
            self.fs.rm_file(self._path(rel))
        except Exception as e:  # noqa: BLE001 - any failure to write is the same answer
            detail = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"the run's --out {redact_url(self.out)} is not writable ({detail}); fix the location or "
                             "its permissions before training") from None

    def read(self, rel: str) -> bytes:
        return _retry(lambda: self.fs.cat_file(self._path(rel)), f"reading {self.where(rel)}")

    def _read_capped(self, rel: str, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes of ``rel`` (a longer object is refused without reading it all)."""
        return _retry(lambda: self.fs.cat_file(self._path(rel), start=0, end=max_bytes + 1),
                      f"reading {self.where(rel)}")

    def exists(self, rel: str) -> bool:
        try:
            self.fs.invalidate_cache(self._path(rel))
        except Exception:  # noqa: BLE001
            pass
        return bool(_retry(lambda: self.fs.exists(self._path(rel)), f"checking {self.where(rel)}"))

    def clear(self, rel: str) -> None:
        """Remove the folder (or file) ``rel`` and everything below it; nothing if it does not exist. For a
        checkpoint folder about to be written again (a fallback resume re-saves steps it had passed: a larger
        world's shard files must not stay beside a smaller one's)."""
        path = self._path(rel)
        if self.is_local:
            _remove(path)
            return
        with contextlib.suppress(FileNotFoundError):
            _retry(lambda: self.fs.rm(path, recursive=True), f"removing {self.where(rel)}")
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    # -- checked reads ------------------------------------------------------------------------------
    def read_json(self, rel: str, *, max_bytes: int = MAX_STATE_BYTES) -> Any:
        """The JSON document ``rel``, size- and depth-bounded; :class:`CheckpointCorrupt` naming it when it is
        missing, too large, not JSON or nested too deep."""
        try:
            data = self._read_capped(rel, max_bytes)
        except FileNotFoundError:
            raise CheckpointCorrupt(self.where(rel), "missing") from None
        return parse_json_bounded(data, self.where(rel), max_bytes=max_bytes)

    def read_weights(self, rel: str) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file ``rel`` (best weights, rng, a full checkpoint's weights), its
        header checked against its bytes; :class:`CheckpointCorrupt` naming it when it is missing, empty,
        truncated or malformed."""
        try:
            data = self.read(rel)
        except FileNotFoundError:
            raise CheckpointCorrupt(self.where(rel), "missing") from None
        safetensors_header(data, self.where(rel))
        try:
            return st_load(data)
        except Exception as e:  # noqa: BLE001 - what the header check cannot see (e.g. an unknown dtype)
            raise CheckpointCorrupt(self.where(rel), _one_line(e, 160)) from None

    def _read_torch(self, rel: str) -> Any:
        try:
            data = self.read(rel)
        except FileNotFoundError:
            raise CheckpointCorrupt(self.where(rel), "missing") from None
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, forged content: the file is unusable
            raise CheckpointCorrupt(self.where(rel), f"not a loadable optimizer state ({_one_line(e, 120)})") from None

    def read_state(self, rel: str) -> dict[str, Any]:
        """The checked ``state.json`` of the checkpoint folder ``rel`` (``checkpoints/step-NNNNNNNN``): a bounded
        JSON object whose step is an integer in [0, MAX_STEP) equal to the folder's. CheckpointCorrupt else."""
        m = _STEP_DIR.fullmatch(rel)
        name = self.where(f"{rel}/state.json")
        if m is None:
            raise CheckpointCorrupt(name, f"{rel!r} is not a checkpoint folder (checkpoints/step-NNNNNNNN)")
        state = self.read_json(f"{rel}/state.json")
        if not isinstance(state, dict):
            raise CheckpointCorrupt(name, "not a JSON object")
        step = check_step(state.get("step"), name)
        if step != int(m.group(1)):
            raise CheckpointCorrupt(name, f"its step {step} is not its folder's ({rel})")
        for key in ("extra", "extra_optimizers"):
            names = state.get(key, [])
            if not (isinstance(names, list) and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", n)
                                                    and ".." not in n for n in names)):
                raise CheckpointCorrupt(name, f"its {key!r} is not a list of part names")
        return state

    # -- writing checkpoints --------------------------------------------------------------------------
    def _clean_once(self) -> None:
        if not self._cleaned:
            self._cleaned = True
            self.clean_stale_temp()

    def clean_stale_temp(self, max_age: float = STALE_TEMP_AGE) -> list[str]:
        """``clean_stale_temp`` for this store: the temporary directory, and the out itself when it is local.
        Also done once per process by the first ``local_folder``."""
        return clean_stale_temp(self.root if self.is_local else None, max_age=max_age)

    @contextlib.contextmanager
    def local_folder(self, rel: str, mode: str):
        """A local directory standing for the folder ``rel``. Mode "r": the folder itself for a local ``out``, else
        a temporary copy of its files. Mode "w": an empty temporary directory whose files, when the block ends
        without an error, are committed into ``rel`` one by one, each whole (local: fsynced and ``os.replace``d
        from a staging folder next to ``rel``; remote: whole-file uploads); an error leaves ``rel`` untouched.
        Staging folders are named ``trajflow-ckpt-<host>-<pid>-...``; one a killed process left is removed by the
        next process's first ``local_folder`` (``clean_stale_temp``)."""
        if mode not in ("r", "w"):
            raise ValueError(f"local_folder mode must be 'r' or 'w', not {mode!r}")
        self._clean_once()
        if self.is_local:
            path = self._path(rel).rstrip("/")
            if mode == "r":
                yield path
                return
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            stage = os.path.join(parent, temp_name("."))
            os.makedirs(stage)
            try:
                yield stage
                _move_files_into(stage, path)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            return
        stage = tempfile.mkdtemp(prefix=temp_name())
        try:
            if mode == "r":
                for remote, base in self._remote_files(rel):
                    local_path = os.path.join(stage, base)
                    _retry(lambda r=remote, lp=local_path: self.fs.get_file(r, lp), f"reading {self.where(f'{rel}/{base}')}")
            yield stage
            if mode == "w":
                for base in sorted(os.listdir(stage)):
                    local_path = os.path.join(stage, base)
                    if os.path.isfile(local_path) and not os.path.islink(local_path):
                        _retry(lambda lp=local_path, b=base: self.fs.put_file(lp, self._path(f"{rel}/{b}")),
                               f"writing {self.where(f'{rel}/{base}')}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _remote_files(self, rel: str) -> list[tuple[str, str]]:
        """(object path, base name) of the files directly under the remote folder ``rel``; [] if there is none."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self._path(rel))
        try:
            entries = _retry(lambda: self.fs.ls(self._path(rel), detail=True), f"listing {self.where(rel)}")
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/")
            base = name.rsplit("/", 1)[-1]
            if e.get("type") == "file" and base and TEMP_PREFIX not in base and base not in (".", ".."):
                out.append((name, base))
        return sorted(out, key=lambda x: x[1])

    def commit(self, step: int, rel: str, *, rng: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
        """Finish a checkpoint whose weights are already under ``rel`` (a sharded one): rng.safetensors, then
        state.json (the completeness mark), then latest.json (the commit point). Each write atomic."""
        check_step(step, f"step of {self.where(rel)}")
        self.write(f"{rel}/rng.safetensors", st_save(rng))
        self.write(f"{rel}/state.json", json.dumps({**state, "step": step}, indent=2).encode())
        self.write(LATEST, json.dumps({"step": step, "path": rel}).encode())
        return f"{self.out}/{rel}"

    # -- the checkpoint -------------------------------------------------------------------------
    def save(self, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
             optimizer: dict[str, Any], state: dict[str, Any], net_config: dict[str, Any],
             extra: dict[str, dict[str, torch.Tensor]] | None = None,
             extra_optimizers: dict[str, dict[str, Any]] | None = None) -> str:
        """Write one checkpoint; ``extra`` modules (e.g. the discriminator) and their optimizers go alongside.
        Each file is written atomically; state.json then latest.json last."""
        check_step(step, f"step of {self.where(LATEST)}")
        rel = f"checkpoints/step-{step:08d}"
        meta = {"net_config": json.dumps(net_config)}
        extra, extra_optimizers = extra or {}, extra_optimizers or {}
        for name, sd in extra.items():
            self.write(f"{rel}/extra-{name}.safetensors", st_save({k: v.detach().cpu().contiguous() for k, v in sd.items()}))
        for name, sd in extra_optimizers.items():
            buf = io.BytesIO()
            torch.save(sd, buf)
            self.write(f"{rel}/extra-{name}-optimizer.pt", buf.getvalue())
        self.write(f"{rel}/model.safetensors", st_save({k: v.detach().cpu().contiguous() for k, v in model.items()}, meta))
        if ema is not None:
            self.write(f"{rel}/ema.safetensors", st_save({k: v.detach().cpu().contiguous() for k, v in ema.items()}, meta))
        buf = io.BytesIO()
        torch.save(optimizer, buf)
        self.write(f"{rel}/optimizer.pt", buf.getvalue())
        self.write(f"{rel}/rng.safetensors", st_save({"torch_cpu": torch.get_rng_state()}))
        self.write(f"{rel}/state.json", json.dumps({**state, "step": step, "extra": sorted(extra),
                                                    "extra_optimizers": sorted(extra_optimizers)}, indent=2).encode())
        self.write(LATEST, json.dumps({"step": step, "path": rel}).encode())  # the commit point
        return f"{self.out}/{rel}"

    # -- which checkpoint to resume -----------------------------------------------------------------
    def _committed_point(self) -> tuple[dict[str, Any] | None, str | None]:
        """(``{"step", "path"}`` latest.json names, None) when it is usable; (None, why not) when it exists but
        is unusable; (None, None) when there is none."""
        if not self.exists(LATEST):
            return None, None
        try:
            doc = self.read_json(LATEST, max_bytes=MAX_SMALL_JSON_BYTES)
            if not isinstance(doc, dict):
                raise CheckpointCorrupt(self.where(LATEST), "not a JSON object")
            rel = doc.get("path")
            step = check_step(doc.get("step"), self.where(LATEST))
            m = _STEP_DIR.fullmatch(rel) if isinstance(rel, str) else None
            if m is None:
                raise CheckpointCorrupt(self.where(LATEST), f"it names {_one_line(repr(rel), 80)}, not "
                                                            "checkpoints/step-NNNNNNNN")
            if int(m.group(1)) != step:
                raise CheckpointCorrupt(self.where(LATEST), f"its step {step} is not that of {rel}")
            return {"step": step, "path": rel}, None
        except CheckpointCorrupt as e:
            return None, e.reason
        except OSError as e:
            return None, _one_line(e, 200) or type(e).__name__

    def _step_folders(self) -> list[tuple[int, str]]:
        """(step, rel) of every ``checkpoints/step-*`` folder, newest first."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self._path("checkpoints"))
        try:
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(self._path("checkpoints"), detail=False)]
        except (FileNotFoundError, OSError):
            return []
        out = []
        for n in names:
            m = _STEP_DIR.fullmatch(f"checkpoints/{n}")
            if m is not None and n == f"step-{int(m.group(1)):08d}":
                out.append((int(m.group(1)), f"checkpoints/{n}"))
        return sorted(out, reverse=True)

    def candidates(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """The committed checkpoints to resume from, newest first: (``{"step", "path"}``, its checked state.json).
        First the one ``latest.json`` names, then the older complete ``checkpoints/step-*`` folders (those newer
        than the commit point were never committed). When latest.json is missing, unusable or names an unusable
        checkpoint, every complete folder counts, newest first. Each one skipped is a warning naming the file
        and why. A caller that finds a candidate's files unusable (``CheckpointCorrupt``) takes the next one."""
        point, reason = self._committed_point()
        if reason is not None:
            log.warning("%s is unusable (%s); resuming from the newest complete checkpoint", self.where(LATEST),
                        reason)
        newest = None
        if point is not None:
            try:
                yield point, self.read_state(point["path"])
                newest = point["step"]
            except CheckpointCorrupt as e:
                log.warning("%s; it was the latest checkpoint, trying the ones before it", e)
                newest = point["step"]
            except OSError as e:
                log.warning("%s/state.json is unreadable (%s); trying the checkpoints before it",
                            self.where(point["path"]), _one_line(e, 200))
                newest = point["step"]
        for step, rel in self._step_folders():
            if newest is not None and step >= newest:
                continue
            try:
                state = self.read_state(rel)
            except CheckpointCorrupt as e:
                if e.reason == "missing":
                    log.warning("%s is incomplete (no state.json); skipped", self.where(rel))
                else:
                    log.warning("%s; skipped", e)
                continue
            except OSError as e:
                log.warning("%s/state.json is unreadable (%s); skipped", self.where(rel), _one_line(e, 200))
                continue
            yield {"step": step, "path": rel}, state

    def latest(self) -> dict[str, Any] | None:
        """``{"step", "path"}`` of the checkpoint to resume from: the first of ``candidates()`` (the one
        ``latest.json`` names when it is usable and names a complete checkpoint; else the newest complete
        ``checkpoints/step-*``, with a warning); None when there is none."""
        for point, _ in self.candidates():
            return point
        return None

    def load(self, rel: str) -> dict[str, Any]:
        """A full (DDP) checkpoint: its model, optimizer, state, rng, extras and EMA, each file checked
        (:class:`CheckpointCorrupt` naming the first unusable one: the caller may fall back to an older one)."""
        state = self.read_state(rel)
        out: dict[str, Any] = {
            "model": self.read_weights(f"{rel}/model.safetensors"),
            "optimizer": self._read_torch(f"{rel}/optimizer.pt"),
            "state": state,
            "rng": self.read_weights(f"{rel}/rng.safetensors"),
        }
        out["extra"] = {n: self.read_weights(f"{rel}/extra-{n}.safetensors") for n in state.get("extra", [])}
        out["extra_optimizers"] = {n: self._read_torch(f"{rel}/extra-{n}-optimizer.pt")
                                   for n in state.get("extra_optimizers", [])}
        out["ema"] = self.read_weights(f"{rel}/ema.safetensors") if self.exists(f"{rel}/ema.safetensors") else None
        return out

    #: the full (DDP) format's loader (``load``), by the name the sharded one pairs with
    load_full = load

    # -- the run lock ---------------------------------------------------------------------------------
    def acquire_run_lock(self, *, stale_after: float = LOCK_STALE_AFTER, run_id: str | None = None) -> RunLock:
        """Make this process the owner of ``out`` (``checkpoints/owner.json``: run id, host, pid, start and
        heartbeat times), or raise :class:`RunLocked` naming the live run that owns it. A lock whose process has
        died on this host, or whose heartbeat is older than ``stale_after`` seconds (another host), is taken
        over with a warning. Call on the main process only; ``RunLock.refresh`` at each checkpoint (or
        ``maybe_refresh`` every step) keeps it fresh, ``release`` (or the ``with`` block's end) removes it."""
        record = {"version": 1, "run_id": run_id or uuid.uuid4().hex, "host": socket.gethostname(),
                  "pid": os.getpid(), "pid_start": _pid_start(os.getpid()), "started": time.time()}
        record["heartbeat"] = record["started"]
        data = json.dumps(record, sort_keys=True).encode()
        for _ in range(6):
            created = self._owner_create(data)
            raw, doc, etag = self._owner_read()
            if doc is not None and doc.get("run_id") == record["run_id"]:  # ours (also a retried create's)
                return RunLock(self, record, raw, etag, stale_after)
            if created or raw is None:
                continue  # replaced or gone at once: look again
            why = _lock_stale(doc, stale_after)
            if why is None:
                raise RunLocked(self._locked_message(doc, stale_after))
            log.warning("taking over the run lock %s of %s: %s", self.where(OWNER), _owner_desc(doc), why)
            self._owner_swap(raw, etag, data)
        raise RunLocked(f"{redact_url(self.out)} is being claimed by other runs at the same time (the run lock "
                        f"{self.where(OWNER)} kept changing); start one run at a time on an --out")

    def _locked_message(self, doc: dict[str, Any] | None, stale_after: float) -> str:
        return (f"{redact_url(self.out)} is in use by another run ({_owner_desc(doc)}); wait for it to finish or "
                f"train into another --out (its lock {self.where(OWNER)} is taken over once that process has ended "
                f"on its host, or its heartbeat is over {stale_after:.0f} s old)")

    def _owner_read(self) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
        """(raw bytes, parsed record or None when unusable, ETag on object storage) of owner.json; (None, None,
        None) when there is none."""
        path = self._path(OWNER)
        etag = None
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    raw = f.read(MAX_SMALL_JSON_BYTES + 1)
            else:
                for _ in range(3):  # the ETag of exactly the bytes read
                    with contextlib.suppress(Exception):
                        self.fs.invalidate_cache(path)
                    etag = _retry(lambda: self.fs.info(path), f"reading {self.where(OWNER)}").get("ETag")
                    raw = self._read_capped(OWNER, MAX_SMALL_JSON_BYTES)
                    with contextlib.suppress(Exception):
                        self.fs.invalidate_cache(path)
                    if _retry(lambda: self.fs.info(path), f"reading {self.where(OWNER)}").get("ETag") == etag:
                        break
        except FileNotFoundError:
            return None, None, None
        try:
            doc = parse_json_bounded(raw, self.where(OWNER), max_bytes=MAX_SMALL_JSON_BYTES)
        except CheckpointCorrupt:
            doc = None
        return raw, doc if isinstance(doc, dict) else None, etag

    def _owner_create(self, data: bytes) -> bool:
        """Create owner.json holding ``data`` only if there is none: True if this call created it."""
        path = self._path(OWNER)
        if self.is_local:
            def create() -> bool:
                tmp = _local_temp_file(path, data)
                try:
                    try:
                        os.link(tmp, path)  # appears whole, or fails if the name exists
                    except FileExistsError:
                        return False
                    except OSError:  # no hard links here (some FUSE/SMB mounts): an exclusive create
                        try:
                            with open(path, "xb") as f:
                                f.write(data)
                                f.flush()
                                os.fsync(f.fileno())
                        except FileExistsError:
                            return False
                    _fsync_dir(os.path.dirname(path))
                    return True
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            return _retry(create, f"creating {self.where(OWNER)}")

        def create_remote() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
            except FileExistsError:
                return False
            except TypeError:  # a filesystem without conditional writes: best effort
                log.warning("%s has no create-only writes; the run lock is checked, then written", type(self.fs).__name__)
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            except OSError as e:
                if _precondition_failed(e):
                    return False
                raise
            return True
        created = _retry(create_remote, f"creating {self.where(OWNER)}")
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return created

    def _owner_swap(self, expect: bytes, etag: str | None, data: bytes) -> bool:
        """Replace owner.json by ``data`` only if it still holds ``expect`` (a stale lock being taken over).
        S3: a PUT with ``If-Match: <etag>``. Local: the record is renamed aside and compared; a record that
        changed meanwhile is put back (a third run could create one in that instant: the later ``refresh`` of
        one of the two then fails). True if this call replaced it."""
        path = self._path(OWNER)
        if not self.is_local:
            def swap() -> bool:
                try:
                    if etag is None:
                        raise TypeError("no ETag")
                    self.fs.pipe_file(path, data, IfMatch=etag)
                except TypeError:  # no conditional replace: delete, then create-only
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
                    return self._owner_create(data)
                except OSError as e:
                    if _precondition_failed(e):
                        return False
                    raise
                return True
            done = _retry(swap, f"taking over {self.where(OWNER)}")
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache(path)
            return done
        aside = os.path.join(os.path.dirname(path), temp_name(".owner.") + ".stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return self._owner_create(data)
        try:
            with open(aside, "rb") as f:
                moved = f.read(MAX_SMALL_JSON_BYTES + 1)
            if moved != expect:  # a fresh record: not ours to take; put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)
        return self._owner_create(data)

    def _owner_put(self, data: bytes, etag: str | None) -> str | None:
        """Overwrite owner.json (the owner's heartbeat); S3: only if its ETag is still ``etag``. Returns the new
        ETag; raises FileExistsError when the condition failed (another run replaced it)."""
        path = self._path(OWNER)
        if self.is_local:
            _retry(lambda: write_local_atomic(path, data), f"writing {self.where(OWNER)}")
            return None

        def put():
            try:
                out = self.fs.pipe_file(path, data, **({"IfMatch": etag} if etag else {}))
            except OSError as e:
                if _precondition_failed(e):
                    raise FileExistsError(str(e)) from None
                raise
            return out.get("ETag") if isinstance(out, dict) else None
        try:
            new = _retry(put, f"writing {self.where(OWNER)}")
        except OSError as e:  # with_retries wraps permanent errors: unwrap the failed condition
            if isinstance(e.__cause__, FileExistsError):
                raise e.__cause__ from None
            raise
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return new

    def _owner_remove(self) -> None:
        path = self._path(OWNER)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with contextlib.suppress(FileNotFoundError):
            _retry(lambda: self.fs.rm_file(path), f"removing {self.where(OWNER)}")
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)


def _owner_desc(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "an unreadable owner record"
    hb = doc.get("heartbeat")
    age = f"{time.time() - hb:.0f} s ago" if isinstance(hb, (int, float)) and not isinstance(hb, bool) else "never"
    return (f"run {_one_line(doc.get('run_id'), 40)} on host {_one_line(doc.get('host'), 80)}, pid "
            f"{_one_line(doc.get('pid'), 20)}, started {_iso(doc.get('started'))}, last heartbeat {age}")


def _lock_stale(doc: dict[str, Any] | None, stale_after: float) -> str | None:
    """Why the owner record ``doc`` no longer holds (None: its run is alive, or may be)."""
    if doc is None:
        return "its owner record is unreadable"
    pid, hb = doc.get("pid"), doc.get("heartbeat")
    if doc.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        if pid == os.getpid():
            return "it was left by this process"
        if not _pid_alive(pid):
            return f"its process {pid} has ended"
        start = doc.get("pid_start")
        if start is not None and _pid_start(pid) not in (None, start):
            return f"its process {pid} has ended (the pid is now another process's)"
        return None  # alive on this host: never stale, however old its heartbeat
    if isinstance(hb, bool) or not isinstance(hb, (int, float)):
        return "it has no heartbeat"
    age = time.time() - hb
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old (over {stale_after:.0f} s)"
    return None


class RunLock:
    """This process's ownership of a run's ``out`` (``CheckpointStore.acquire_run_lock``). ``refresh`` rewrites
    the heartbeat (and raises :class:`RunLocked` if another run has taken the lock over meanwhile); ``release``
    removes the record if it is still this run's. A context manager: ``with store.acquire_run_lock(): ...``.

    Races (documented, not prevented): on a local disk ``refresh`` checks then replaces the record, so a run that
    takes over a lock it judged stale in between is overwritten, and the next ``refresh`` of one of the two
    fails; on S3 both the take-over and the refresh are conditional (``If-Match``) and exact."""

    def __init__(self, store: CheckpointStore, record: dict[str, Any], raw: bytes | None, etag: str | None,
                 stale_after: float):
        self.store, self.record, self.stale_after = store, dict(record), stale_after
        self._etag = etag
        self._last = time.monotonic()
        self.released = False

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def refresh(self) -> None:
        """Rewrite the heartbeat; :class:`RunLocked` if the record is no longer this run's."""
        if self.released:
            return
        raw, doc, etag = self.store._owner_read()
        if doc is None or doc.get("run_id") != self.run_id:
            self.released = True
            raise RunLocked(f"the run lock {self.store.where(OWNER)} was taken over by "
                            f"{_owner_desc(doc) if raw is not None else 'nobody (it was removed)'}; this run stops "
                            "so that two runs never write one --out")
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record, sort_keys=True).encode()
        try:
            self._etag = self.store._owner_put(data, etag)
        except FileExistsError:
            raw, doc, _ = self.store._owner_read()
            if doc is None or doc.get("run_id") != self.run_id:
                self.released = True
                raise RunLocked(f"the run lock {self.store.where(OWNER)} was taken over by {_owner_desc(doc)}; "
                                "this run stops so that two runs never write one --out") from None
        self._last = time.monotonic()

    def maybe_refresh(self) -> None:
        """``refresh`` when a quarter of ``stale_after`` has passed since the last one (cheap: call every step)."""
        if time.monotonic() - self._last >= self.stale_after / 4:
            self.refresh()

    def release(self) -> None:
        """Remove the record if it is still this run's (idempotent)."""
        if self.released:
            return
        self.released = True
        _, doc, _ = self.store._owner_read()
        if doc is not None and doc.get("run_id") == self.run_id:
            self.store._owner_remove()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
