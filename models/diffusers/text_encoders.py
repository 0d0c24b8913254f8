"""SD3-class prompt encoding: the pipeline's own text encoders, frozen, as a PromptCondition maker.

``SD3PromptEncoder`` wraps a ``StableDiffusion3Pipeline`` loaded *without* its transformer and VAE
(two CLIP text encoders + T5 and their tokenizers) and calls the pipeline's own ``encode_prompt``,
so embeddings are exactly what the stock pipeline computes at sampling time (CLIP-L/G hidden
states zero-padded to the T5 width and concatenated with T5's on the sequence axis; pooled = the
two CLIP projections). Works with ``text_encoder_3`` absent (the pipeline then uses zeros for T5).

    enc = SD3PromptEncoder.from_pretrained("/models/sd3", torch_dtype=torch.bfloat16, device="cuda")
    cond = enc.encode(["a red cat", "a blue dog"])    # PromptCondition [2, 77 + 256, 4096], [2, 2048]
    null = enc.null_condition()                       # the empty prompt's: the pipeline's CFG negative

``SD15PromptEncoder`` is the same for SD1.5 / SD2 UNet pipelines: a ``StableDiffusionPipeline``
loaded without its UNet, VAE and safety checker (one CLIP text encoder + tokenizer), whose own
``encode_prompt`` gives ``UNetCondition`` embeddings [B, 77, D] (the text encoder's last hidden
states, ``clip_skip=None``); the empty prompt's embeddings are the CFG negative, as in the stock
pipeline.

``SDXLPromptEncoder`` is the same for SDXL UNet pipelines: a ``StableDiffusionXLPipeline`` loaded
without its UNet and VAE (``CLIPTextModel`` + ``CLIPTextModelWithProjection`` and their tokenizers),
whose own ``encode_prompt`` gives the embeddings the stock pipeline feeds its UNet: both encoders'
penultimate hidden states concatenated on the feature axis [B, 77, D1 + D2] and the pooled
projection of encoder 2 [B, P]. ``time_ids`` are built as ``StableDiffusionXLPipeline`` builds them
by default (``_get_add_time_ids``): original size = target size = the generation resolution (H, W) in
pixels, crop top-left (0, 0), i.e. [[H, W, 0, 0, H, W]]; the resolution is the teacher's latent size
times the VAE scale factor (``set_latent_size``, called by ``DiffusersUNetTeacher``). The CFG
negative (``null_condition``) is the stock pipeline's default for an empty negative prompt: zeros
for both embeddings when the pipeline config sets ``force_zeros_for_empty_prompt`` (SDXL base does),
else the empty prompt's embeddings.

``encode`` encodes each distinct text of a call once (batches built by cycling prompts repeat them)
and runs under ``torch.no_grad()``. Only local folders are loaded (``local_files_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from models.diffusers.common import vae_scale_factor_of
from models.diffusers.conditions import PromptCondition

__all__ = ["SD3PromptEncoder", "SD15PromptEncoder", "SDXLPromptEncoder", "has_text_encoders",
           "missing_sd15_text_parts", "missing_sdxl_text_parts", "DEFAULT_MAX_SEQUENCE_LENGTH"]

#: T5 tokens per prompt; StableDiffusion3Pipeline's default (``max_sequence_length=256``)
DEFAULT_MAX_SEQUENCE_LENGTH = 256

_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def has_text_encoders(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a pipeline folder with SD3's CLIP text encoders and tokenizers."""
    root = os.fspath(path)
    return all(os.path.isdir(os.path.join(root, d)) for d in ("text_encoder", "text_encoder_2", "tokenizer",
                                                               "tokenizer_2"))


def missing_sd15_text_parts(path: str | os.PathLike) -> list[str]:
    """The subfolders an SD1.5-style pipeline folder lacks for prompt encoding (text_encoder/, tokenizer/)."""
    root = os.fspath(path)
    return [f"{d}/" for d in ("text_encoder", "tokenizer") if not os.path.isdir(os.path.join(root, d))]


#: the subfolders SDXL prompt encoding reads (two CLIP encoders and their tokenizers)
SDXL_TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def missing_sdxl_text_parts(path: str | os.PathLike) -> list[str]:
    """The subfolders an SDXL pipeline folder lacks for prompt encoding (of text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/)."""
    root = os.fspath(path)
    return [f"{d}/" for d in SDXL_TEXT_PARTS if not os.path.isdir(os.path.join(root, d))]


def _unique_rows(texts: Sequence[str]) -> tuple[list[str], list[int] | None]:
    """(distinct texts in first-seen order, row of each text in them or None when all are distinct)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("encode takes a list of prompt strings")
    texts = list(texts)
    if not texts:
        raise ValueError("no prompts to encode")
    unique = list(dict.fromkeys(texts))
    if len(unique) == len(texts):
        return unique, None
    where = {t: i for i, t in enumerate(unique)}
    return unique, [where[t] for t in texts]


class _PipelinePromptEncoder:
    """What both prompt encoders share: a text-only stock pipeline ``pipe`` and the cached empty-prompt
    condition ``_null``; subclasses define ``encode(texts)``."""

    pipe: Any
    _null: Any

    @property
    def device(self) -> torch.device:
        return next(self.pipe.text_encoder.parameters()).device

    def to(self, device=None):
        self.pipe.to(device)
        if self._null is not None:
            self._null = self._null.to(device=device)
        return self

    def null_condition(self):
        """The empty prompt's embeddings, batch 1: the stock pipeline's default negative for CFG."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null


class SD3PromptEncoder(_PipelinePromptEncoder):
    """Frozen SD3 text encoders (see module docstring)."""

    def __init__(self, pipe, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"the pipeline has no {name}: SD3 prompt encoding needs both CLIP text encoders")
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)
        if self.max_sequence_length < 1:
            raise ValueError("max_sequence_length must be >= 1")
        for enc in self.encoders().values():
            enc.requires_grad_(False).eval()
        self._null: PromptCondition | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> SD3PromptEncoder:
        """Load the text encoders and tokenizers of the LOCAL SD3 pipeline folder ``path``."""
        from diffusers import StableDiffusion3Pipeline

        root = os.fspath(path)
        if not has_text_encoders(root):
            raise FileNotFoundError(
                f"{root!r} has no SD3 text encoders (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/): "
                "point at the whole pipeline folder (as written by save_pretrained or a hub snapshot)")
        pipe = StableDiffusion3Pipeline.from_pretrained(root, transformer=None, vae=None, torch_dtype=torch_dtype,
                                                        local_files_only=True)
        if device is not None:
            pipe.to(device)
        return cls(pipe, max_sequence_length)

    # ------------------------------------------------------------------ properties
    def encoders(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in _ENCODERS if getattr(self.pipe, n, None) is not None}


    def config(self) -> dict[str, Any]:
        """JSON description (fingerprinted with the encoders' weights by the teacher)."""
        return {
            "encoders": {n: type(m).__name__ for n, m in self.encoders().items()},
            "max_sequence_length": self.max_sequence_length,
            "dtype": str(next(self.pipe.text_encoder.parameters()).dtype).removeprefix("torch."),
            "tokenizers": {n: len(getattr(self.pipe, n)) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")
                           if getattr(self.pipe, n, None) is not None},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The encoders' weights, named ``<encoder>.<param>`` (for fingerprints)."""
        return {f"{n}.{k}": v for n, m in self.encoders().items() for k, v in m.state_dict().items()}

    # ------------------------------------------------------------------ encoding
    def _encode_unique(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def encode(self, texts: Sequence[str]) -> PromptCondition:
        """PromptCondition (no negatives) for ``texts``; each distinct text is encoded once."""
        unique, rows = _unique_rows(texts)
        embeds, pooled = self._encode_unique(unique)
        if rows is None:
            return PromptCondition(embeds, pooled)
        idx = torch.tensor(rows, device=embeds.device)
        return PromptCondition(embeds[idx], pooled[idx])



class SD15PromptEncoder(_PipelinePromptEncoder):
    """Frozen SD1.5 / SD2 text encoder (one CLIP) behind ``StableDiffusionPipeline.encode_prompt``
    (see module docstring); ``encode`` returns ``models.diffusers.conditions.UNetCondition``."""

    def __init__(self, pipe):
        for name in ("text_encoder", "tokenizer"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"the pipeline has no {name}: SD1.5 prompt encoding needs its CLIP text encoder "
                                 "and tokenizer")
        self.pipe = pipe
        self.pipe.text_encoder.requires_grad_(False).eval()
        self._null = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> SD15PromptEncoder:
        """Load text_encoder/ + tokenizer/ of the LOCAL SD1.5-style pipeline folder ``path`` (the UNet,
        VAE and safety checker are not loaded)."""
        from diffusers import StableDiffusionPipeline

        root = os.fspath(path)
        missing = missing_sd15_text_parts(root)
        if missing:
            raise FileNotFoundError(
                f"{root!r} has no {' or '.join(missing)}: SD1.5 prompt encoding needs the pipeline's CLIP text "
                "encoder and tokenizer (point at the whole pipeline folder, as written by save_pretrained or a "
                "hub snapshot, or condition on precomputed UNetCondition embeddings)")
        pipe = StableDiffusionPipeline.from_pretrained(
            root, unet=None, vae=None, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False, torch_dtype=torch_dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        return cls(pipe)


    def config(self) -> dict[str, Any]:
        """JSON description (fingerprinted with the encoder's weights by the teacher)."""
        te = self.pipe.text_encoder
        return {
            "encoders": {"text_encoder": type(te).__name__},
            "dtype": str(next(te.parameters()).dtype).removeprefix("torch."),
            "tokenizers": {"tokenizer": len(self.pipe.tokenizer)},
            "model_max_length": int(self.pipe.tokenizer.model_max_length),
            "clip_skip": None,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, named ``text_encoder.<param>`` (for fingerprints)."""
        return {f"text_encoder.{k}": v for k, v in self.pipe.text_encoder.state_dict().items()}

    def encode(self, texts: Sequence[str]):
        """UNetCondition (no negatives) for ``texts``; each distinct text is encoded once."""
        from models.diffusers.conditions import UNetCondition

        unique, rows = _unique_rows(texts)
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(unique, self.device, 1, False)
        if rows is not None:
            embeds = embeds[torch.tensor(rows, device=embeds.device)]
        return UNetCondition(embeds)


class SDXLPromptEncoder(_PipelinePromptEncoder):
    """Frozen SDXL text encoders (two CLIPs) behind ``StableDiffusionXLPipeline.encode_prompt`` (see
    module docstring); ``encode`` returns ``models.diffusers.conditions.UNetCondition`` with
    ``prompt_embeds`` [B, 77, D1 + D2], ``pooled_prompt_embeds`` [B, P] and ``time_ids`` [1, 6].

    ``vae_scale_factor``: pixels per latent cell (default: the pipeline's, which is 8 when it was
    loaded without its VAE, as SDXL's is). ``image_size``: (H, W) in pixels for the time ids; set it
    here or through ``set_latent_size`` before encoding.
    """

    is_sdxl = True

    def __init__(self, pipe, vae_scale_factor: int | None = None, image_size: Sequence[int] | None = None):
        for name in SDXL_TEXT_PARTS:
            if getattr(pipe, name, None) is None:
                raise ValueError(f"the pipeline has no {name}: SDXL prompt encoding needs both CLIP text encoders "
                                 "and their tokenizers")
        self.pipe = pipe
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            enc.requires_grad_(False).eval()
        self.vae_scale_factor = int(vae_scale_factor or pipe.vae_scale_factor)
        self.image_size: tuple[int, int] | None = None
        self._null = None
        if image_size is not None:
            self.set_image_size(*image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        image_size: Sequence[int] | None = None) -> SDXLPromptEncoder:
        """Load text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/ of the LOCAL SDXL pipeline
        folder ``path`` (the UNet and VAE are not loaded; the VAE scale factor is read from
        vae/config.json when present, else SDXL's 8)."""
        from diffusers import StableDiffusionXLPipeline

        root = os.fspath(path)
        missing = missing_sdxl_text_parts(root)
        if missing:
            raise FileNotFoundError(
                f"{root!r} has no {' or '.join(missing)}: SDXL prompt encoding needs the pipeline's two CLIP text "
                "encoders and tokenizers (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/; point at the "
                "whole pipeline folder, as written by save_pretrained or a hub snapshot, or condition on "
                "precomputed UNetCondition embeddings)")
        pipe = StableDiffusionXLPipeline.from_pretrained(
            root, unet=None, vae=None, image_encoder=None, feature_extractor=None, torch_dtype=torch_dtype,
            local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        return cls(pipe, vae_scale_factor_of(root), image_size)

    # ------------------------------------------------------------------ generation size
    def set_image_size(self, height: int, width: int) -> None:
        """The generation resolution in pixels (original = target size of the time ids)."""
        size = (int(height), int(width))
        if min(size) < 1:
            raise ValueError(f"image size must be positive, got {size}")
        if size != self.image_size:
            self.image_size = size
            self._null = None

    def set_latent_size(self, height: int, width: int) -> None:
        """The generation resolution from the latent's size: (h, w) x ``vae_scale_factor`` pixels."""
        self.set_image_size(int(height) * self.vae_scale_factor, int(width) * self.vae_scale_factor)

    def time_ids(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """[[H, W, 0, 0, H, W]]: StableDiffusionXLPipeline's default add_time_ids (original size,
        crop top-left, target size) at ``image_size``."""
        if self.image_size is None:
            raise ValueError("SDXL time ids need the generation resolution: call set_image_size / set_latent_size "
                             "(DiffusersUNetTeacher does, from its sample shape)")
        h, w = self.image_size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))

    @property
    def embed_dim(self) -> int:
        """Width of ``prompt_embeds``: D1 + D2 (the UNet's cross_attention_dim)."""
        return int(self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled_prompt_embeds``: encoder 2's projection_dim."""
        return int(self.pipe.text_encoder_2.config.projection_dim)

    def config(self) -> dict[str, Any]:
        """JSON description (fingerprinted with the encoders' weights by the teacher)."""
        p = self.pipe
        return {
            "encoders": {"text_encoder": type(p.text_encoder).__name__,
                         "text_encoder_2": type(p.text_encoder_2).__name__},
            "dtype": str(next(p.text_encoder.parameters()).dtype).removeprefix("torch."),
            "tokenizers": {"tokenizer": len(p.tokenizer), "tokenizer_2": len(p.tokenizer_2)},
            "model_max_length": [int(p.tokenizer.model_max_length), int(p.tokenizer_2.model_max_length)],
            "clip_skip": None,
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "vae_scale_factor": self.vae_scale_factor,
            "time_ids": {"original_size": None if self.image_size is None else list(self.image_size),
                         "crops_coords_top_left": [0, 0],
                         "target_size": None if self.image_size is None else list(self.image_size)},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """Both encoders' weights, named ``text_encoder.<param>`` / ``text_encoder_2.<param>`` (for fingerprints)."""
        return {f"{n}.{k}": v for n in ("text_encoder", "text_encoder_2")
                for k, v in getattr(self.pipe, n).state_dict().items()}

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: Sequence[str]):
        """UNetCondition (no negatives; time ids [1, 6] shared by the batch) for ``texts``; each
        distinct text is encoded once."""
        from models.diffusers.conditions import UNetCondition

        unique, rows = _unique_rows(texts)
        time_ids = self.time_ids()  # fail before encoding when the resolution is unknown
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=unique, prompt_2=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
        if rows is not None:
            idx = torch.tensor(rows, device=embeds.device)
            embeds, pooled = embeds[idx], pooled[idx]
        return UNetCondition(embeds, None, pooled, None, time_ids.to(embeds.device, embeds.dtype))

    def null_condition(self):
        """The stock pipeline's CFG negative for an empty negative prompt, batch 1: zeros (embeddings
        and pooled) with ``force_zeros_for_empty_prompt``, else the empty prompt's embeddings."""
        if self._null is None:
            null = self.encode([""])
            if self.force_zeros_for_empty_prompt:
                null = type(null)(torch.zeros_like(null.prompt_embeds), None,
                                  torch.zeros_like(null.pooled_prompt_embeds), None, null.time_ids)
            self._null = null
        return self._null
