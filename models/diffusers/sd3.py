"""A diffusers SD3-class transformer as a trajflow Teacher.

diffusers' ``SD3Transformer2DModel`` (SD3, SD3.5) predicts exactly trajflow's velocity
v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps when called with ``timestep = sigma * 1000``
(``num_train_timesteps``), so the adapter is a thin, exact wrapper:

    teacher = DiffusersFlowTeacher.from_pretrained("/models/sd3", torch_dtype=torch.bfloat16)
    v_BCHW = teacher.velocity(x_BCHW, sigma_B, PromptCondition(embeds, pooled, neg, neg_pooled), 7.0)

Classifier-free guidance is evaluated as diffusers' ``StableDiffusion3Pipeline`` does it: one
batched call of size 2B with the *negative* (unconditional) half first, then
``v_u + w (v_c - v_u)`` in the transformer's output dtype. The unconditional half is skipped
when every guidance weight is exactly 1; rows with w == 1 in a mixed batch return the
conditional velocity exactly.

The teacher consumes ``PromptCondition`` embeddings. Loaded from a whole pipeline folder it also
carries the pipeline's frozen text encoders (``models.diffusers.text_encoders.SD3PromptEncoder``):
``teacher.encode_prompts(texts)`` then makes the conditions, the empty prompt's embeddings are the
``null_condition`` (the stock pipeline's CFG negative), and the encoders' weights are part of the
fingerprint. Only local paths are loaded (``local_files_only=True``): flowcore never downloads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from flowcore.guidance import combine_cfg
from flowcore.teacher import as_guidance_batch, as_sigma_batch
from flowcore.tensors import expand_like
from models.diffusers.common import DenoiserPlacement, dtype_of, json_clean, vae_scale_factor_of
from models.diffusers.conditions import PromptCondition

__all__ = ["DiffusersFlowTeacher", "latent_shape_for_resolution"]


class DiffusersFlowTeacher(DenoiserPlacement):
    """Teacher protocol adapter for an ``SD3Transformer2DModel``-like diffusers transformer.

    ``transformer`` is called as ``transformer(hidden_states=x, encoder_hidden_states=E,
    pooled_projections=P, timestep=sigma * num_train_timesteps, return_dict=False)[0]``.

    ``null_condition``: unconditional embeddings (typically the empty prompt's, [1, L, D] /
    [1, P] in ``prompt_embeds`` / ``pooled_prompt_embeds``) used for CFG when a condition has no
    negative embeddings of its own, and as the condition when ``cond`` is None.

    ``config_for_card``: provenance written into ``config()["source"]`` (e.g. the local path and
    subfolder it was loaded from) so the dataset card can rebuild the teacher; it is *not* part of
    the fingerprint, which identifies the function (architecture, weights, dtype, null condition),
    not where it was read from.
    """

    kind = "diffusers"
    num_classes: int | None = None

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        sample_shape: Sequence[int],
        null_condition: PromptCondition | None = None,
        num_train_timesteps: int = 1000,
        config_for_card: dict[str, Any] | None = None,
        prompt_encoder=None,
    ):
        self.transformer = transformer.eval()
        self.prompt_encoder = prompt_encoder
        # an encoder-made null condition is a function of the encoder's weights (fingerprinted): its
        # values depend on the machine's kernels (thread count, CPU vs GPU), so it stays out of the fingerprint
        self._null_from_encoder = prompt_encoder is not None and null_condition is None
        if self._null_from_encoder:
            null_condition = prompt_encoder.null_condition()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if len(self.sample_shape) != 3:
            raise ValueError(f"sample_shape must be (C, H, W), got {self.sample_shape}")
        self.null_condition = null_condition
        self.num_train_timesteps = int(num_train_timesteps)
        self.config_for_card = dict(config_for_card) if config_for_card else None
        if config_for_card is not None:
            json.dumps(config_for_card)  # fail early on non-JSON data

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, texts: Sequence[str]) -> PromptCondition:
        """PromptCondition for prompt strings through the pipeline's frozen text encoders (CFG uses
        ``null_condition``, the empty prompt's embeddings). Needs a teacher loaded with its encoders."""
        if self.prompt_encoder is None:
            raise ValueError(
                "this SD3 teacher has no text encoders: load it from the whole pipeline folder (with text_encoder/, "
                "text_encoder_2/, tokenizer/, tokenizer_2/) to condition on prompt text")
        return self.prompt_encoder.encode(texts)

    # ------------------------------------------------------------------ velocity
    def _forward(self, x: torch.Tensor, sigma_B: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor):
        dt = self.dtype
        return self.transformer(
            hidden_states=x.to(dt),
            encoder_hidden_states=embeds.to(device=x.device, dtype=dt),
            pooled_projections=pooled.to(device=x.device, dtype=dt),
            timestep=sigma_B * self.num_train_timesteps,
            return_dict=False,
        )[0]

    def _negatives(self, cond: PromptCondition, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if cond.has_negative:
            neg = cond.expand(batch)
            return neg.negative_prompt_embeds, neg.negative_pooled_prompt_embeds
        if self.null_condition is None:
            raise ValueError(
                "guidance != 1 needs unconditional embeddings: give the PromptCondition negative_prompt_embeds "
                "(+ negative_pooled_prompt_embeds) or build the teacher with null_condition="
            )
        null = self.null_condition.expand(batch)
        if null.prompt_embeds.shape[1:] != cond.prompt_embeds.shape[1:]:
            raise ValueError(
                f"null_condition embeddings {tuple(null.prompt_embeds.shape[1:])} do not match the prompt "
                f"embeddings {tuple(cond.prompt_embeds.shape[1:])} (same sequence length and width are needed "
                "for the batched CFG call)"
            )
        return null.prompt_embeds, null.pooled_prompt_embeds

    def velocity(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: PromptCondition | None = None,
        guidance: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """v_BCHW at states x [B, C, H, W], sigma scalar or [B], guidance scalar or [B].

        Runs under ``torch.no_grad()`` (not ``inference_mode``: the result is used as a training
        target, and inference tensors cannot be saved for backward) in the transformer's dtype;
        the timestep sigma * num_train_timesteps is computed in float32, as the pipeline's
        scheduler does. The result is returned in **x's dtype** (so a float32 ODE state stays
        float32 around a bf16 transformer).
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        B = x.shape[0]
        if cond is None:
            if self.null_condition is None:
                raise ValueError("cond is None and the teacher has no null_condition")
            cond = PromptCondition(self.null_condition.prompt_embeds, self.null_condition.pooled_prompt_embeds)
        if not isinstance(cond, PromptCondition):
            raise TypeError(f"cond must be a PromptCondition, got {type(cond).__name__}")
        cond = cond.expand(B)
        sigma_B = as_sigma_batch(sigma, B, x.device, torch.float32)
        g_B = as_guidance_batch(guidance, B, x.device, torch.float32)
        with torch.no_grad():
            if bool(torch.all(g_B == 1.0)):
                v = self._forward(x, sigma_B, cond.prompt_embeds, cond.pooled_prompt_embeds)
            else:
                neg, neg_pooled = self._negatives(cond, B)
                dev = x.device
                v2 = self._forward(
                    torch.cat([x, x]),
                    torch.cat([sigma_B, sigma_B]),
                    torch.cat([neg.to(dev), cond.prompt_embeds.to(dev)]),
                    torch.cat([neg_pooled.to(dev), cond.pooled_prompt_embeds.to(dev)]),
                )
                v_uncond, v_cond = v2.chunk(2)  # the pipeline's order: negative first
                v = combine_cfg(v_uncond, v_cond, g_B)
                # rows with w == 1 are the conditional velocity exactly
                keep = expand_like(g_B == 1.0, v)
                v = torch.where(keep, v_cond, v)
        return v.to(x.dtype)

    # ------------------------------------------------------------------ description
    def _model_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_class": type(self.transformer).__name__,
            "transformer_config": json_clean(getattr(self.transformer, "config", {})),
            "sample_shape": list(self.sample_shape),
            "num_train_timesteps": self.num_train_timesteps,
            "dtype": str(self.dtype).removeprefix("torch."),
            "null_condition": self.null_condition is not None,
            **({} if self.prompt_encoder is None else {"text_encoders": self.prompt_encoder.config()}),
        }

    def config(self) -> dict[str, Any]:
        """JSON data: kind "diffusers", model class, the transformer's public config, sample
        shape, timestep scale, dtype, and ``source`` (``config_for_card``, e.g. path/subfolder)."""
        cfg = self._model_config()
        cfg["source"] = self.config_for_card
        return cfg

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = "transformer",
        torch_dtype: torch.dtype | str | None = None,
        *,
        sample_shape: Sequence[int] | None = None,
        null_condition: PromptCondition | None = None,
        num_train_timesteps: int | None = None,
        device: str | torch.device | None = None,
        text_encoders: bool | None = None,
        resolution: int | None = None,
        max_sequence_length: int | None = None,
    ) -> DiffusersFlowTeacher:
        """Load an ``SD3Transformer2DModel`` from a LOCAL diffusers folder (never a hub download).

        ``path`` is a pipeline folder (``subfolder="transformer"``, the default) or the transformer
        folder itself (``subfolder=None``). ``sample_shape`` defaults to (in_channels, sample_size,
        sample_size) of the transformer config (the latent size the model was trained at);
        ``num_train_timesteps`` to the pipeline's ``scheduler/scheduler_config.json`` when present,
        else 1000.

        ``text_encoders``: also load the pipeline's text encoders (``encode_prompts``; the empty
        prompt becomes the ``null_condition``); default: when ``path`` is a pipeline folder that has
        them. ``resolution``: image side in pixels; sample_shape becomes (C, px / s, px / s) with the
        VAE's scale factor s (from ``vae/config.json``). ``max_sequence_length``: T5 tokens (256).
        """
        from diffusers import SD3Transformer2DModel

        root = os.fspath(path)
        folder = os.path.join(root, subfolder) if subfolder else root
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"diffusers teacher path {root!r} does not exist (only local folders are loaded; download "
                "the model to a local folder first)"
            )
        if not os.path.isfile(os.path.join(folder, "config.json")):
            hint = "" if subfolder is None else f" (is {root!r} the transformer folder itself? pass subfolder=None)"
            raise FileNotFoundError(f"no diffusers transformer at {folder!r}: config.json missing{hint}")
        dtype = dtype_of(torch_dtype)
        model = SD3Transformer2DModel.from_pretrained(
            root, subfolder=subfolder, torch_dtype=dtype, local_files_only=True
        )
        if device is not None:
            model.to(device)
        if num_train_timesteps is None:
            num_train_timesteps = 1000
            sched_cfg = os.path.join(root, "scheduler", "scheduler_config.json")
            if subfolder and os.path.isfile(sched_cfg):
                with open(sched_cfg) as f:
                    num_train_timesteps = int(json.load(f).get("num_train_timesteps", 1000))
        if resolution is not None:
            if sample_shape is not None:
                raise ValueError("give sample_shape or resolution, not both")
            sample_shape = latent_shape_for_resolution(root, model.config, resolution)
        if sample_shape is None:
            c = model.config
            sample_shape = (c.in_channels, c.sample_size, c.sample_size)
        source = {
            "path": root,
            "subfolder": subfolder,
            "torch_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        }
        encoder = None
        if text_encoders is None:
            from models.diffusers.text_encoders import has_text_encoders

            text_encoders = bool(subfolder) and has_text_encoders(root)
        if text_encoders:
            from models.diffusers.text_encoders import DEFAULT_MAX_SEQUENCE_LENGTH, SD3PromptEncoder

            msl = int(max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH)
            encoder = SD3PromptEncoder.from_pretrained(root, torch_dtype=dtype, device=device, max_sequence_length=msl)
            source.update(text_encoders=True, max_sequence_length=msl)
        return cls(
            model,
            sample_shape=sample_shape,
            null_condition=null_condition,
            num_train_timesteps=num_train_timesteps,
            config_for_card=source,
            prompt_encoder=encoder,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> DiffusersFlowTeacher:
        """Rebuild from ``config()`` output: needs ``source.path`` (weights are not in the card)."""
        source = config.get("source") or {}
        if not source.get("path"):
            raise ValueError("this diffusers teacher config has no source.path to load weights from")
        kwargs.setdefault("sample_shape", config.get("sample_shape"))
        kwargs.setdefault("num_train_timesteps", config.get("num_train_timesteps"))
        kwargs.setdefault("text_encoders", bool(source.get("text_encoders", False)))
        kwargs.setdefault("max_sequence_length", source.get("max_sequence_length"))
        return cls.from_pretrained(
            source["path"],
            subfolder=source.get("subfolder"),
            torch_dtype=source.get("torch_dtype") or config.get("dtype"),
            **kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"DiffusersFlowTeacher({type(self.transformer).__name__}, sample_shape={self.sample_shape}, "
            f"dtype={self.dtype}, null_condition={self.null_condition is not None})"
        )


def latent_shape_for_resolution(root: str, transformer_config, resolution: int) -> tuple[int, int, int]:
    """(C, px / s, px / s) for square ``resolution``-pixel images, with the VAE scale factor
    s = 2 ** (len(vae block_out_channels) - 1) read from ``root/vae/config.json`` (8 for SD3)."""
    scale = vae_scale_factor_of(root)
    if scale is None:
        raise FileNotFoundError(f"resolution needs the pipeline's vae/config.json (for the latent scale), not found "
                                f"under {root!r}; pass sample_shape instead")
    px = int(resolution)
    patch = int(getattr(transformer_config, "patch_size", 1) or 1)
    if px < 1 or px % (scale * patch):
        raise ValueError(f"resolution {resolution} must be a positive multiple of {scale * patch} (VAE scale {scale} "
                         f"x patch size {patch})")
    side = px // scale
    max_side = getattr(transformer_config, "pos_embed_max_size", None)
    if max_side is not None and side // patch > int(max_side):
        raise ValueError(f"resolution {px} gives {side // patch} patches per side; the transformer's position "
                         f"embedding covers at most {max_side} (resolution <= {int(max_side) * patch * scale})")
    return (int(transformer_config.in_channels), side, side)


