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

Layout: ``trainer.checkpoint_files`` holds the exceptions, the bounded readers and the atomic / temporary file
primitives; ``trainer.run_lock`` the run lock; this module ``CheckpointStore`` and the config redaction, and
re-exports the public names of the other two.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from fsspec.core import url_to_fs
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.checkpoint_files import (
    MAX_SAFETENSORS_HEADER,
    MAX_SMALL_JSON_BYTES,
    MAX_STATE_BYTES,
    MAX_STEP,
    STALE_TEMP_AGE,
    TEMP_PREFIX,
    CheckpointCorrupt,
    CheckpointMismatch,
    RunLocked,
    check_step,
    clean_stale_temp,
    move_files_into,
    one_line,
    parse_json_bounded,
    redact_url,
    remove_path,
    retry_io,
    safetensors_header,
    temp_name,
    write_local_atomic,
)
from trainer.run_lock import LOCK_STALE_AFTER, OWNER, RunLock, RunLockMixin

__all__ = [
    "LATEST", "LOCK_STALE_AFTER", "MAX_SAFETENSORS_HEADER", "MAX_SMALL_JSON_BYTES", "MAX_STATE_BYTES", "MAX_STEP",
    "OWNER", "SECRET_KEYS", "STALE_TEMP_AGE", "TEMP_PREFIX", "CheckpointCorrupt", "CheckpointMismatch",
    "CheckpointStore", "RunLock", "RunLocked", "check_step", "clean_stale_temp", "parse_json_bounded",
    "public_config", "redact_url", "safetensors_header", "temp_name", "write_local_atomic",
]

LATEST = "checkpoints/latest.json"
#: a checkpoint's folder under out (8 digits; more once a run passes 10**8 steps)
_STEP_DIR = re.compile(r"checkpoints/step-([0-9]{8,12})")
log = logging.getLogger(__name__)

#: config keys never written at rest (checkpoints, logs, exports): storage options carry credentials
SECRET_KEYS = frozenset({"storage_options"})
#: key names that look like credentials, at any depth (compared lower-case, as substrings)
_CREDENTIAL_WORDS = ("secret", "password", "passwd", "token", "credential", "api_key", "apikey", "access_key",
                     "private_key", "session_key", "auth")


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


class CheckpointStore(RunLockMixin):
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
            retry_io(lambda: write_local_atomic(path, data), f"writing {self.where(rel)}")
            return
        retry_io(lambda: self.fs.pipe_file(path, data), f"writing {self.where(rel)}")

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
        return retry_io(lambda: self.fs.cat_file(self._path(rel)), f"reading {self.where(rel)}")

    def _read_capped(self, rel: str, max_bytes: int) -> bytes:
        """At most ``max_bytes + 1`` bytes of ``rel`` (a longer object is refused without reading it all)."""
        return retry_io(lambda: self.fs.cat_file(self._path(rel), start=0, end=max_bytes + 1),
                      f"reading {self.where(rel)}")

    def exists(self, rel: str) -> bool:
        try:
            self.fs.invalidate_cache(self._path(rel))
        except Exception:  # noqa: BLE001
            pass
        return bool(retry_io(lambda: self.fs.exists(self._path(rel)), f"checking {self.where(rel)}"))

    def clear(self, rel: str) -> None:
        """Remove the folder (or file) ``rel`` and everything below it; nothing if it does not exist. For a
        checkpoint folder about to be written again (a fallback resume re-saves steps it had passed: a larger
        world's shard files must not stay beside a smaller one's)."""
        path = self._path(rel)
        if self.is_local:
            remove_path(path)
            return
        with contextlib.suppress(FileNotFoundError):
            retry_io(lambda: self.fs.rm(path, recursive=True), f"removing {self.where(rel)}")
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
            raise CheckpointCorrupt(self.where(rel), one_line(e, 160)) from None

    def _read_torch(self, rel: str) -> Any:
        try:
            data = self.read(rel)
        except FileNotFoundError:
            raise CheckpointCorrupt(self.where(rel), "missing") from None
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, forged content: the file is unusable
            raise CheckpointCorrupt(self.where(rel), f"not a loadable optimizer state ({one_line(e, 120)})") from None

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
                move_files_into(stage, path)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            return
        stage = tempfile.mkdtemp(prefix=temp_name())
        try:
            if mode == "r":
                for remote, base in self._remote_files(rel):
                    local_path = os.path.join(stage, base)
                    retry_io(lambda r=remote, lp=local_path: self.fs.get_file(r, lp), f"reading {self.where(f'{rel}/{base}')}")
            yield stage
            if mode == "w":
                for base in sorted(os.listdir(stage)):
                    local_path = os.path.join(stage, base)
                    if os.path.isfile(local_path) and not os.path.islink(local_path):
                        retry_io(lambda lp=local_path, b=base: self.fs.put_file(lp, self._path(f"{rel}/{b}")),
                               f"writing {self.where(f'{rel}/{base}')}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _remote_files(self, rel: str) -> list[tuple[str, str]]:
        """(object path, base name) of the files directly under the remote folder ``rel``; [] if there is none."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self._path(rel))
        try:
            entries = retry_io(lambda: self.fs.ls(self._path(rel), detail=True), f"listing {self.where(rel)}")
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
                raise CheckpointCorrupt(self.where(LATEST), f"it names {one_line(repr(rel), 80)}, not "
                                                            "checkpoints/step-NNNNNNNN")
            if int(m.group(1)) != step:
                raise CheckpointCorrupt(self.where(LATEST), f"its step {step} is not that of {rel}")
            return {"step": step, "path": rel}, None
        except CheckpointCorrupt as e:
            return None, e.reason
        except OSError as e:
            return None, one_line(e, 200) or type(e).__name__

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
                            self.where(point["path"]), one_line(e, 200))
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
                log.warning("%s/state.json is unreadable (%s); skipped", self.where(rel), one_line(e, 200))
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
