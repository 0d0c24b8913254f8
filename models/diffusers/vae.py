"""A pipeline folder's VAE as a latent -> image decoder (the trainer's validation sample grids).

``LatentDecoder.from_pipeline(folder)`` loads ``folder/vae`` (an ``AutoencoderKL``, safetensors weights
only: no pickle) or returns None when the folder has no such VAE. ``decode(latents_BCHW)`` turns latents in
the denoiser's space into RGB images in [0, 1] the way the stock pipelines do:

    SD3:          vae.decode(latents / scaling_factor + shift_factor)
    SD1.5 / SDXL: vae.decode(latents / scaling_factor)              (no shift_factor in their configs)

then ``(image / 2 + 0.5).clamp(0, 1)``. The VAE stays on the CPU between calls and visits ``device`` only
while it decodes, one latent at a time (a 1024 px decode is the memory-heavy part of the VAE; a training
run should not keep it in accelerator memory).
"""

from __future__ import annotations

import os

import torch

__all__ = ["LatentDecoder", "has_vae"]


def has_vae(folder: str | os.PathLike) -> bool:
    """``folder/vae`` holds an AutoencoderKL config and safetensors weights."""
    vae = os.path.join(os.fspath(folder), "vae")
    if not os.path.isfile(os.path.join(vae, "config.json")):
        return False
    return any(n.endswith(".safetensors") for n in os.listdir(vae))


class LatentDecoder:
    """The VAE of a pipeline folder (see module docstring)."""

    def __init__(self, vae):
        self.vae = vae.to("cpu").eval().requires_grad_(False)
        self.dtype = vae.dtype
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)

    @classmethod
    def from_pipeline(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LatentDecoder | None:
        """The decoder of ``folder/vae``, or None when the folder has no VAE (a transformer folder, say)."""
        if not has_vae(folder):
            return None
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.fspath(folder), subfolder="vae", local_files_only=True,
                                            use_safetensors=True, torch_dtype=dtype)
        return cls(vae)

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """RGB images [B, 3, H*s, W*s] in [0, 1] (float32, on the CPU) of latents in the denoiser's space."""
        self.vae.to(device)
        try:
            out = []
            for z in latents_BCHW:
                z = z[None].to(device, self.dtype) / self.scaling_factor + self.shift_factor
                img = self.vae.decode(z).sample.float()
                out.append((img / 2 + 0.5).clamp(0, 1).cpu())
            return torch.cat(out)
        finally:
            self.vae.to("cpu")
