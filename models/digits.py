"""The digits testbed: a small class-conditional flow-matching teacher fitted to real images.

The images are scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1,797
images, 10 classes, shipped inside the package, no download), scaled from 0..16 to [-1, 1] and shaped
(1, 8, 8). The teacher does not model the pixels directly but a fixed, PCA-whitened code of them
(``DigitsCodec``: subtract the mean image, rotate onto the principal axes, divide each by its standard
deviation, floored at ``WHITEN_FLOOR`` of the largest; its inverse is the "decoder"), the way image
models work in an autoencoder's latent space. Why: in pixel space each class is a tight cluster far
from the noise's scale and the probability-flow trajectories are nearly straight (chord / path 0.957
at guidance 2, straighter than latent10's 0.941); in the whitened code the within-class spread is
comparable to the noise and the trajectories are curved (0.89 at guidance 2, 0.85 at 3, measured on
256 trajectories of 32 Euler steps; see docs/testbed.md). The teacher is a ``models.flownet.FlowNet`` (residual MLP, width 256, depth 3: the default
flow-net student's architecture, so ``trajflow train`` starts the student from the teacher's weights)
fitted by plain flow matching with class dropout to the null class (10% by default), so it is sampled
with classifier-free guidance like every class-conditional teacher.

SPEC: ``digits:8x8`` (the default fit budget, ``DEFAULT_FIT_STEPS``) or ``digits:8x8:fit=N`` (an N-step fit,
e.g. for tests). The fit is deterministic given its seed (0) and cached on local disk under
``$TRAJFLOW_CACHE/pretrained`` (default ``~/.cache/trajflow``) by a key over the data, the architecture and
the fit settings, written atomically (temporary file + rename), so every process (generation workers,
the trainer, the audit's replay, the pool, evaluation) reuses the same weights and the same fingerprint.

The teacher is a ``FlowNetTeacher``: the card's ``teacher.kind`` is ``"flownet"`` and its fingerprint is
a flow net's (config + weights); ``teacher.config.testbed`` and ``run.teacher_spec`` record the SPEC, from
which ``models.registry.teacher_from_config`` rebuilds it. Unlike a GMM, the data distribution is only
known through its 1,797 samples, so evaluation (``evaluation.digits``) uses a small classifier trained on
the same images for a Frechet distance and class accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import save as st_save

from models.cache import cache_root
from models.flownet import (
    META_KEY,
    FlowNet,
    FlowNetConfig,
    FlowNetTeacher,
    canonical_safetensors,
    fit_flow_net,
)
from models.spec import TeacherSpec, parse_teacher_spec

__all__ = ["DIGITS_SPEC", "DEFAULT_FIT_STEPS", "SAMPLE_SHAPE", "NUM_CLASSES", "DigitsTeacher", "digits_data",
           "digits_teacher", "digits_codes", "DigitsCodec", "digits_fit_steps", "cache_root", "is_digits_spec",
           "CACHE_DIGEST_KEY", "CacheEntryError", "cache_entry_digest", "read_cache_entry", "write_cache_entry",
           "read_cached_flow_net", "write_cached_flow_net"]

log = logging.getLogger(__name__)

DIGITS_SPEC = "digits:8x8"
TARGETS = ("8x8",)
#: the fit budget of ``digits:8x8`` (about a minute on 2 CPU cores)
DEFAULT_FIT_STEPS = 4000
#: the largest fit budget a SPEC (or a card) may ask for
MAX_FIT_STEPS = 100_000
FIT_SEED = 0
FIT_BATCH = 256
FIT_LR = 2e-3
COND_DROPOUT = 0.1
#: eigenvalue floor of the whitening, relative to the largest eigenvalue of the pixel covariance
WHITEN_FLOOR = 0.05
SAMPLE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
NET = FlowNetConfig("mlp", SAMPLE_SHAPE, NUM_CLASSES, width=256, depth=3)


def is_digits_spec(spec: str | TeacherSpec) -> bool:
    return (spec.kind if isinstance(spec, TeacherSpec) else str(spec).split(":", 1)[0]) == "digits"


def digits_fit_steps(spec: str | TeacherSpec) -> int:
    """The fit budget a digits SPEC names (``fit=N`` variant; ``DEFAULT_FIT_STEPS`` without one)."""
    s = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if s.kind != "digits" or s.target not in TARGETS:
        raise ValueError(f"not a digits testbed SPEC: {str(s)!r} (expected digits:8x8 or digits:8x8:fit=N)")
    if not s.variant:
        return DEFAULT_FIT_STEPS
    name, _, value = s.variant.partition("=")
    if name != "fit" or not value.isdigit() or not 1 <= int(value) <= MAX_FIT_STEPS:
        raise ValueError(f"bad digits SPEC variant {s.variant!r} in {str(s)!r}: expected fit=N with "
                         f"1 <= N <= {MAX_FIT_STEPS}")
    return int(value)


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] long), in scikit-learn's fixed order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 8.0 - 1.0).reshape(-1, *SAMPLE_SHAPE)
    return x.contiguous(), torch.from_numpy(np.asarray(d.target, dtype=np.int64))


class DigitsCodec:
    """The fixed PCA whitening of the 8x8 digits (code = (pixels - mean) @ W) and its inverse (decode).

    Computed in float64 from the 1,797 images; eigenvector signs are fixed (largest entry positive) so
    the code does not depend on the eigen-solver's sign choices."""

    def __init__(self, x_pixels: torch.Tensor, floor: float = WHITEN_FLOOR):
        f = x_pixels.reshape(len(x_pixels), -1).double()
        self.mean = f.mean(0)
        ev, vecs = torch.linalg.eigh(torch.cov((f - self.mean).T))
        sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True))).clamp_min(0) * 2 - 1
        vecs = vecs * sign
        scale = ev.clamp_min(floor * float(ev.max())).sqrt()
        self.enc = vecs / scale  # [64, 64]
        self.dec = (vecs * scale).T

    def encode(self, x_pixels: torch.Tensor) -> torch.Tensor:
        f = x_pixels.reshape(len(x_pixels), -1).double()
        return ((f - self.mean) @ self.enc).to(x_pixels.dtype).reshape(-1, *SAMPLE_SHAPE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes [N, 1, 8, 8] -> pixel images [N, 1, 8, 8] (about [-1, 1])."""
        f = z.reshape(len(z), -1).double()
        return (f @ self.dec + self.mean).to(z.dtype if z.dtype.is_floating_point else torch.float32) \
            .reshape(-1, *SAMPLE_SHAPE)


def digits_codes() -> tuple[torch.Tensor, torch.Tensor, DigitsCodec]:
    """(codes [1797, 1, 8, 8] float32: what the teacher models, labels, the codec)."""
    x, y = digits_data()
    codec = DigitsCodec(x)
    return codec.encode(x).float().contiguous(), y, codec


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


class DigitsTeacher(FlowNetTeacher):
    """The fitted digits flow net as a Teacher (CFG through the null class), plus the real images."""

    def __init__(self, net: FlowNet, spec: str, fit_steps: int):
        super().__init__(net, name="digits-8x8")
        self.spec, self.fit_steps = spec, fit_steps
        self._x, self._y, self.codec = digits_codes()
        self._by_class = [torch.nonzero(self._y == c).flatten() for c in range(NUM_CLASSES)]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "testbed": {"spec": self.spec, "fit_steps": self.fit_steps, "seed": FIT_SEED,
                                                "data": "sklearn.datasets.load_digits",
                                                "code": f"pca-whiten-{WHITEN_FLOOR}"}}

    def sample(self, n: int, generator: torch.Generator, cls: torch.Tensor | None = None):
        """n REAL images as codes (with their classes): of class ``cls[i]`` when given, else uniformly drawn.
        PeRFlow's real starting points."""
        if cls is None:
            idx = torch.randint(len(self._y), (n,), generator=generator)
        else:
            cls = torch.as_tensor(cls).long().reshape(n)
            idx = torch.empty(n, dtype=torch.long)
            for c in range(NUM_CLASSES):
                m = cls == c
                if m.any():
                    pool = self._by_class[c]
                    idx[m] = pool[torch.randint(len(pool), (int(m.sum()),), generator=generator)]
        return self._x[idx].clone(), self._y[idx].clone()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The teacher's samples (codes) -> pixel images in about [-1, 1]."""
        return self.codec.decode(z)


def _fit(fit_steps: int) -> FlowNet:
    x, y, _ = digits_codes()

    def sample_fn(n, g):
        idx = torch.randint(len(y), (n,), generator=g)
        return x[idx], y[idx]

    torch.manual_seed(FIT_SEED)
    net = FlowNet(NET)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float reductions on every machine (and no oversubscription)
    try:
        fit_flow_net(net, sample_fn, steps=fit_steps, batch_size=FIT_BATCH, lr=FIT_LR, cond_dropout=COND_DROPOUT,
                     seed=FIT_SEED)
    finally:
        torch.set_num_threads(threads)
    return net


# --- verified cache entries (the fitted teacher here, the evaluation classifier in evaluation.digits) ----------

#: safetensors metadata key of a cache entry's digest: sha256 over its other metadata and its tensors' bytes
CACHE_DIGEST_KEY = "trajflow_sha256"


class CacheEntryError(OSError):
    """A cache entry that can be neither used nor replaced (a directory in its place); one line naming it."""


def cache_entry_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over ``metadata`` (less ``CACHE_DIGEST_KEY``), the tensors' names, dtypes and shapes, and their
    bytes in name order: what a cache entry holds, independent of how its safetensors header is laid out."""
    h = hashlib.sha256()
    head = {"metadata": {k: v for k, v in metadata.items() if k != CACHE_DIGEST_KEY},
            "tensors": {k: [str(t.dtype), list(t.shape)] for k, t in tensors.items()}}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_cache_entry(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Write a cache entry: the tensors and ``metadata`` plus their digest (``CACHE_DIGEST_KEY``) in one
    safetensors file (canonical header), to a temporary name then renamed, so a reader sees the old entry or
    the whole new one. Returns the tensors as stored (read back from the bytes written)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**metadata, CACHE_DIGEST_KEY: cache_entry_digest(state, metadata)}
    data = canonical_safetensors(st_save(state, metadata=meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.part{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            raise CacheEntryError(f"cannot write the cache entry {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return safetensors.torch.load(data)


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symlink is not followed; opened non-blocking, so a
    FIFO swapped in cannot hang the open or the read); else OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_cache_entry(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a cache entry whose digest matches; None for a miss: no entry, or one that is
    not a regular file (a FIFO, a symlink, a device: never opened), not a safetensors file, written before
    digests were kept (no ``CACHE_DIGEST_KEY``), or changed since it was written. Every miss but an absent
    entry logs a warning naming the file; the caller fits again and rewrites it. A directory in the entry's place
    raises ``CacheEntryError`` (one line naming it)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cache entry %s cannot be used (%s): fitting it again", path, exc)
        return None
    if stat.S_ISDIR(st.st_mode):
        raise CacheEntryError(f"the cache entry {path} is a directory, not a file: remove it")
    if not stat.S_ISREG(st.st_mode):
        log.warning("cache entry %s is not a regular file (a symlink, FIFO or device): not opened; fitting it "
                    "again", path)
        return None
    try:
        data = _read_regular(path)
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("not a safetensors file (truncated header)")
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("its metadata is not a map of strings")
        if CACHE_DIGEST_KEY not in meta:
            log.warning("cache entry %s has no digest (written before digests were kept): fitting it again", path)
            return None
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # noqa: BLE001 - OSError, bad JSON, safetensors' own errors: all a miss
        log.warning("cache entry %s cannot be used (%s): fitting it again", path, " ".join(str(exc).split())[:200])
        return None
    if cache_entry_digest(tensors, meta) != meta[CACHE_DIGEST_KEY]:
        log.warning("cache entry %s does not match its digest (changed since it was written): fitting it again",
                    path)
        return None
    return tensors, meta


def _net_from_entry(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                    expect: FlowNetConfig | None) -> FlowNet | None:
    """The flow net a verified entry holds (as ``load_flow_net`` builds it), None (with a warning) when it
    is not a flow net of the ``expect``-ed architecture."""
    try:
        cfg = FlowNetConfig(**json.loads(meta[META_KEY]))
        if expect is not None and json.dumps(cfg.to_dict(), sort_keys=True) != json.dumps(expect.to_dict(),
                                                                                           sort_keys=True):
            raise ValueError(f"config {cfg.to_dict()} is not the expected {expect.to_dict()}")
        net = FlowNet(cfg)
        missing, unexpected = net.load_state_dict(dict(tensors), strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        log.warning("cache entry %s cannot be used (%s): fitting it again", path, " ".join(str(exc).split())[:200])
        return None
    return net.eval()


def read_cached_flow_net(path: str | Path, expect: FlowNetConfig | None = None) -> tuple[FlowNet, dict[str, Any]] | None:
    """(net in eval mode, extra metadata) of a cached flow net whose digest matches and whose config is
    ``expect`` (when given); None for a miss (``read_cache_entry``: the caller fits and calls
    ``write_cached_flow_net``). Builds the net as ``load_flow_net`` does (one ``FlowNet(cfg)``)."""
    entry = read_cache_entry(path)
    net = _net_from_entry(Path(path), *entry, expect) if entry is not None else None
    if net is None:
        return None
    try:
        extra = json.loads(entry[1].get("trajflow_extra", "{}"))
    except ValueError:
        extra = {}
    return net, extra


def write_cached_flow_net(path: str | Path, net: FlowNet, extra: dict[str, Any] | None = None) -> FlowNet:
    """Cache ``net`` at ``path`` (``save_flow_net``'s metadata plus the digest, written atomically) and return
    the net as every later process loads it from there (bit-identical weights)."""
    meta = {META_KEY: json.dumps(net.cfg.to_dict(), sort_keys=True),
            "trajflow_extra": json.dumps(extra or {}, sort_keys=True)}
    stored = write_cache_entry(path, net.state_dict(), meta)
    out = _net_from_entry(Path(path), stored, meta, None)
    if out is None:
        raise CacheEntryError(f"the cache entry {path} just written cannot be read back")
    return out


def cached_net_path(fit_steps: int) -> Path:
    x, y = digits_data()
    key = hashlib.sha256(json.dumps({"data": _data_digest(x, y), "code": f"pca-whiten-{WHITEN_FLOOR}", "net": asdict(NET), "steps": fit_steps,
                                     "seed": FIT_SEED, "batch": FIT_BATCH, "lr": FIT_LR,
                                     "cond_dropout": COND_DROPOUT}, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "pretrained" / f"digits8x8-{key}.safetensors"


def digits_teacher(spec: str | TeacherSpec = DIGITS_SPEC, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> DigitsTeacher:
    """The testbed teacher a digits SPEC names: loaded from the cache, or fitted (deterministically) and cached.

    The entry is used only when its digest matches (``read_cache_entry``); otherwise (changed, truncated, not
    a regular file, or written before digests were kept) the teacher is fitted again and the entry rewritten,
    so a damaged cache cannot change the teacher's fingerprint."""
    s = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    steps = digits_fit_steps(s)
    path = cached_net_path(steps)
    cached = read_cached_flow_net(path, expect=NET)
    if cached is not None:
        net = cached[0]
    else:  # what every later process loads: bit-identical weights
        net = write_cached_flow_net(path, _fit(steps), {"testbed": str(s), "fit_steps": steps, "seed": FIT_SEED})
    net = net.to(device)
    if dtype is not None:
        net = net.to(dtype)
    return DigitsTeacher(net, str(s), steps)
