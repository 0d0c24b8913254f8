"""The flow-net student's discriminator on trajectory states (FlowSteer): a flow-net trunk plus a head.

D(x, sigma, class) tells the teacher's states at the student's sigmas (real) from the student's own
rollout states (fake); its trunk is the first blocks of a flow-net backbone (``load_backbone``: the
student's or the teacher's weights), and it returns the logit and the per-block features for feature
matching (the ``trainer.students.base.Discriminator`` protocol). The losses are ``flowcore.adversarial``'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from models.flownet import FlowNet, FlowNetConfig


class TrajectoryDiscriminator(nn.Module):
    """D(x [B, *X], sigma [B], class [B] | None) -> (logit [B], [features per trunk block])."""

    def __init__(self, backbone: FlowNetConfig, num_blocks: int = 2):
        super().__init__()
        if num_blocks < 1:
            raise ValueError("the discriminator needs at least one trunk block")
        cfg = replace(backbone, depth=num_blocks, guidance_cond=False, base_gmm=None)  # a trunk, no GMM base
        trunk = FlowNet(cfg)
        self.cfg = cfg
        self.cond, self.inp, self.blocks = trunk.cond, trunk.inp, trunk.blocks
        w = cfg.width
        if cfg.arch == "mlp":
            self.head = nn.Sequential(nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, 1))
        else:
            self.head = nn.Sequential(nn.GroupNorm(min(8, w), w), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(w, 1))
        # projection discriminator: the condition embedding also enters the logit directly
        self.proj = nn.Linear(w, w, bias=False)

    def load_backbone(self, net: FlowNet) -> TrajectoryDiscriminator:
        """Initialise the trunk from the first blocks of a flow net with the same width/arch."""
        own = self.state_dict()
        src = {k: v for k, v in net.state_dict().items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(src, strict=False)
        return self

    def fsdp_units(self) -> list[nn.Module]:
        """None of its own (``Discriminator``): flow-net students train with DDP only."""
        return []

    def upgrade_optimizer_state_dict(self, osd: dict[str, Any]) -> dict[str, Any]:
        """The identity (``Discriminator``): its parameters never changed."""
        return osd

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, class_B: torch.Tensor | None = None):
        B = x.shape[0]
        e = self.cond(sigma_B.to(x.dtype), class_B)
        h = self.inp(x.reshape(B, -1) if self.cfg.arch == "mlp" else x)
        feats = []
        for blk in self.blocks:
            h = blk(h, e)
            feats.append(h)
        logit = self.head(h).reshape(B)
        pooled = h if h.ndim == 2 else h.mean(dim=(2, 3))
        logit = logit + (self.proj(e) * pooled).sum(dim=1) / pooled.shape[1] ** 0.5
        return logit, feats
