"""The ``Student`` interface: what the Trainer needs from any student family, and nothing else.

One implementation per family (``trainer.students.flownet.FlowNetStudent``, ``.sd3.SD3Student``,
``.unet.UNetStudent``); ``trainer.students.student_class_for(card)`` picks it from the corpus's teacher
kind. The Trainer holds no ``if kind == ...``: every difference between families is a method here.

Conditions are tuples of tensors (or None) in the network's forward order after ``(x_BX, sigma_B)``:
``(class_B | None, guidance_B | None)`` for flow nets, ``(prompt_embeds_BLD, pooled_BP)`` for SD3,
``(prompt_embeds_BLD, pooled_BP | None, time_ids_B6 | None)`` for UNets. Rows of the corpus batch, of
the online windows and of the adversarial part are concatenated position-wise (``cat_conditions``), so
one forward serves every part of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch

Condition = tuple[torch.Tensor | None, ...]
#: v_BX = sampler(x_BX, sigma_B, *condition), without gradients
Sampler = Callable[..., torch.Tensor]

#: what a family can do; refusals are checked against these in one place (``check_run``)
CAPABILITIES = ("ota:fresh", "ota:student", "ota:perflow", "ota:online_only", "adversarial", "fsdp2")


class Student(Protocol):
    """A student family as the Trainer sees it (see the module docstring)."""

    #: student kind recorded in checkpoints' net_config and the export ("flownet", "sd3", "unet")
    kind: ClassVar[str]
    #: the subset of ``CAPABILITIES`` this family supports
    capabilities: ClassVar[frozenset[str]]
    #: the network the optimizer trains (accelerate wraps it for DDP)
    network: torch.nn.Module
    #: draws real samples for ``--ota-mode perflow`` (n, guidance, class) -> x0, or None
    real_sampler: Callable[..., torch.Tensor] | None

    @classmethod
    def check_corpus(cls, card, cfg) -> None:
        """Raise ValueError for a corpus (or setting) this family cannot train on."""

    def corpus_condition(self, batch: dict[str, Any]) -> Condition:
        """The forward arguments after (x, sigma) for a corpus batch's rows."""

    def online_condition(self, online) -> Condition:
        """The forward arguments for an ``OTABatch``'s rows (class/guidance or prompt texts)."""

    def discriminator_condition(self, cond: Condition) -> Condition:
        """The discriminator's arguments after (x, sigma) for rows with student condition ``cond``."""

    def sampler(self, autocast: Callable, device: torch.device) -> Sampler:
        """The weights this family samples with while training (OTA student mode, the adversarial walk)."""

    def ema_sampler(self, ema: dict[str, torch.Tensor] | None, autocast: Callable, device: torch.device):
        """Context manager: a sampler with the EMA weights ``ema`` (None: the current weights), for evaluation."""

    def build_discriminator(self, cfg) -> torch.nn.Module:
        """The discriminator on trajectory states (``capabilities`` has "adversarial")."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that train, by name: checkpoint key "model" and what the EMA follows."""

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """Fresh EMA storage for ``trainable_state_dict()`` (same names; updated in place by the EMA)."""

    def net_config(self) -> dict[str, Any]:
        """JSON description of the network (checkpoint key "net_config")."""

    def export(self, weights: dict[str, torch.Tensor], folder: str, run: dict[str, Any]) -> list[str]:
        """Write the exported student with ``weights`` into the LOCAL ``folder``; files relative to it.
        ``run``: data, steps, stages, alpha, window_points, ema (bool)."""

    def step_metrics(self) -> dict[str, float]:
        """Family-specific counters logged with every step (e.g. prompt-cache hits)."""

    def preview_images(self, x_BX: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str] | None:
        """Optional (the Trainer treats a family without it as showing none: flow nets, whose samples are
        vectors): (RGB images [B, 3, H, W] in [0, 1], how they were made) of samples ``x_BX`` for the validation
        sample grid (``trainer.samples``); None: no images."""


def check_capabilities(cls, cfg) -> None:
    """The refusals of settings a family does not support, with the flag to change (before any pool starts)."""
    caps, name = cls.capabilities, cls.display_name
    if cfg.ota_ratio >= 1 and "ota:online_only" not in caps:
        raise ValueError(f"--ota-ratio 1 (online rollouts only) is not supported for {name}; use a ratio below 1 "
                         "(the corpus part carries every step)")
    if cfg.ota_ratio > 0 and f"ota:{cfg.ota_mode}" not in caps:
        modes = sorted(c.split(":")[1] for c in caps if c.startswith("ota:") and c != "ota:online_only")
        raise ValueError(f"--ota-mode {cfg.ota_mode} is not supported for {name} yet; use --ota-mode "
                         f"{' or '.join(modes)}")
    if cfg.adv_weight > 0 and "adversarial" not in caps:
        raise ValueError(f"--adv-weight (adversarial distillation) is not supported for {name} yet")
    if getattr(cfg, "parallelism", "ddp") == "fsdp2" and "fsdp2" not in caps:
        raise ValueError(f"--parallelism fsdp2 shards diffusers students (SD3, SD1.5/SDXL UNet); {name} train with "
                         "DDP: drop --parallelism (or pass --parallelism ddp)")


def cat_conditions(conds: Sequence[Condition]) -> Condition:
    """Position-wise concatenation of conditions (None stays None; every part has the same arity)."""
    return tuple(None if parts[0] is None else torch.cat(list(parts)) for parts in zip(*conds))


def select_condition(cond: Condition, rows: torch.Tensor) -> Condition:
    """The rows ``rows`` (a bool mask or an index tensor) of every tensor of ``cond``."""
    return tuple(None if t is None else t[rows.to(t.device)] for t in cond)


def condition_to(cond: Condition, device) -> Condition:
    return tuple(None if t is None else t.to(device) for t in cond)
