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
pipeline. SDXL (two encoders, pooled embeddings, time ids) is not covered: ``encode_prompts`` of an
SDXL UNet teacher raises NotImplementedError (give it precomputed ``UNetCondition`` embeddings).

``encode`` encodes each distinct text of a call once (batches built by cycling prompts repeat them)
and runs under ``torch.no_grad()``. Only local folders are loaded (``local_files_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from flowcore.diffusers_teacher import PromptCondition

__all__ = ["SD3PromptEncoder", "SD15PromptEncoder", "has_text_encoders", "missing_sd15_text_parts",
           "DEFAULT_MAX_SEQUENCE_LENGTH"]

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
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a list of prompt strings")
        texts = list(texts)
        if not texts:
            raise ValueError("no prompts to encode")
        unique = list(dict.fromkeys(texts))
        embeds, pooled = self._encode_unique(unique)
        if len(unique) == len(texts):
            return PromptCondition(embeds, pooled)
        where = {t: i for i, t in enumerate(unique)}
        idx = torch.tensor([where[t] for t in texts], device=embeds.device)
        return PromptCondition(embeds[idx], pooled[idx])



class SD15PromptEncoder(_PipelinePromptEncoder):
    """Frozen SD1.5 / SD2 text encoder (one CLIP) behind ``StableDiffusionPipeline.encode_prompt``
    (see module docstring); ``encode`` returns ``flowcore.diffusers_unet.UNetCondition``."""

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
        from flowcore.diffusers_unet import UNetCondition

        unique, rows = _unique_rows(texts)
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(unique, self.device, 1, False)
        if rows is not None:
            embeds = embeds[torch.tensor(rows, device=embeds.device)]
        return UNetCondition(embeds)

