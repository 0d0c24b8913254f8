"""The condition batches diffusers teachers and students consume (a leaf: adapters and encoders import it).

``PromptCondition``: SD3-class prompt embeddings (+ pooled, + optional negatives for CFG).
``UNetCondition``: SD1.5/SD2/SDXL UNet embeddings (SDXL: + pooled ``text_embeds`` and ``time_ids``).
Both support row selection, ``to``, ``expand``, ``cat`` and a named-tensor round trip
(``tensors`` / ``from_tensors``) for safetensors files and fingerprints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["PromptCondition", "UNetCondition", "select_rows"]


def select_rows(t: torch.Tensor, sel) -> torch.Tensor:
    if isinstance(sel, int):
        sel = slice(sel, sel + 1 if sel != -1 else None)
    if isinstance(sel, (list, tuple)):
        sel = torch.as_tensor(sel, dtype=torch.long)
    if isinstance(sel, torch.Tensor):
        sel = sel.to(t.device)
    return t[sel]


class _ConditionRows:
    """Row operations shared by the condition dataclasses (every field a [B or 1, ...] tensor or None;
    ``prompt_embeds`` always present): batch-1 tensors are shared rows, broadcast on demand."""

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def index(self, sel):
        """Rows ``sel`` (int, slice, list of ints, long or bool tensor); an int keeps the batch dim.
        Shared (batch-1) tensors stay shared."""
        B = self.batch_size

        def pick(t):
            if t is None:
                return None
            if t.shape[0] == 1 and B != 1:
                return t
            return select_rows(t, sel)

        return type(self)(*(pick(getattr(self, f.name)) for f in fields(self)))

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Move (and optionally cast) every tensor."""
        return type(self)(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device=device,
                                                                                              dtype=dtype)
                            for f in fields(self)))

    def expand(self, batch: int):
        """Broadcast batch-1 tensors (a shared condition, shared negatives) to ``batch`` rows."""
        def ex(t):
            if t is None or t.shape[0] == batch:
                return t
            if t.shape[0] != 1:
                raise ValueError(f"cannot broadcast a batch of {t.shape[0]} conditions to {batch}")
            return t.expand(batch, *t.shape[1:])

        return type(self)(*(ex(getattr(self, f.name)) for f in fields(self)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors (for safetensors files and fingerprints); absent ones are omitted."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]):
        """Inverse of ``tensors()``."""
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})


@dataclass
class PromptCondition(_ConditionRows):
    """A batch of SD3-style prompt embeddings.

    prompt_embeds: [B, L, D] (joint text embeddings: CLIP-L/G padded + T5, concatenated on L);
    pooled_prompt_embeds: [B, P] (pooled CLIP-L + CLIP-G).
    negative_prompt_embeds / negative_pooled_prompt_embeds: optional unconditional (negative-prompt)
    embeddings for CFG, either per row ([B, L, D] / [B, P]) or shared ([1, L, D] / [1, P]);
    both or neither. ``L`` and ``D`` must match the positive embeddings (one batched 2B call).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self):
        pe, pp = self.prompt_embeds, self.pooled_prompt_embeds
        if pe.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(pe.shape)}")
        if pp.ndim != 2:
            raise ValueError(f"pooled_prompt_embeds must be [B, P], got shape {tuple(pp.shape)}")
        if pp.shape[0] != pe.shape[0]:
            raise ValueError(
                f"prompt_embeds and pooled_prompt_embeds disagree on the batch: {pe.shape[0]} vs {pp.shape[0]}"
            )
        ne, npool = self.negative_prompt_embeds, self.negative_pooled_prompt_embeds
        if (ne is None) != (npool is None):
            raise ValueError("give both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
        if ne is not None:
            if ne.ndim != 3 or ne.shape[1:] != pe.shape[1:]:
                raise ValueError(
                    f"negative_prompt_embeds must be [B or 1, {pe.shape[1]}, {pe.shape[2]}] like prompt_embeds, "
                    f"got {tuple(ne.shape)}"
                )
            if npool.ndim != 2 or npool.shape[1:] != pp.shape[1:]:
                raise ValueError(
                    f"negative_pooled_prompt_embeds must be [B or 1, {pp.shape[1]}], got {tuple(npool.shape)}"
                )
            for name, t in (("negative_prompt_embeds", ne), ("negative_pooled_prompt_embeds", npool)):
                if t.shape[0] not in (1, pe.shape[0]):
                    raise ValueError(f"{name} must have batch 1 or {pe.shape[0]}, got {t.shape[0]}")

    @staticmethod
    def cat(conditions: Sequence[PromptCondition]) -> PromptCondition:
        """Concatenate along the batch; negatives must be present in all or none."""
        if not conditions:
            raise ValueError("nothing to concatenate")
        has = {c.has_negative for c in conditions}
        if len(has) != 1:
            raise ValueError("cannot concatenate conditions with and without negative embeddings")
        parts = [c.expand(c.batch_size) for c in conditions]
        out = [torch.cat([c.prompt_embeds for c in parts]), torch.cat([c.pooled_prompt_embeds for c in parts])]
        if has == {True}:
            out += [
                torch.cat([c.negative_prompt_embeds for c in parts]),
                torch.cat([c.negative_pooled_prompt_embeds for c in parts]),
            ]
        return PromptCondition(*out)

@dataclass
class UNetCondition(_ConditionRows):
    """A batch of prompt embeddings for a diffusers UNet.

    prompt_embeds: [B, L, D] (``encoder_hidden_states``: CLIP text encoder last hidden states for
    SD1.5/SD2; both CLIP encoders' penultimate states concatenated for SDXL).
    negative_prompt_embeds: optional unconditional embeddings for CFG, [B or 1, L, D].
    SDXL only: pooled_prompt_embeds [B, P] (``text_embeds``), negative_pooled_prompt_embeds
    [B or 1, P] (both or neither with the negative embeddings), time_ids [B or 1, 6]
    (original size, crop top-left, target size; used for both CFG halves, as the SDXL pipeline
    does by default).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __post_init__(self):
        pe = self.prompt_embeds
        if pe.ndim != 3:
            raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(pe.shape)}")
        B = pe.shape[0]
        ne = self.negative_prompt_embeds
        if ne is not None and (ne.ndim != 3 or ne.shape[1:] != pe.shape[1:] or ne.shape[0] not in (1, B)):
            raise ValueError(f"negative_prompt_embeds must be [{B} or 1, {pe.shape[1]}, {pe.shape[2]}], "
                             f"got {tuple(ne.shape)}")
        pp, npool = self.pooled_prompt_embeds, self.negative_pooled_prompt_embeds
        if pp is not None and (pp.ndim != 2 or pp.shape[0] != B):
            raise ValueError(f"pooled_prompt_embeds must be [{B}, P], got {tuple(pp.shape)}")
        if npool is not None:
            if pp is None or ne is None:
                raise ValueError("negative_pooled_prompt_embeds needs pooled_prompt_embeds and negative_prompt_embeds")
            if npool.ndim != 2 or npool.shape[1:] != pp.shape[1:] or npool.shape[0] not in (1, B):
                raise ValueError(f"negative_pooled_prompt_embeds must be [{B} or 1, {pp.shape[1]}], "
                                 f"got {tuple(npool.shape)}")
        if pp is not None and ne is not None and npool is None:
            raise ValueError("an SDXL condition with negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        ti = self.time_ids
        if ti is not None and (ti.ndim != 2 or ti.shape[0] not in (1, B)):
            raise ValueError(f"time_ids must be [{B} or 1, N], got {tuple(ti.shape)}")

    @staticmethod
    def cat(conditions: Sequence[UNetCondition]) -> UNetCondition:
        """Concatenate along the batch (batch-1 tensors are broadcast first); each optional tensor
        must be present in all conditions or in none."""
        if not conditions:
            raise ValueError("nothing to concatenate")
        parts = [c.expand(c.batch_size) for c in conditions]
        out = []
        for f in fields(UNetCondition):
            ts = [getattr(c, f.name) for c in parts]
            present = {t is not None for t in ts}
            if len(present) != 1:
                raise ValueError(f"cannot concatenate conditions with and without {f.name}")
            out.append(torch.cat(ts) if present == {True} else None)
        return UNetCondition(*out)
