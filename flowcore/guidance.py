"""Classifier-free guidance for network teachers.

v_w = v_uncond + w * (v_cond - v_uncond). w = 1 returns the conditional velocity exactly (no
unconditional pass is made), w = 0 the unconditional one. Networks evaluate cond and uncond in
one batched call of size 2B, as diffusers pipelines do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowcore.tensors import expand_like


def combine_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_B: torch.Tensor) -> torch.Tensor:
    """v_uncond, v_cond: [B, ...]; guidance_B: [B] -> guided velocity [B, ...]."""
    w = expand_like(guidance_B.to(v_cond.dtype), v_cond)
    return v_uncond + w * (v_cond - v_uncond)


def cfg_velocity(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_BX: torch.Tensor,
    sigma_B: torch.Tensor,
    cond_B: torch.Tensor,
    null_cond_B: torch.Tensor,
    guidance_B: torch.Tensor,
) -> torch.Tensor:
    """Guided velocity of ``model_fn(x, sigma, cond)`` with one batched cond+uncond call.

    Skips the unconditional pass when every guidance weight is exactly 1.
    """
    if bool(torch.all(guidance_B == 1.0)):
        return model_fn(x_BX, sigma_B, cond_B)
    v = model_fn(torch.cat([x_BX, x_BX]), torch.cat([sigma_B, sigma_B]), torch.cat([cond_B, null_cond_B]))
    v_cond, v_uncond = v.chunk(2)
    return combine_cfg(v_uncond, v_cond, guidance_B)
