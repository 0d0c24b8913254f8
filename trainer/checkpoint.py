"""Checkpoints on any fsspec URL: safetensors weights, optimizer via torch.save / weights_only load,
JSON trainer + data state. ``checkpoints/latest.json`` is written last: it is the commit point, so a
run killed mid-save resumes from the previous complete checkpoint.

Sharded (FSDP2) checkpoints (``trainer.fsdp``) keep the same commit protocol: the ranks write their
safetensors shards under ``step-XXXXXXXX/sharded/`` (``local_folder``), then the main process writes
rng.safetensors and state.json and commits latest.json (``commit``)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from typing import Any

import torch
from fsspec.core import url_to_fs
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage_schemas.retry import with_retries

LATEST = "checkpoints/latest.json"
#: a checkpoint's folder under out
_STEP_DIR = re.compile(r"checkpoints/step-[0-9]{8}")
log = logging.getLogger(__name__)

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


class CheckpointStore:
    """Reads and writes a run's checkpoints under ``out`` (an fsspec URL or a path)."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = url_to_fs(out, **(storage_options or {}))
        self.out = out

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "file" in protocols:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        _retry(lambda: self.fs.pipe_file(path, data), f"writing {self.out}/{rel}")

    def check_writable(self) -> None:
        """Write and delete a probe object under ``checkpoints/`` so that an unwritable ``--out`` (missing bucket,
        no permission, read-only disk) fails before training starts, not at the first checkpoint."""
        import uuid

        rel = f"checkpoints/.write-probe-{uuid.uuid4().hex}"
        try:
            self.write(rel, b"")
            self.fs.rm_file(self._path(rel))
        except Exception as e:  # noqa: BLE001 - any failure to write is the same answer
            detail = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"the run's --out {redact_url(self.out)} is not writable ({detail}); fix the location or "
                             "its permissions before training") from None

    def read(self, rel: str) -> bytes:
        return _retry(lambda: self.fs.cat_file(self._path(rel)), f"reading {self.out}/{rel}")

    def exists(self, rel: str) -> bool:
        try:
            self.fs.invalidate_cache(self._path(rel))
        except Exception:  # noqa: BLE001
            pass
        return bool(_retry(lambda: self.fs.exists(self._path(rel)), f"checking {self.out}/{rel}"))

    @property
    def is_local(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        return "file" in protocols or "local" in protocols

    @contextlib.contextmanager
    def local_folder(self, rel: str, mode: str):
        """A local directory standing for the folder ``rel`` (the folder itself for a local ``out``): mode "w"
        uploads the files written into it on exit (remote ``out``: from a temporary directory), mode "r"
        downloads the folder's files first."""
        if self.is_local:
            path = self._path(rel)
            if mode == "w":
                os.makedirs(path, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="trajflow-ckpt-") as tmp:
            if mode == "r":
                for name in _retry(lambda: self.fs.ls(self._path(rel), detail=False), f"listing {self.out}/{rel}"):
                    base = str(name).rstrip("/").rsplit("/", 1)[-1]
                    with open(os.path.join(tmp, base), "wb") as f:
                        f.write(self.read(f"{rel}/{base}"))
            yield tmp
            if mode == "w":
                for base in sorted(os.listdir(tmp)):
                    with open(os.path.join(tmp, base), "rb") as f:
                        self.write(f"{rel}/{base}", f.read())

    def commit(self, step: int, rel: str, *, rng: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
        """Finish a checkpoint whose weights are already under ``rel`` (a sharded one): rng.safetensors, then
        state.json (the completeness mark), then latest.json (the commit point)."""
        self.write(f"{rel}/rng.safetensors", st_save(rng))
        self.write(f"{rel}/state.json", json.dumps({**state, "step": step}, indent=2).encode())
        self.write(LATEST, json.dumps({"step": step, "path": rel}).encode())
        return f"{self.out}/{rel}"

    # -- the checkpoint -------------------------------------------------------------------------
    def save(self, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
             optimizer: dict[str, Any], state: dict[str, Any], net_config: dict[str, Any],
             extra: dict[str, dict[str, torch.Tensor]] | None = None,
             extra_optimizers: dict[str, dict[str, Any]] | None = None) -> str:
        """Write one checkpoint; ``extra`` modules (e.g. the discriminator) and their optimizers go alongside."""
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

    def _complete(self, rel: str) -> bool:
        """Whether ``rel`` holds a complete checkpoint: its state.json (written after every other file) parses."""
        try:
            return isinstance(json.loads(self.read(f"{rel}/state.json")), dict)
        except (OSError, ValueError):
            return False

    def latest(self) -> dict[str, Any] | None:
        """``{"step", "path"}`` of the checkpoint to resume from: the one ``latest.json`` names when it is readable
        and names a complete checkpoint; else (missing, unreadable, corrupt or dangling) the newest complete
        ``checkpoints/step-*`` (a warning says so); None when there is none."""
        reason = None
        if self.exists(LATEST):
            try:
                doc = json.loads(self.read(LATEST))
                rel, step = doc["path"], int(doc["step"])
                if not (isinstance(rel, str) and _STEP_DIR.fullmatch(rel)):
                    raise ValueError(f"it names {rel!r}, not checkpoints/step-NNNNNNNN")
                if self._complete(rel):
                    return {"step": step, "path": rel}
                reason = f"it names {rel}, which is incomplete"
            except (OSError, ValueError, TypeError, KeyError) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
        found = self._newest_complete()
        if reason is not None:
            log.warning("%s/%s is unusable (%s); resuming from %s", self.out, LATEST, reason,
                        found["path"] if found else "nothing (no complete checkpoint)")
        return found

    def _newest_complete(self) -> dict[str, Any] | None:
        try:
            names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(self._path("checkpoints"), detail=False)]
        except (FileNotFoundError, OSError):
            return None
        for name in sorted((n for n in names if _STEP_DIR.fullmatch(f"checkpoints/{n}")), reverse=True):
            if self._complete(f"checkpoints/{name}"):
                return {"step": int(name.split("-", 1)[1]), "path": f"checkpoints/{name}"}
        return None

    def load(self, rel: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": st_load(self.read(f"{rel}/model.safetensors")),
            "optimizer": torch.load(io.BytesIO(self.read(f"{rel}/optimizer.pt")), weights_only=True),
            "state": json.loads(self.read(f"{rel}/state.json")),
            "rng": st_load(self.read(f"{rel}/rng.safetensors")),
        }
        out["extra"] = {n: st_load(self.read(f"{rel}/extra-{n}.safetensors")) for n in out["state"].get("extra", [])}
        out["extra_optimizers"] = {
            n: torch.load(io.BytesIO(self.read(f"{rel}/extra-{n}-optimizer.pt")), weights_only=True)
            for n in out["state"].get("extra_optimizers", [])}
        out["ema"] = st_load(self.read(f"{rel}/ema.safetensors")) if self.exists(f"{rel}/ema.safetensors") else None
        return out
