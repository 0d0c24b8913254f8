"""Exponential moving average of a student's trainable weights (one update rule for every family)."""

from __future__ import annotations

import torch


class EMA:
    """``tensors``: named EMA storage (the student's ``ema_tensors()``), updated IN PLACE, so storage that
    backs a network (a flow net's shadow copy) always holds the average. ema <- ema + (1 - decay) (w - ema)."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.tensors, self.decay = tensors, float(decay)

    @torch.no_grad()
    def update(self, current: dict[str, torch.Tensor]) -> None:
        """One EMA step. Sharded weights (FSDP2 DTensors) average their local shards: the EMA of a shard is
        the shard of the EMA, so no communication is needed (full tensors are gathered only at export)."""
        for name, t in self.tensors.items():
            c = current[name].detach()
            if hasattr(t, "to_local") and hasattr(c, "to_local"):  # DTensors with the same placement
                t, c = t.to_local(), c.to_local()
            t.lerp_(c.to(t.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.tensors) - set(tensors))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for name, t in self.tensors.items():
            t.copy_(tensors[name].to(t.device, t.dtype))
