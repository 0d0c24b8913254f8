"""What the diffusers adapters share: device/dtype placement, config cleaning, dtype names, VAE scale."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from flowcore.teacher import fingerprint_of

__all__ = ["DenoiserPlacement", "json_clean", "dtype_of", "vae_scale_factor_of"]


def json_clean(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without private bookkeeping keys (``_class_name``, ``_name_or_path``,
    ``_diffusers_version``, ``_use_default_values``, ...), normalised through JSON (tuples -> lists)."""
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return json.loads(json.dumps(public, sort_keys=True))


def dtype_of(torch_dtype) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    name = str(torch_dtype).removeprefix("torch.")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype {torch_dtype!r}")
    return dt


class DenoiserPlacement:
    """dtype / device / ``to`` / ``fingerprint`` of a diffusers teacher: its ``denoiser`` network, its optional
    ``prompt_encoder`` and its optional ``null_condition`` move (and are hashed) together. Subclasses
    define ``denoiser``, ``_model_config()`` and ``_null_from_encoder``."""

    denoiser: torch.nn.Module
    prompt_encoder: Any
    null_condition: Any

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def fingerprint(self) -> str:
        """sha256 over the model config (``config()`` minus ``source``), the denoiser's state_dict, the text
        encoders' weights (when loaded) and an explicitly given null condition's tensors. A null condition
        made by the encoders is left out: it is a function of their (hashed) weights, and its float values
        depend on the machine's kernels (thread count, CPU or GPU), which must not change the teacher's
        identity. Stable across save_pretrained/from_pretrained."""
        tensors = dict(self.denoiser.state_dict())
        if self.null_condition is not None and not self._null_from_encoder:
            tensors.update({f"null_condition.{k}": v for k, v in self.null_condition.tensors().items()})
        if self.prompt_encoder is not None:
            tensors.update({f"text_encoders.{k}": v for k, v in self.prompt_encoder.tensors().items()})
        return fingerprint_of(self._model_config(), tensors)

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Move the denoiser (and prompt encoder, null condition) in place; returns self."""
        if dtype is None:  # diffusers warns about to(dtype=...) even when the dtype is None
            self.denoiser.to(device)
        else:
            self.denoiser.to(device=device, dtype=dtype)
        if self.prompt_encoder is not None and device is not None:
            self.prompt_encoder.to(device)
        if self.null_condition is not None:
            self.null_condition = self.null_condition.to(device=device)
        return self


def vae_scale_factor_of(path: str | os.PathLike) -> int | None:
    """2 ** (len(block_out_channels) - 1) from ``path/vae/config.json`` (as the stock pipelines compute
    it), or None when the folder has no VAE config."""
    cfg = os.path.join(os.fspath(path), "vae", "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        return 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
