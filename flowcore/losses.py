"""Window targets and velocity losses (ProReflow's aligned v-prediction).

For a window from sigma_start to sigma_end with stored authentic states x_start, x_end, the
straight-line (reflow) target velocity is

    v* = (x_end - x_start) / (sigma_end - sigma_start)

and a training point at sigma on the segment is x_start + (sigma - sigma_start) v*. The aligned
v-prediction loss adds a direction term to the MSE:

    L = ||v_theta - v*||^2 + alpha * (1 - cos(v_theta, v*))

with the squared norm averaged over elements and cos taken over each sample's whole flattened
vector, both averaged over the batch. alpha = 0 is plain velocity MSE.
"""

from __future__ import annotations

import torch

from flowcore.tensors import expand_like


def window_target(
    x_start: torch.Tensor, x_end: torch.Tensor, sigma_start_B: torch.Tensor, sigma_end_B: torch.Tensor
) -> torch.Tensor:
    """v*_BX = (x_end - x_start) / (sigma_end - sigma_start); x_*: [B, *X], sigma_*: [B]."""
    d = sigma_end_B - sigma_start_B
    if bool(torch.any(d == 0)):
        raise ValueError("window has zero width (sigma_end == sigma_start)")
    return (x_end - x_start) / expand_like(d.to(x_start.dtype), x_start)


def point_on_segment(
    x_start: torch.Tensor, v_target: torch.Tensor, sigma_start_B: torch.Tensor, sigma_B: torch.Tensor
) -> torch.Tensor:
    """x_BX on the straight window segment at sigma_B: x_start + (sigma - sigma_start) * v*."""
    return x_start + expand_like((sigma_B - sigma_start_B).to(x_start.dtype), x_start) * v_target


def velocity_mse(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements -> scalar."""
    return torch.mean((v_pred.float() - v_target.float()) ** 2)


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a_b, b_b) over each sample's flattened vector: [B, *X] x2 -> [B]."""
    a = a.float().flatten(1)
    b = b.float().flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=eps)


def aligned_v_loss(v_pred: torch.Tensor, v_target: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """MSE + alpha * mean_b(1 - cos(v_pred_b, v_target_b)) -> scalar. alpha = 0 is plain MSE."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    loss = velocity_mse(v_pred, v_target)
    if alpha:
        loss = loss + alpha * torch.mean(1.0 - cosine_per_sample(v_pred, v_target))
    return loss
