"""The Teacher protocol: what every velocity field in trajflow looks like from the outside.

A teacher maps a batch of states on the rectified-flow path to velocities:

    v = teacher.velocity(x_BX, sigma_B, cond, guidance)      # v_BX, same shape as x_BX

with the conventions of ``docs/math.md``: sigma in [0, 1], sigma = 1 is noise, x_sigma =
(1 - sigma) x0 + sigma eps and v = eps - x0. ``cond`` is a batch of conditions (class ids as a
long tensor [B], prompt embeddings, or ``None`` for unconditional teachers). ``guidance`` is the
classifier-free-guidance weight w (scalar or [B]); w = 1 means the plain conditional velocity,
and a teacher applies CFG itself (exactly, for the analytic GMM, or by a batched cond/uncond pass
for networks: see ``flowcore.guidance``).

Teachers also describe themselves: ``config()`` is JSON data that rebuilds the teacher (written into
the dataset card) and ``fingerprint()`` a stable hash of weights + config, so a corpus records
exactly which teacher produced it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """A velocity field on the rectified-flow path (see module docstring)."""

    #: shape of one sample, without the batch dimension, e.g. (4, 8, 8) or (2,)
    sample_shape: tuple[int, ...]
    #: number of classes for class-conditional teachers, ``None`` otherwise
    num_classes: int | None

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any = None,
        guidance: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """v_BX = teacher velocity at states x_BX and noise levels sigma_B."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (kind + parameters) that rebuilds this teacher."""
        ...

    def fingerprint(self) -> str:
        """Stable sha256 hex digest of config and weights."""
        ...


def as_sigma_batch(sigma: float | torch.Tensor, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """Broadcast a scalar or [B] sigma to a [B] tensor on ``device``."""
    s = torch.as_tensor(sigma, device=device, dtype=dtype)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got {tuple(s.shape)}")
    return s


def as_guidance_batch(guidance: float | torch.Tensor, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """Broadcast a scalar or [B] guidance weight to a [B] tensor."""
    return as_sigma_batch(guidance, batch, device, dtype)


def fingerprint_of(config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 over canonical JSON of ``config`` and the raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors or {}):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
