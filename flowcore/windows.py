"""Reflow windows from stored authentic states (ProReflow's progressive windows, OTA-style starts).

A corpus stores K saved states per trajectory at ``saved_sigmas`` (the boundaries of the finest
stage). For a stage with W windows (W divides the finest count F), window k runs from saved index
``k * F / W`` to ``(k + 1) * F / W``. A training example draws a window per sample, takes its
authentic endpoint states, the straight-line target ``v* = (x_end - x_start) / (s_end - s_start)``
and a training point on the segment:

  * ``start``   — exactly at the window start (where a few-step sampler queries the student);
  * ``segment`` — uniformly on the half-open segment (s_end, s_start] that owns its start;
  * ``mixed``   — half of the batch each.

See the measured pitfall in ARCHITECTURE.md: ``segment`` alone leaves window starts under-trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowcore.losses import point_on_segment, window_target

WINDOW_POINTS = ("start", "segment", "mixed")


@dataclass
class WindowBatch:
    """One training batch drawn from stored states.

    x_BX: training points; sigma_B: their sigmas; v_target_BX: straight-line targets;
    window_B: window index within the stage; sigma_start_B / sigma_end_B: window bounds.
    """

    x_BX: torch.Tensor
    sigma_B: torch.Tensor
    v_target_BX: torch.Tensor
    window_B: torch.Tensor
    sigma_start_B: torch.Tensor
    sigma_end_B: torch.Tensor


def stage_boundary_indices(num_saved: int, stage: int) -> list[int]:
    """Indices into the K = F + 1 saved states of a stage's W + 1 boundaries (W must divide F)."""
    finest = num_saved - 1
    if stage < 1 or finest % stage != 0:
        raise ValueError(f"stage {stage} windows do not divide the corpus's {finest} finest windows")
    step = finest // stage
    return list(range(0, finest + 1, step))


def sample_windows(
    states_BKX: torch.Tensor,
    sigmas_K: torch.Tensor,
    stage: int,
    window_points: str = "start",
    generator: torch.Generator | None = None,
) -> WindowBatch:
    """Draw one window per sample of ``stage`` and a training point on it.

    states_BKX: [B, K, *X] authentic states at sigmas_K [K] (decreasing, sigmas_K[0] = 1 ... 0).
    """
    if window_points not in WINDOW_POINTS:
        raise ValueError(f"window_points must be one of {WINDOW_POINTS}, got {window_points!r}")
    B, K = states_BKX.shape[:2]
    bounds = torch.tensor(stage_boundary_indices(K, stage), device=states_BKX.device)
    dev = states_BKX.device
    w = torch.randint(0, stage, (B,), generator=generator).to(dev)
    i0, i1 = bounds[w], bounds[w + 1]
    ar = torch.arange(B, device=dev)
    x0, x1 = states_BKX[ar, i0], states_BKX[ar, i1]
    s = sigmas_K.to(dev, torch.float32)
    return windows_from_endpoints(x0, x1, s[i0], s[i1], w, window_points, generator)


def windows_from_endpoints(
    x_start_BX: torch.Tensor,
    x_end_BX: torch.Tensor,
    sigma_start_B: torch.Tensor,
    sigma_end_B: torch.Tensor,
    window_B: torch.Tensor,
    window_points: str = "start",
    generator: torch.Generator | None = None,
) -> WindowBatch:
    """A WindowBatch from window endpoint states (stored, or from an online teacher rollout).

    x_start_BX / x_end_BX: [B, *X] states at sigma_start_B / sigma_end_B [B]; window_B: [B] window index.
    """
    if window_points not in WINDOW_POINTS:
        raise ValueError(f"window_points must be one of {WINDOW_POINTS}, got {window_points!r}")
    B, dev = x_start_BX.shape[0], x_start_BX.device
    s0, s1 = sigma_start_B.to(dev, torch.float32), sigma_end_B.to(dev, torch.float32)
    v = window_target(x_start_BX, x_end_BX, s0, s1)
    if window_points == "start":
        frac = torch.zeros(B)
    else:
        frac = torch.rand(B, generator=generator)  # in [0, 1): sigma in (s1, s0], the start included
        if window_points == "mixed":
            frac = torch.where(torch.arange(B) % 2 == 0, torch.zeros(B), frac)
    sigma = s0 - frac.to(dev) * (s0 - s1)
    x = point_on_segment(x_start_BX, v, s0, sigma)
    return WindowBatch(x, sigma, v, window_B, s0, s1)
