"""A discriminator on trajectory states for SD3-class transformer students (LADD-style).

``SD3TrajectoryDiscriminator`` is the diffusers counterpart of the flow-net student's
``trainer.students.flownet_discriminator.TrajectoryDiscriminator``: same call semantics (the
``trainer.students.base.Discriminator`` protocol), returns ``(logit [B],
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

**The last trunk block computes only the image stream.** A joint block updates both streams; the
logit and the features read only the image tokens, so when the trunk stops before the transformer's
last block (which diffusers builds ``context_pre_only``: no text-stream output), the text-stream
output of the trunk's last block would feed nothing. ``prune_text_output`` makes that block what
diffusers' last block is: ``context_pre_only``, with no ``attn.to_add_out`` and no ``ff_context`` (never
copied, never trained, absent from the state dict), and ``norm1_context`` reduced to the
shift/scale modulation of the text tokens that enter the joint attention (its weights as copied: the
6-chunk AdaLN-Zero linear, so its key and shape do not change). Every trainable parameter of D then
takes part in the logit, as DDP requires (it refuses parameters that get no gradient: "Expected to
have finished reduction in the prior iteration"), and FSDP2 has no parameter without optimizer state.
The logit and features are the same numbers as the full block's. State dicts and optimizer states
saved before this (with those modules, whose weights were the teacher's: no gradient ever reached
them) still load: ``load_state_dict`` drops their keys and ``upgrade_optimizer_state_dict`` the
optimizer's entries.

The copies share no parameter (or storage) with the teacher, so a student that *is* the teacher's
transformer (LoRA or full fine-tune) trains without changing D, and D's steps do not change the
student. Build it from the teacher's transformer **before** LoRA adapters are injected into it (the
trainer does), else the adapters would be copied too. Memory: k of the teacher's blocks in float32
plus AdamW state (~ 3 x 4 bytes x params of k blocks; SD3-Medium's blocks are ~ 85 M parameters
each, so k = 2 costs about 2 GB), plus activations of k blocks for 2B states per step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: the submodules of a joint block that produce only its text-stream output (dropped by ``prune_text_output``)
TEXT_OUTPUT_MODULES = ("attn.to_add_out", "ff_context")


class _TextModulation(nn.Module):
    """``norm1_context`` of a block whose text-stream output is unused: AdaLN-Zero's modulation of the text
    tokens that enter the joint attention, ``norm(x) * (1 + scale) + shift`` (chunks 0 and 1 of the
    6-chunk linear, as ``AdaLayerNormZero`` computes them), called as diffusers calls a
    ``context_pre_only`` block's ``norm1_context``: ``(x, emb) -> x``. Holds the AdaLN-Zero's own
    ``linear`` and ``norm``, so its parameter names and shapes are the AdaLN-Zero's."""

    def __init__(self, ada: nn.Module):
        super().__init__()
        if getattr(ada, "emb", None) is not None:
            raise ValueError("norm1_context with its own timestep embedding is not a joint block's")
        self.silu, self.linear, self.norm = ada.silu, ada.linear, ada.norm

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(self.silu(emb)).chunk(6, dim=1)[:2]
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


def prune_text_output(block: nn.Module) -> nn.Module:
    """Make a (copied) diffusers ``JointTransformerBlock`` compute only its image-stream output, in place:
    ``context_pre_only`` as diffusers' last SD3 block is (it returns ``(None, hidden_states)``), without the
    modules that only the text-stream output used (``TEXT_OUTPUT_MODULES``; ``norm2_context`` has no
    weights). A block that is already ``context_pre_only`` is returned as it is."""
    if block.context_pre_only:
        return block
    block.norm1_context = _TextModulation(block.norm1_context)
    block.attn.context_pre_only = True  # the attention processors skip to_add_out
    del block.attn.to_add_out
    block.ff_context = block.norm2_context = None
    block.context_pre_only = True
    return block


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
        # the trainable parameters' names as a discriminator with the last block's text-stream modules had them
        # (the optimizer's order), for upgrade_optimizer_state_dict; then those modules go
        self._unpruned_trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        last = len(self.blocks) - 1
        self._pruned = () if self.blocks[last].context_pre_only else tuple(
            f"blocks.{last}.{m}." for m in TEXT_OUTPUT_MODULES)
        prune_text_output(self.blocks[last])
        self.register_load_state_dict_pre_hook(self._drop_pruned_keys)

    def _drop_pruned_keys(self, module, state_dict, prefix, *args) -> None:
        """A state dict saved with the last block's text-stream modules (never trained) loads without them."""
        for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in self._pruned))]:
            del state_dict[key]

    def upgrade_optimizer_state_dict(self, osd: dict[str, Any]) -> dict[str, Any]:
        """``osd`` (``torch.optim`` state dict of this discriminator's AdamW) as this module's parameters index it:
        one saved while the last block still had its text-stream modules (more parameters; the dropped ones
        never had a gradient, so no state) has their entries removed and the rest renumbered. Any other state
        dict is returned as it is."""
        new = [n for n, p in self.named_parameters() if p.requires_grad]
        groups = osd.get("param_groups", [])
        if (len(new) == len(self._unpruned_trainable) or len(groups) != 1
                or len(groups[0]["params"]) != len(self._unpruned_trainable)):
            return osd
        old_index = {n: i for i, n in enumerate(self._unpruned_trainable)}
        keep = [old_index[n] for n in new]
        ids = list(groups[0]["params"])  # saved ids, in the old parameter order
        dropped = set(ids) - {ids[i] for i in keep}
        if dropped & set(osd["state"]):
            raise ValueError("the discriminator's optimizer state has state for parameters this build has not")
        state = {j: osd["state"][ids[i]] for j, i in enumerate(keep) if ids[i] in osd["state"]}
        return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(new)))}]}

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
