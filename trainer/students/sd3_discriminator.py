"""A discriminator on trajectory states for SD3-class transformer students (LADD-style).

``SD3TrajectoryDiscriminator`` is the diffusers counterpart of
``flowcore.adversarial.TrajectoryDiscriminator``: same call semantics, returns ``(logit [B],
[features per trunk block])``, so the hinge / generator / feature-matching losses of
``flowcore.adversarial`` apply unchanged. As in latent adversarial diffusion distillation, its
trunk is the start of the *teacher's* own network, so it judges states with features of the
velocity field, conditioned on the noise level and the prompt:

    trunk  deep COPIES of the teacher transformer's pos_embed (patchify + positions), time_text_embed
           (timestep + pooled text), context_embedder (prompt tokens) and transformer_blocks[:k]
           (joint image/text attention), cast to float32; trainable unless ``freeze_trunk``
    head   LayerNorm + SiLU + Linear on each image token of the last block, mean over tokens -> logit
    proj   projection term: <W temb, pooled image tokens> / sqrt(D) (sigma and the pooled prompt
           enter the logit directly, as the flow-net discriminator's class/sigma embedding does)

Shapes (B batch, C latent channels, H x W latent, L prompt tokens, J joint_attention_dim,
P pooled_projection_dim, D = the transformer's inner dim, N = (H/p)(W/p) image tokens):

    x [B, C, H, W], sigma_B [B] in [0, 1], prompt_embeds [B, L, J], pooled_prompt_embeds [B, P]
    -> logit [B], features: k tensors [B, N, D] (image tokens after each trunk block)

The copies share no parameter (or storage) with the teacher, so a student that *is* the teacher's
transformer (LoRA or full fine-tune) trains without changing D, and D's steps do not change the
student. Build it from the teacher's transformer **before** LoRA adapters are injected into it (the
trainer does), else the adapters would be copied too. Memory: k of the teacher's blocks in float32
plus AdamW state (~ 3 x 4 bytes x params of k blocks; SD3-Medium's blocks are ~ 85 M parameters
each, so k = 2 costs about 2 GB), plus activations of k blocks for 2B states per step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class SD3TrajectoryDiscriminator(nn.Module):
    """D(x [B, C, H, W], sigma [B], prompt_embeds [B, L, J], pooled [B, P]) -> (logit [B], [B, N, D] x k)."""

    def __init__(self, transformer: nn.Module, num_blocks: int = 2, *, num_train_timesteps: int = 1000,
                 freeze_trunk: bool = False):
        super().__init__()
        if num_blocks < 1:
            raise ValueError("the discriminator needs at least one trunk block")
        blocks = transformer.transformer_blocks
        k = min(int(num_blocks), len(blocks))
        self.num_train_timesteps = int(num_train_timesteps)
        # deep copies in float32: no parameter is shared with the (student's) teacher transformer
        self.pos_embed = copy.deepcopy(transformer.pos_embed).float()
        self.time_text_embed = copy.deepcopy(transformer.time_text_embed).float()
        self.context_embedder = copy.deepcopy(transformer.context_embedder).float()
        self.blocks = nn.ModuleList(copy.deepcopy(blocks[i]).float() for i in range(k))
        for m in (self.pos_embed, self.time_text_embed, self.context_embedder, self.blocks):
            m.requires_grad_(not freeze_trunk)
        d = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.SiLU(), nn.Linear(d, 1))
        self.proj = nn.Linear(d, d, bias=False)

    def fsdp_units(self) -> list[nn.Module]:
        """The trunk blocks: each is one FSDP2 unit (``--parallelism fsdp2``); the embedders and head are the root's."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor):
        B = x.shape[0]
        # the trunk's compute dtype: float32, or the all-gathered dtype of an FSDP2 mixed precision policy
        dt = self.pos_embed.proj.weight.dtype
        h = self.pos_embed(x.to(dt)).contiguous()  # [B, N, D]
        temb = self.time_text_embed(sigma_B.float() * self.num_train_timesteps, pooled_prompt_embeds.to(dt))
        enc = self.context_embedder(prompt_embeds.to(dt))  # [B, L, D]
        feats = []
        for blk in self.blocks:
            enc, h = blk(hidden_states=h, encoder_hidden_states=enc, temb=temb)  # enc is None after a last block
            feats.append(h)
        pooled = h.mean(dim=1)  # [B, D]
        logit = self.head(h).mean(dim=1).reshape(B)  # per-token logits, mean-pooled over image tokens
        logit = logit + (self.proj(temb) * pooled).sum(dim=1) / pooled.shape[1] ** 0.5
        return logit, feats
