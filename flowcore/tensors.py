"""Small tensor helpers shared by the math and the model layer."""

from __future__ import annotations

import torch


def expand_like(t_B: torch.Tensor, x_BX: torch.Tensor) -> torch.Tensor:
    """``t_B`` [B] reshaped to [B, 1, ..., 1] with ``x_BX.ndim`` dimensions, so it broadcasts against x_BX
    (flow_matching's ``expand_tensor_like``, without the copy-free expand: broadcasting does that).

    A view of ``t_B``: same dtype and device (cast or move it first where the caller needs to)."""
    return t_B.reshape(-1, *([1] * (x_BX.ndim - 1)))
