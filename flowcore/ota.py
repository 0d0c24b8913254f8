"""Online trajectory alignment (FlowSteer's OTA): where a rollout's window starts, and its solver grid.

The corpus stores teacher states from fixed seeds. Online rollouts add two things:

  * ``fresh``   — new noise; the teacher solves its whole ODE on the corpus's solver grid and the
                  states at the saved sigmas form a trajectory exactly like a stored one;
  * ``student`` — the *student's own* few-step rollout (Euler on the stage's window boundaries)
                  carries new noise to window w's start; the teacher solves window w from there.
                  The student is trained at the states it actually visits at inference time.
  * ``perflow`` — the PeRFlow baseline (for ablations only): the window starts at the linear
                  interpolation (1 - sigma) x0 + sigma eps of a *real* sample x0 and noise, a state
                  the teacher never visits; the teacher solves the window from there.

Every window of a stage spans the same number of solver steps (windows are equal in unshifted time
and the solver grid is uniform in it), so per-sample window grids stack into one [B, S_w + 1] tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flowcore.solvers import euler_walk
from flowcore.tensors import expand_like

OTA_MODES = ("fresh", "student", "perflow")


def grid_indices(solver_sigmas: Sequence[float], sigmas: Sequence[float], tol: float = 1e-6) -> list[int]:
    """Index of each of ``sigmas`` in the solver grid (each must be a grid point)."""
    out = []
    for s in sigmas:
        hits = [i for i, g in enumerate(solver_sigmas) if abs(float(g) - float(s)) <= tol]
        if not hits:
            raise ValueError(f"sigma {s} is not a point of the solver grid")
        out.append(hits[0])
    return out


def stage_solver_bounds(solver_sigmas: Sequence[float], saved_sigmas: Sequence[float], stage: int) -> list[int]:
    """Solver-grid indices of a stage's W + 1 window boundaries (W = stage divides the saved windows)."""
    finest = len(saved_sigmas) - 1
    if stage < 1 or finest % stage:
        raise ValueError(f"stage {stage} windows do not divide the corpus's {finest} finest windows")
    saved_idx = grid_indices(solver_sigmas, saved_sigmas)
    return saved_idx[:: finest // stage]


def window_grids(solver_sigmas: Sequence[float], bounds: Sequence[int], window_B: torch.Tensor) -> torch.Tensor:
    """[B, S_w + 1] float64 solver sub-grid of each sample's window (bounds from ``stage_solver_bounds``)."""
    grid = torch.tensor([float(s) for s in solver_sigmas], dtype=torch.float64)
    spans = {bounds[k + 1] - bounds[k] for k in range(len(bounds) - 1)}
    if len(spans) != 1:
        raise ValueError(f"windows span unequal solver steps {sorted(spans)}; use a uniform-in-time solver grid")
    span = spans.pop()
    starts = torch.tensor(bounds[:-1], dtype=torch.long)[window_B.cpu()]
    return grid[starts[:, None] + torch.arange(span + 1)[None, :]]


@torch.no_grad()
def student_window_starts(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_BX: torch.Tensor,
    boundary_sigmas: Sequence[float],
    window_B: torch.Tensor,
) -> torch.Tensor:
    """x_BX at each sample's window start, reached by the student's Euler steps on the stage boundaries.

    velocity_fn(x_BX, sigma_B) -> v_BX is the student; boundary_sigmas: the stage's W + 1 sigmas
    (1 ... 0); window_B: [B] window index w, the student takes w steps from noise.
    """
    return euler_walk(velocity_fn, noise_BX, boundary_sigmas, stop_B=window_B)


def interpolated_starts(x0_BX: torch.Tensor, noise_BX: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """PeRFlow's window start: (1 - sigma) x0 + sigma eps, x0 a real sample. [B, *X]."""
    s = expand_like(sigma_B.to(x0_BX.dtype), x0_BX)
    return (1 - s) * x0_BX + s * noise_BX
