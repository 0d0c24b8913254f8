"""Epsilon / v-prediction diffusers UNets (SD1.5, SD2, SDXL) as trajflow Teachers.

A DDPM-family UNet lives on the variance-preserving (VP) path

    z_t = a_t x0 + b_t eps,      a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t),

with ``abar_t`` (``alphas_cumprod``) from its scheduler config. Dividing by ``a_t + b_t`` puts the
same state on trajflow's rectified-flow path (``docs/math.md``, section "UNet (epsilon /
v-prediction) teachers in rectified-flow sigma"):

    x_sigma = z_t / (a_t + b_t) = (1 - sigma) x0 + sigma eps,   sigma = b_t / (a_t + b_t),

and the probability-flow velocity there is ``v = eps_hat - x0_hat``, both read off the UNet's
prediction at the timestep ``t(sigma)``. A DDIM step (eta = 0) between two timesteps is *exactly*
an Euler step of this velocity between the corresponding sigmas, so

    teacher = DiffusersUNetTeacher.from_pretrained("/models/sd15")
    grid = teacher.sigmas_for_timesteps(ddim.timesteps, ddim.final_alpha_cumprod)
    x = solve_teacher(teacher, noise * teacher.x_scale(grid[0]), grid, cond=cond, guidance=7.5).final

reproduces diffusers' DDIM sampler (``tests/test_diffusers_unet.py`` checks it against the real
``DDIMScheduler``).

Continuous timesteps: sigma maps to a *fractional* t by interpolating the discrete schedule's
log-SNR lambda_t = log(abar_t / (1 - abar_t)) linearly between integer timesteps (the same
interpolation diffusers' Euler/DPM schedulers use for Karras sigmas, ``_sigma_to_t``). It is exact
at every integer timestep, so grids built from a scheduler's timesteps query the UNet at exactly
those timesteps; between them the UNet's sinusoidal time embedding is evaluated at the fractional t.

Outside the schedule: ``sigma_max = sigma(T - 1) < 1`` (abar_{T-1} > 0) and
``sigma_min = sigma(0) > 0``. For sigma > sigma_max (trajflow grids start at sigma = 1) the UNet is
evaluated at t = T - 1 on the unit-variance state z = x / sqrt((1 - sigma)^2 + sigma^2) (= the noise
itself at sigma = 1, which is what a diffusers sampler feeds its first step), and the velocity is the
one consistent with the current state and the UNet's x0 estimate, ``v = (x - x0_hat) / sigma``. For
sigma < sigma_min it is evaluated at t = 0 and ``v = (eps_hat - x) / (1 - sigma)``. Both agree with
``eps_hat - x0_hat`` at the range ends, so the field is continuous and finite on [0, 1].

Classifier-free guidance is applied to the UNet's raw output, as diffusers' SD pipelines do
(negative half first in one batched 2B call); the conversion output -> velocity is affine with
weights that do not depend on the output, so this equals CFG on velocities.

The teacher consumes ``UNetCondition`` embeddings (SD1.5/SD2: ``encoder_hidden_states``; SDXL: plus
``text_embeds`` (pooled) and ``time_ids``). Loaded from a whole SD1.5/SD2 pipeline folder (with
text_encoder/ and tokenizer/) it also carries the pipeline's frozen CLIP text encoder
(``models.diffusers.text_encoders.SD15PromptEncoder``): ``teacher.encode_prompts(texts)`` makes the
conditions with the stock ``StableDiffusionPipeline.encode_prompt``, the empty prompt's embeddings
are the ``null_condition`` (the stock pipeline's CFG negative), and the encoder's weights are part of
the fingerprint. An SDXL UNet loaded from a whole SDXL pipeline folder (text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/) carries ``models.diffusers.text_encoders.SDXLPromptEncoder``
instead: the stock ``StableDiffusionXLPipeline.encode_prompt`` (both encoders' penultimate states
concatenated, pooled from encoder 2), ``time_ids`` [[H, W, 0, 0, H, W]] for the teacher's resolution
(latent size x VAE scale factor) as the stock pipeline builds them, and the stock CFG negative
(zeros when the pipeline sets ``force_zeros_for_empty_prompt``, as SDXL base does).
Only local folders are loaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flowcore.guidance import combine_cfg
from flowcore.teacher import as_guidance_batch
from flowcore.tensors import expand_like
from flowcore.vp_flow import VPFlowConversion, sigma_of_alpha_cumprod, vp_scale
from models.diffusers.common import DenoiserPlacement, dtype_of, json_clean
from models.diffusers.conditions import UNetCondition

__all__ = ["DiffusersUNetTeacher", "SD15_SCHEDULER_CONFIG"]

#: Stable Diffusion 1.5's noise schedule (scheduler/scheduler_config.json of the SD1.5 pipeline)
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


class DiffusersUNetTeacher(DenoiserPlacement):
    """Teacher protocol adapter for an epsilon / v-prediction ``UNet2DConditionModel``.

    ``unet`` is called as ``unet(z, t, encoder_hidden_states=E[, added_cond_kwargs={"text_embeds": P,
    "time_ids": T}], return_dict=False)[0]`` with ``z = x / c(sigma)`` and fractional float32
    timesteps ``t(sigma)`` (see the module docstring). ``scheduler_config`` is the pipeline's
    scheduler config (dict or scheduler): only the noise schedule and ``prediction_type`` are used.

    ``null_condition``: unconditional embeddings ([1, L, D], + pooled/time_ids for SDXL) for CFG
    when a condition has no negative embeddings, and the condition when ``cond`` is None.
    ``config_for_card``: provenance (path, subfolder) written into ``config()["source"]``; not part
    of the fingerprint. ``prompt_encoder``: the pipeline's frozen text encoder(s)
    (``models.diffusers.text_encoders.SD15PromptEncoder``; ``SDXLPromptEncoder`` for an SDXL UNet, whose
    time ids are set to this teacher's resolution) for ``encode_prompts``; its empty-prompt
    condition (the stock CFG negative) becomes the ``null_condition`` unless one is given; its
    weights enter the fingerprint.
    """

    kind = "diffusers_unet"
    num_classes: int | None = None

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler_config: Any,
        *,
        sample_shape: Sequence[int] | None = None,
        null_condition: UNetCondition | None = None,
        config_for_card: dict[str, Any] | None = None,
        prompt_encoder=None,
    ):
        self.unet = unet.eval()
        #: the schedule's sigma <-> timestep map and output -> velocity conversion (shared with the
        #: UNet student and FlowUNetScheduler)
        self.conversion = VPFlowConversion(scheduler_config)
        self.schedule = self.conversion.schedule
        self.prediction_type = self.conversion.prediction_type
        self.alphas_cumprod = self.conversion.alphas_cumprod  # float64 [T]
        self.num_train_timesteps = self.conversion.num_train_timesteps
        ucfg = getattr(unet, "config", None)
        if sample_shape is None:
            if ucfg is None:
                raise ValueError("sample_shape is needed for a UNet without a diffusers config")
            sample_shape = (ucfg.in_channels, ucfg.sample_size, ucfg.sample_size)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if len(self.sample_shape) != 3:
            raise ValueError(f"sample_shape must be (C, H, W), got {self.sample_shape}")
        self.is_sdxl = getattr(ucfg, "addition_embed_type", None) == "text_time"
        if ucfg is not None and getattr(ucfg, "addition_embed_type", None) not in (None, "text_time"):
            raise NotImplementedError(
                f"UNet addition_embed_type {ucfg.addition_embed_type!r} is not supported (SD1.5/SD2: none, SDXL: "
                "'text_time')")
        if prompt_encoder is not None:
            _check_prompt_encoder(prompt_encoder, ucfg, self.is_sdxl, self.sample_shape)
        self.prompt_encoder = prompt_encoder
        # an encoder-made null condition is a function of the encoder's weights (fingerprinted): its
        # values depend on the machine's kernels (thread count, CPU vs GPU), so it stays out of the fingerprint
        self._null_from_encoder = prompt_encoder is not None and null_condition is None
        if self._null_from_encoder:
            null_condition = prompt_encoder.null_condition()
        self.null_condition = null_condition
        self.config_for_card = dict(config_for_card) if config_for_card else None
        if config_for_card is not None:
            json.dumps(config_for_card)

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def sigma_max(self) -> float:
        """sigma of the last training timestep T - 1 (< 1: abar_{T-1} > 0)."""
        return self.conversion.sigma_max

    @property
    def sigma_min(self) -> float:
        """sigma of timestep 0 (> 0)."""
        return self.conversion.sigma_min

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, texts: Sequence[str]) -> UNetCondition:
        """UNetCondition for prompt strings through the pipeline's frozen CLIP text encoder(s) (the stock
        ``StableDiffusionPipeline.encode_prompt``, or ``StableDiffusionXLPipeline.encode_prompt`` + time
        ids for SDXL; CFG uses ``null_condition``, the stock pipeline's empty-prompt negative). Needs a
        teacher loaded from a whole SD1.5/SD2/SDXL pipeline folder."""
        if self.prompt_encoder is None:
            from models.diffusers.text_encoders import missing_sd15_text_parts, missing_sdxl_text_parts

            where = ""
            path = (self.config_for_card or {}).get("path")
            if path:
                missing = (missing_sdxl_text_parts if self.is_sdxl else missing_sd15_text_parts)(path)
                where = f" ({path!r} has no {' or '.join(missing)})" if missing else ""
            needs = ("SDXL pipeline folder (with text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/)"
                     if self.is_sdxl else "SD1.5/SD2 pipeline folder (with text_encoder/ and tokenizer/)")
            raise ValueError(
                f"this UNet teacher has no text encoder{where}: load it from the whole {needs} to condition on "
                "prompt text, or pass precomputed UNetCondition embeddings")
        return self.prompt_encoder.encode(texts)

    # ------------------------------------------------------------------ sigma <-> timestep
    def timestep_of_sigma(self, sigma) -> np.ndarray:
        """Fractional timestep(s) t in [0, T - 1] for sigma(s), float64, by linear interpolation of the
        log-SNR lambda = 2 log((1 - sigma) / sigma) over integer timesteps; clamped outside
        [sigma_min, sigma_max]. Exact (to float64 rounding) at sigma(k) for integer k."""
        return self.conversion.timestep_of_sigma(sigma)

    def sigma_of_timestep(self, t) -> np.ndarray:
        """sigma at fractional timestep(s) t in [0, T - 1] (float64), the inverse of timestep_of_sigma."""
        return self.conversion.sigma_of_timestep(t)

    def alpha_cumprod_of_timestep(self, t) -> np.ndarray:
        """abar at fractional t (sigmoid of the interpolated log-SNR); = alphas_cumprod[t] at integers."""
        return self.conversion.alpha_cumprod_of_timestep(t)

    def sigmas_for_timesteps(self, timesteps, final_alpha_cumprod: float | torch.Tensor | None = 1.0) -> list[float]:
        """The rectified-flow grid of a diffusers sampler: sigma(t) for each timestep (decreasing),
        then the sigma of ``final_alpha_cumprod`` (DDIM's ``scheduler.final_alpha_cumprod``: 1.0 ->
        0.0 with ``set_alpha_to_one``; ``alphas_cumprod[0]`` -> sigma_min otherwise); None: no end point."""
        t = torch.as_tensor(timesteps).detach().cpu().double().numpy()
        out = [float(s) for s in self.sigma_of_timestep(t)]
        if final_alpha_cumprod is not None:
            out.append(float(sigma_of_alpha_cumprod(float(final_alpha_cumprod))))
        return out

    @staticmethod
    def x_scale(sigma) -> float | np.ndarray:
        """c(sigma) = sqrt((1 - sigma)^2 + sigma^2): x_sigma = c * z_t. A diffusers sampler starting
        from noise z at sigma_0 starts trajflow's solve at ``c(sigma_0) * z``; its final latent at
        sigma_end is ``x / c(sigma_end)`` (= x at sigma_end = 0)."""
        c = vp_scale(sigma)
        return float(c) if c.ndim == 0 else c

    # ------------------------------------------------------------------ velocity
    def _unet(self, z: torch.Tensor, t_B: torch.Tensor, cond: UNetCondition, negative: bool) -> torch.Tensor:
        dt, dev = self.dtype, z.device
        if negative:
            embeds = cond.negative_prompt_embeds
            pooled = cond.negative_pooled_prompt_embeds
        else:
            embeds, pooled = cond.prompt_embeds, cond.pooled_prompt_embeds
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            if pooled is None or cond.time_ids is None:
                raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs pooled_prompt_embeds "
                                 "(text_embeds) and time_ids in the UNetCondition")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dev, dt), "time_ids": cond.time_ids.to(dev, dt)}
        return self.unet(z.to(dt), t_B, encoder_hidden_states=embeds.to(dev, dt), return_dict=False, **kwargs)[0]

    def _with_negatives(self, cond: UNetCondition, batch: int) -> UNetCondition:
        if cond.has_negative:
            return cond
        if self.null_condition is None:
            raise ValueError("guidance != 1 needs unconditional embeddings: give the UNetCondition "
                             "negative_prompt_embeds (+ negative_pooled_prompt_embeds for SDXL) or build the "
                             "teacher with null_condition=")
        null = self.null_condition.expand(batch)
        if null.prompt_embeds.shape[1:] != cond.prompt_embeds.shape[1:]:
            raise ValueError(f"null_condition embeddings {tuple(null.prompt_embeds.shape[1:])} do not match the "
                             f"prompt embeddings {tuple(cond.prompt_embeds.shape[1:])}")
        return UNetCondition(cond.prompt_embeds, null.prompt_embeds, cond.pooled_prompt_embeds,
                             null.pooled_prompt_embeds if cond.pooled_prompt_embeds is not None else None,
                             cond.time_ids if cond.time_ids is not None else null.time_ids)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: UNetCondition | None = None,
        guidance: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """v_BCHW = eps_hat - x0_hat at states x [B, C, H, W] and sigma (scalar or [B], any value in
        [0, 1]); guidance scalar or [B] (CFG on the UNet output, negative half first).

        Runs under ``torch.no_grad()``; the UNet runs in its own dtype with float32 timesteps, the
        conversion to the velocity in float32 (float64 for float64 states); returned in x's dtype.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        B, dev = x.shape[0], x.device
        if cond is None:
            if self.null_condition is None:
                raise ValueError("cond is None and the teacher has no null_condition")
            nc = self.null_condition
            cond = UNetCondition(nc.prompt_embeds, None, nc.pooled_prompt_embeds, None, nc.time_ids)
        if not isinstance(cond, UNetCondition):
            raise TypeError(f"cond must be a UNetCondition, got {type(cond).__name__}")
        cond = cond.expand(B)
        g_B = as_guidance_batch(guidance, B, dev, torch.float32)
        conv = self.conversion
        s = conv.sigma_array(sigma, B)
        z, t_B = conv.model_input(x, s)
        work = z.dtype
        with torch.no_grad():
            if bool(torch.all(g_B == 1.0)):
                out = self._unet(z, t_B, cond, negative=False).to(work)
            else:
                full = self._with_negatives(cond, B).expand(B)
                both = UNetCondition(
                    torch.cat([full.negative_prompt_embeds.to(dev), full.prompt_embeds.to(dev)]),
                    None,
                    None if full.pooled_prompt_embeds is None else torch.cat(
                        [full.negative_pooled_prompt_embeds.to(dev), full.pooled_prompt_embeds.to(dev)]),
                    None,
                    None if full.time_ids is None else torch.cat([full.time_ids, full.time_ids]).to(dev),
                )
                out2 = self._unet(torch.cat([z, z]), torch.cat([t_B, t_B]), both, negative=False).to(work)
                out_u, out_c = out2.chunk(2)
                out = combine_cfg(out_u, out_c, g_B)
                keep = expand_like(g_B == 1.0, out)
                out = torch.where(keep, out_c, out)
            v = conv.velocity(out, x, s)
        return v.to(x.dtype)

    # ------------------------------------------------------------------ description
    def _model_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model_class": type(self.unet).__name__,
            "unet_config": json_clean(getattr(self.unet, "config", {})),
            "schedule": self.schedule,
            "timestep_interpolation": "log_snr_linear",
            "sample_shape": list(self.sample_shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "null_condition": self.null_condition is not None,
            **({} if self.prompt_encoder is None else {"text_encoders": self.prompt_encoder.config()}),
        }

    def config(self) -> dict[str, Any]:
        """JSON data: kind "diffusers_unet", model class, the UNet's public config, the noise schedule
        (incl. prediction_type), sample shape, dtype, and ``source`` (``config_for_card``)."""
        cfg = self._model_config()
        cfg["source"] = self.config_for_card
        return cfg

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = "unet",
        torch_dtype: torch.dtype | str | None = None,
        *,
        scheduler_config: Any = None,
        sample_shape: Sequence[int] | None = None,
        null_condition: UNetCondition | None = None,
        device: str | torch.device | None = None,
        text_encoders: bool | None = None,
    ) -> DiffusersUNetTeacher:
        """Load a ``UNet2DConditionModel`` and its noise schedule from a LOCAL diffusers folder.

        ``path`` is a pipeline folder (``subfolder="unet"``; the schedule is read from
        ``scheduler/scheduler_config.json``) or the UNet folder itself (``subfolder=None``; then pass
        ``scheduler_config=`` a dict, a scheduler or a scheduler_config.json path). Never downloads.

        ``text_encoders``: also load the pipeline's CLIP text encoder + tokenizer (SDXL: both encoders
        and tokenizers) for ``encode_prompts``; the stock empty-prompt negative becomes the
        ``null_condition``. Default: when ``path`` is a pipeline folder with those subfolders (SD1.5/SD2:
        text_encoder/, tokenizer/; SDXL: + text_encoder_2/, tokenizer_2/). True without them raises
        FileNotFoundError naming the missing subfolders.
        """
        from diffusers import UNet2DConditionModel

        root = os.fspath(path)
        if "://" in root or not os.path.isdir(root):
            raise FileNotFoundError(
                f"diffusers UNet teacher path {root!r} is not a local folder (only local folders are loaded; "
                "download or copy the pipeline to a local folder first)")
        folder = os.path.join(root, subfolder) if subfolder else root
        if not os.path.isfile(os.path.join(folder, "config.json")):
            hint = "" if subfolder is None else f" (is {root!r} the unet folder itself? pass subfolder=None)"
            raise FileNotFoundError(f"no diffusers UNet at {folder!r}: config.json missing{hint}")
        if scheduler_config is None:
            sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
            if not subfolder or not os.path.isfile(sched_path):
                raise FileNotFoundError(
                    f"no scheduler config at {sched_path!r}: a UNet teacher needs the pipeline's noise schedule "
                    "(beta_start/beta_end/beta_schedule/prediction_type); pass scheduler_config=")
            scheduler_config = sched_path
        if isinstance(scheduler_config, (str, os.PathLike)):
            with open(scheduler_config) as f:
                scheduler_config = json.load(f)
        dtype = dtype_of(torch_dtype)
        model = UNet2DConditionModel.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype,
                                                     local_files_only=True)
        if device is not None:
            model.to(device)
        source = {"path": root, "subfolder": subfolder,
                  "torch_dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
        from models.diffusers.text_encoders import (
            SD15PromptEncoder,
            SDXLPromptEncoder,
            missing_sd15_text_parts,
            missing_sdxl_text_parts,
        )

        sdxl = getattr(model.config, "addition_embed_type", None) == "text_time"
        if text_encoders is None:
            text_encoders = bool(subfolder) and not (missing_sdxl_text_parts if sdxl else missing_sd15_text_parts)(root)
        encoder = None
        if text_encoders:
            encoder = (SDXLPromptEncoder if sdxl else SD15PromptEncoder).from_pretrained(
                root, torch_dtype=dtype, device=device)
            source["text_encoders"] = True
        return cls(model, scheduler_config, sample_shape=sample_shape, null_condition=null_condition,
                   config_for_card=source, prompt_encoder=encoder)

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs) -> DiffusersUNetTeacher:
        """Rebuild from ``config()`` output: needs ``source.path`` (weights are not in the card); the
        schedule comes from the card, so the folder's scheduler config is not needed."""
        source = config.get("source") or {}
        if not source.get("path"):
            raise ValueError("this diffusers UNet teacher config has no source.path to load weights from")
        kwargs.setdefault("sample_shape", config.get("sample_shape"))
        kwargs.setdefault("scheduler_config", config.get("schedule"))
        kwargs.setdefault("text_encoders", bool(source.get("text_encoders", False)))
        return cls.from_pretrained(source["path"], subfolder=source.get("subfolder"),
                                   torch_dtype=source.get("torch_dtype") or config.get("dtype"), **kwargs)

    def __repr__(self) -> str:
        return (f"DiffusersUNetTeacher({type(self.unet).__name__}, {self.prediction_type}, "
                f"sample_shape={self.sample_shape}, dtype={self.dtype}, sigma in [{self.sigma_min:.4g}, "
                f"{self.sigma_max:.4g}])")


def _check_prompt_encoder(encoder, ucfg, is_sdxl: bool, sample_shape: tuple[int, ...]) -> None:
    """An SDXL UNet takes an SDXL prompt encoder (widths matching its config; its time ids set to the
    teacher's resolution), an SD1.5/SD2 UNet a one-encoder one."""
    enc_sdxl = bool(getattr(encoder, "is_sdxl", False))
    if enc_sdxl != is_sdxl:
        raise ValueError(f"an {'SDXL' if is_sdxl else 'SD1.5/SD2'} UNet needs "
                         f"{'an SDXLPromptEncoder' if is_sdxl else 'a one-encoder prompt encoder (SD15PromptEncoder)'}, "
                         f"got {type(encoder).__name__}")
    if not is_sdxl:
        return
    if ucfg is not None:
        pooled = int(ucfg.projection_class_embeddings_input_dim) - 6 * int(ucfg.addition_time_embed_dim)
        cad = ucfg.cross_attention_dim
        cad = int(cad) if isinstance(cad, int) else (int(cad[0]) if len(set(cad)) == 1 else None)
        if encoder.pooled_dim != pooled or cad not in (None, encoder.embed_dim):
            raise ValueError(
                f"the SDXL text encoders give embeddings of width {encoder.embed_dim} and pooled {encoder.pooled_dim}; "
                f"the UNet expects cross_attention_dim {ucfg.cross_attention_dim} and pooled "
                f"{pooled} (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)")
    encoder.set_latent_size(sample_shape[1], sample_shape[2])


