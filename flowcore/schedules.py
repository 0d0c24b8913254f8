"""Sigma grids: linear, shifted, the corrected few-step grid, and progressive window stages.

Conventions (``docs/math.md``): sigma in [0, 1], 1 = pure noise, 0 = data; grids run from 1 down
to exactly 0. The time-shift used by SD3-class models is

    shift(sigma) = s * sigma / (1 + (s - 1) * sigma)

Every grid here is shift(u) over the *unshifted* time u_i = (N - i) / N, computed as an exact
integer ratio in float64. Because (N - i) / N and (K - j) / K are the same rational whenever
i / N = j / K, a window boundary of K windows and the matching point of an N-step solver grid
(N a multiple of K) are the *same float*: stored trajectory states are solver states, never
interpolations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shift_sigma(sigma, shift: float):
    """shift(sigma) = s*sigma / (1 + (s-1)*sigma) for a float or a tensor (elementwise)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _unshifted_times(num_steps: int) -> list[float]:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return [(num_steps - i) / num_steps for i in range(num_steps + 1)]


def linear_sigmas(num_steps: int) -> list[float]:
    """N+1 sigmas linspace(1, 0, N+1), ending in exactly 0."""
    return _unshifted_times(num_steps)


def shifted_sigmas(num_steps: int, shift: float = 1.0) -> list[float]:
    """N+1 sigmas shift(linspace(1, 0, N+1)): starts at exactly 1.0 and ends at exactly 0.0."""
    return [float(shift_sigma(u, shift)) for u in _unshifted_times(num_steps)]


def few_step_sigmas(num_steps: int, shift: float = 1.0) -> list[float]:
    """The corrected few-step schedule (contract): shift(linspace(1, 0, N+1)).

    ``few_step_sigmas(4, 3.0) == [1.0, 0.9, 0.75, 0.5, 0.0]``. Unlike diffusers'
    FlowMatchEulerDiscreteScheduler.set_timesteps (which spaces N timesteps over [1, 1/T] and
    appends 0, leaving a last step from ~0.009 to 0), every one of the N steps does real work.
    """
    return shifted_sigmas(num_steps, shift)


def window_boundaries(num_windows: int, shift: float = 1.0) -> list[float]:
    """K+1 boundaries of K equal windows in unshifted time, mapped through ``shift``.

    Window k is the half-open interval that owns its start: sigma in (b[k+1], b[k]].
    """
    return shifted_sigmas(num_windows, shift)


def solver_sigmas(num_steps: int, shift: float, finest_windows: int) -> list[float]:
    """The teacher's solver grid; ``num_steps`` must be a multiple of ``finest_windows`` so that
    every window boundary is a solver point."""
    if num_steps % finest_windows != 0:
        raise ValueError(
            f"solver steps ({num_steps}) must be a multiple of the finest window count "
            f"({finest_windows}) so that window boundaries are solver points"
        )
    return shifted_sigmas(num_steps, shift)


def window_index(sigma_B: torch.Tensor, boundaries: list[float]) -> torch.Tensor:
    """Index k of the half-open window (b[k+1], b[k]] that owns each sigma; sigma_B: [B] -> [B] long.

    A boundary sigma belongs to the window it *starts*, which is where a few-step sampler queries
    the student. sigma = 0 (the final boundary) is not inside any window and raises.
    """
    b = torch.as_tensor(boundaries, dtype=torch.float64, device=sigma_B.device)
    s = sigma_B.to(torch.float64)
    if bool(torch.any(s <= 0)) or bool(torch.any(s > b[0] + 1e-12)):
        raise ValueError("sigma must lie in (0, 1] to belong to a window")
    # number of interior boundaries strictly greater than sigma... window k has b[k] >= s > b[k+1]
    k = (b[1:-1].unsqueeze(0) >= s.unsqueeze(1) - 1e-12).sum(dim=1)
    return k.long()


@dataclass(frozen=True)
class StageSchedule:
    """A progressive reflow stage schedule such as [8, 4, 2] (ProReflow).

    Each coarser stage merges adjacent windows of the finer one, so one saved sigma grid (the
    boundaries of the finest stage) serves every stage.
    """

    #: window counts, finest first, each dividing the previous one, e.g. (8, 4, 2)
    stages: tuple[int, ...]
    #: time shift applied to the unshifted window grid
    shift: float = 1.0

    def __post_init__(self):
        stages = tuple(int(s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("a stage schedule needs at least one stage, e.g. [8, 4, 2]")
        if any(s < 1 for s in stages):
            raise ValueError(f"window counts must be >= 1, got {list(stages)}")
        for finer, coarser in zip(stages, stages[1:]):
            if coarser > finer or finer % coarser != 0:
                raise ValueError(
                    f"stage {coarser} cannot merge windows of stage {finer}: each stage must "
                    f"divide the previous one (e.g. 8,4,2), got {list(stages)}"
                )
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @property
    def finest(self) -> int:
        return self.stages[0]

    def saved_sigmas(self) -> list[float]:
        """The sigma grid to store: boundaries of the finest stage (finest + 1 values)."""
        return window_boundaries(self.finest, self.shift)

    def boundary_indices(self, stage: int) -> list[int]:
        """Indices into ``saved_sigmas()`` of the boundaries of the windows of ``stage``."""
        if stage not in self.stages:
            raise ValueError(f"{stage} is not a stage of {list(self.stages)}")
        step = self.finest // stage
        return list(range(0, self.finest + 1, step))

    def boundaries(self, stage: int) -> list[float]:
        """The K+1 sigma boundaries of ``stage`` (equal to ``window_boundaries(stage, shift)``)."""
        saved = self.saved_sigmas()
        return [saved[i] for i in self.boundary_indices(stage)]


def parse_stages(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """'8,4,2' -> (8, 4, 2) with a clear error on junk."""
    if isinstance(text, (list, tuple)):
        return tuple(int(s) for s in text)
    try:
        return tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise ValueError(f"stages must be comma-separated integers like 8,4,2, got {text!r}") from None
