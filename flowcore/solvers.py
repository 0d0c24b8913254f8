"""ODE solvers over an explicit sigma grid, with trajectory capture.

The probability-flow ODE of the rectified-flow path is dx/dsigma = v(x, sigma). Integrating from
sigma = 1 (noise) to sigma = 0 (data) over a grid ``sigmas`` [S+1] with Euler or Heun gives the
teacher's trajectory; ``capture_sigmas`` picks the grid points whose states are returned: these
are the *authentic* states the pipeline stores (solver states, never interpolations).

``euler_walk`` is the one Euler walk of the project: the teacher's Euler solve here, and every student's
few-step walk (OTA window starts, the adversarial judged step, the unrolled objective, validation).

Noise is drawn per sample from its own seed (``seeded_noise``), so a sample's trajectory depends
only on its seed and condition, not on which batch or worker solved it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flowcore.teacher import as_sigma_batch
from flowcore.tensors import expand_like

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SOLVERS = ("euler", "heun")


@dataclass
class Trajectory:
    """Captured states of a batch of ODE solves.

    states_BKX: [B, K, *sample_shape] states at ``sigmas`` (K captured sigmas, decreasing).
    sigmas_K: [K] float64 captured sigmas.
    """

    states_BKX: torch.Tensor
    sigmas_K: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        """[B, *sample_shape] state at the last captured sigma."""
        return self.states_BKX[:, -1]


def seeded_noise(seeds: Sequence[int], sample_shape: Sequence[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[B, *sample_shape] standard normal noise, row b drawn from a CPU generator seeded with seeds[b].

    CPU generation makes the noise identical on every machine and device.
    """
    rows = []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn(tuple(sample_shape), generator=g, dtype=torch.float32))
    if not rows:
        return torch.empty((0, *sample_shape), dtype=dtype, device=device)
    return torch.stack(rows).to(device=device, dtype=dtype)


def euler_walk(
    v: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    *,
    stop_B: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    sigma_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Euler steps ``x <- x + (s1 - s0) * v(x, sigma_B)`` over ``sigmas`` [N+1] (1 ... 0), from x_BX.

    v(x_BX, sigma_B) -> v_BX: whatever casts or autocast the caller needs belong in ``v``; the step itself is
    exactly ``x + (s1 - s0) * v(x, sigma_B)`` with s0, s1 Python floats (``float(sigmas[k])``) and
    sigma_B = ``torch.full((B,), s0, device=x.device, dtype=sigma_dtype or x.dtype)`` (x the current
    state). No ``no_grad`` here: gradients flow through every step unless the caller turns them off.

    stop_B: [B] integer steps per row, in 0..N. Given, the walk takes max(stop_B) steps and returns each
        row's state after its own stop_B steps (a row with 0 steps gets a copy of its x); None: all N
        steps, and the final state.
    on_step(k, x_BX): called after step k (0-based) with the state it reached.
    """
    B = x.shape[0]
    n = len(sigmas) - 1
    out = None
    if stop_B is not None:
        stop = stop_B.to(x.device)
        if B and (int(stop.min()) < 0 or int(stop.max()) > n):
            raise ValueError(f"stop steps must lie in 0..{n}")
        n = int(stop.max()) if B else 0
        out = x.clone()
    for k in range(n):
        s0, s1 = float(sigmas[k]), float(sigmas[k + 1])
        x = x + (s1 - s0) * v(x, torch.full((B,), s0, device=x.device, dtype=sigma_dtype or x.dtype))
        if out is not None:
            out = torch.where(expand_like(stop == k + 1, x), x, out)
        if on_step is not None:
            on_step(k, x)
    return x if out is None else out


def _capture_indices(sigmas: Sequence[float], capture_sigmas: Sequence[float] | None) -> list[int]:
    if capture_sigmas is None:
        return list(range(len(sigmas)))
    index = {float(s): i for i, s in enumerate(sigmas)}
    out = []
    for s in capture_sigmas:
        i = index.get(float(s))
        if i is None:
            # tolerate representation noise, but never interpolate: the state must be a grid point
            close = [j for j, g in enumerate(sigmas) if abs(float(g) - float(s)) <= 1e-9]
            if not close:
                raise ValueError(
                    f"capture sigma {s} is not a point of the solver grid; choose a solver step count "
                    "that is a multiple of the window count so every boundary is a solver point"
                )
            i = close[0]
        out.append(i)
    if out != sorted(out) or len(set(out)) != len(out):
        raise ValueError("capture sigmas must be distinct and in the grid's (decreasing) order")
    return out


def _check_grid(sigmas: Sequence[float]) -> None:
    if len(sigmas) < 2:
        raise ValueError("a sigma grid needs at least 2 points")
    for a, b in zip(sigmas, sigmas[1:]):
        if not b < a:
            raise ValueError(f"sigma grid must be strictly decreasing, got {a} then {b}")
    if sigmas[0] > 1.0 or sigmas[-1] < 0.0:
        raise ValueError("sigmas must lie in [0, 1]")


@torch.no_grad()
def solve(
    velocity_fn: VelocityFn,
    x_init: torch.Tensor,
    sigmas: Sequence[float],
    *,
    method: str = "euler",
    capture_sigmas: Sequence[float] | None = None,
) -> Trajectory:
    """Integrate dx/dsigma = velocity_fn(x, sigma_B) from sigmas[0] to sigmas[-1].

    x_init: [B, *X] state at sigmas[0]; sigmas: [S+1] strictly decreasing floats.
    method: "euler" (one evaluation a step) or "heun" (two, except into sigma = 0 where the
    corrector would evaluate the field at the data end; there it takes the Euler step, as
    Karras et al. and diffusers' Heun scheduler do).
    Returns states at ``capture_sigmas`` (default: every grid point), including the initial state
    if sigmas[0] is captured. Arithmetic is in x_init's dtype; use float32 for stored corpora.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {SOLVERS}")
    sigmas = [float(s) for s in sigmas]
    _check_grid(sigmas)
    capture = _capture_indices(sigmas, capture_sigmas)
    capture_set = set(capture)
    B = x_init.shape[0]
    x = x_init
    captured: list[torch.Tensor] = []
    if 0 in capture_set:
        captured.append(x)

    def keep(k: int, x_k: torch.Tensor) -> None:
        if k + 1 in capture_set:
            captured.append(x_k)

    if method == "euler":
        x = euler_walk(velocity_fn, x, sigmas, on_step=keep)
    else:  # heun
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = velocity_fn(x, as_sigma_batch(s, B, x.device, x.dtype))
            if s_next > 0:
                x_pred = x + (s_next - s) * v
                v_next = velocity_fn(x_pred, as_sigma_batch(s_next, B, x.device, x.dtype))
                x = x + (s_next - s) * 0.5 * (v + v_next)
            else:
                x = x + (s_next - s) * v
            keep(i, x)
    states = torch.stack(captured, dim=1) if captured else x.new_empty((B, 0, *x.shape[1:]))
    return Trajectory(states, torch.tensor([sigmas[i] for i in capture], dtype=torch.float64))


def teacher_velocity_fn(teacher: Any, cond: Any = None, guidance: float | torch.Tensor = 1.0) -> VelocityFn:
    """Bind a Teacher's condition and guidance into a ``velocity_fn(x, sigma_B)``."""

    def fn(x: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        return teacher.velocity(x, sigma_B, cond, guidance)

    return fn


def solve_teacher(
    teacher: Any,
    noise: torch.Tensor,
    sigmas: Sequence[float],
    *,
    cond: Any = None,
    guidance: float | torch.Tensor = 1.0,
    method: str = "euler",
    capture_sigmas: Sequence[float] | None = None,
) -> Trajectory:
    """Solve a Teacher's probability-flow ODE from ``noise`` [B, *X] with CFG weight ``guidance``."""
    return solve(
        teacher_velocity_fn(teacher, cond, guidance),
        noise,
        sigmas,
        method=method,
        capture_sigmas=capture_sigmas,
    )
