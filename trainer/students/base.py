"""The ``Student`` interface: what the Trainer, the CLI and the objectives need from any student family.

One implementation per family (``trainer.students.flownet.FlowNetStudent``, ``.sd3.SD3Student``,
``.unet.UNetStudent``), each a subclass of ``StudentBase`` (the interface's defaults);
``trainer.students.student_class_for(card)`` picks it from the corpus's teacher kind. Every difference
between families is a member declared here, so no caller needs ``getattr``/``hasattr`` on a student;
objectives a family may not train are refused by capability (``CAPABILITIES``), never by its kind.

Conditions are tuples of tensors (or None) in the network's forward order after ``(x_BX, sigma_B)``:
``(class_B | None, guidance_B | None)`` for flow nets, ``(prompt_embeds_BLD, pooled_BP)`` for SD3,
``(prompt_embeds_BLD, pooled_BP | None, time_ids_B6 | None)`` for UNets. Rows of the corpus batch, of
the online windows and of the adversarial part are concatenated position-wise (``cat_conditions``), so
one forward serves every part of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from trainer.students.folder import FolderKind

Condition = tuple[torch.Tensor | None, ...]
#: v_BX = sampler(x_BX, sigma_B, *condition), without gradients
Sampler = Callable[..., torch.Tensor]

#: what a family can do; refusals are checked against these in one place (``check_run``)
CAPABILITIES = ("ota:fresh", "ota:student", "ota:perflow", "ota:online_only", "adversarial", "fsdp2",
                "objective:unrolled")

#: the refusal of ``--objective unrolled`` for a family without "objective:unrolled" (``check_objective``)
UNROLLED_REFUSAL = ("--objective unrolled (the student's whole few-step solve, gradients through every step) is for "
                    "flow-net students; {display_name} train windows (drop --objective, or --objective windows)")


class Discriminator(Protocol):
    """A discriminator on trajectory states (``Student.build_discriminator``): an ``nn.Module`` called as
    ``D(x_BX, sigma_B, *student.discriminator_condition(cond)) -> (logit [B], [features per trunk block])``."""

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The submodules FSDP2 shards as units of their own before the whole module (``trainer.fsdp``)."""
        return []

    def upgrade_optimizer_state_dict(self, osd: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state dict saved by an earlier version of this discriminator, made to fit this one
        (the identity where its parameters never changed)."""
        return osd


class Student(Protocol):
    """A student family as the Trainer, the CLI and the objectives see it (see the module docstring).

    Members with a value or a body that returns are defaults (``StudentBase`` carries them); members that
    raise ``NotImplementedError`` every family defines."""

    # -- what the family is (class attributes) -----------------------------------------------------------
    #: student kind recorded in checkpoints' net_config and the export ("flownet", "sd3", "unet")
    kind: ClassVar[str]
    #: how messages name the family ("flow-net students", "diffusers students", ...)
    display_name: ClassVar[str]
    #: the card ``teacher.kind`` values this family distils (the family registry, ``trainer.students``)
    teacher_kinds: ClassVar[tuple[str, ...]]
    #: the subset of ``CAPABILITIES`` this family supports
    capabilities: ClassVar[frozenset[str]]
    #: default optimizer steps when neither --max-steps nor --steps-per-stage is given (``TrainConfig.default_steps``)
    DEFAULT_BUDGET: ClassVar[int]
    #: default samples per rank per step when --batch-size is not given (``TrainConfig.resolved``)
    DEFAULT_BATCH_SIZE: ClassVar[int]
    #: default --mixed-precision on a GPU with bf16 ("no" elsewhere; ``TrainConfig.resolved``)
    DEFAULT_MIXED_PRECISION_ON_BF16_GPU: ClassVar[str]
    #: the exported file under out/student/ that names the export ("": the whole folder)
    export_entry: ClassVar[str] = ""
    #: the kind of diffusers student folder it exports (``trainer.students.folder``); None: another export
    folder_kind: ClassVar[FolderKind | None] = None

    # -- what a built student holds ----------------------------------------------------------------------
    #: the network the optimizer trains (accelerate wraps it for DDP; FSDP2 shards ``fsdp_units()`` of it)
    network: torch.nn.Module
    #: draws real samples for ``--ota-mode perflow`` (n, guidance, class) -> x0, or None
    real_sampler: Callable[..., torch.Tensor] | None = None
    #: the corpus's teacher where the family keeps it (flow nets of GMM/flow-net corpora), else None
    teacher: Any = None
    #: what the corpus part trains when --objective is not given ("windows" | "unrolled"; may depend on the
    #: build, e.g. a flow net that starts as its teacher trains the unrolled solve)
    default_objective: str = "windows"

    @classmethod
    def build(cls, card, cfg, *, device, main_process_first: Callable | None = None,
              progress: bool = False) -> Student:
        """The student of corpus ``card`` for run config ``cfg`` on ``device``. ``main_process_first``: a
        context manager factory (accelerate's) around work that one process should do before the others
        (e.g. fitting and caching a net); None: none needed. ``progress``: show progress bars."""
        raise NotImplementedError

    @classmethod
    def check_corpus(cls, card, cfg) -> None:
        """Raise ValueError for a corpus (or setting) this family cannot train on (default: the capability
        refusals, ``check_capabilities``)."""
        check_capabilities(cls, cfg)

    # -- conditions ----------------------------------------------------------------------------------------
    def corpus_condition(self, batch: dict[str, Any]) -> Condition:
        """The forward arguments after (x, sigma) for a corpus batch's rows."""
        raise NotImplementedError

    def online_condition(self, online) -> Condition:
        """The forward arguments for an ``OTABatch``'s rows (class/guidance or prompt texts)."""
        raise NotImplementedError

    def discriminator_condition(self, cond: Condition) -> Condition:
        """The discriminator's arguments after (x, sigma) for rows with student condition ``cond``."""
        raise NotImplementedError

    # -- sampling ------------------------------------------------------------------------------------------
    def sampler(self, autocast: Callable, device: torch.device) -> Sampler:
        """The weights this family samples with while training (OTA student mode, the adversarial walk)."""
        raise NotImplementedError

    def ema_sampler(self, ema: dict[str, torch.Tensor] | None, autocast: Callable, device: torch.device):
        """Context manager: a sampler with the EMA weights ``ema`` (None: the current weights), for evaluation."""
        raise NotImplementedError

    def build_discriminator(self, cfg) -> Discriminator:
        """The discriminator on trajectory states (``capabilities`` has "adversarial")."""
        raise ValueError(f"--adv-weight (adversarial distillation) is not supported for {self.display_name} yet")

    # -- weights -------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that train, by name: checkpoint key "model" and what the EMA follows."""
        raise NotImplementedError

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load ``tensors`` (names of ``trainable_state_dict()``); ValueError/RuntimeError when they do not fit."""
        raise NotImplementedError

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """Fresh EMA storage for ``trainable_state_dict()`` (same names; updated in place by the EMA)."""
        raise NotImplementedError

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The submodules of ``network`` that FSDP2 shards as units of their own before the whole network
        (``--parallelism fsdp2``; families with "fsdp2"); []: the network is one unit."""
        return []

    def net_config(self) -> dict[str, Any]:
        """JSON description of the network (checkpoint key "net_config")."""
        raise NotImplementedError

    # -- export, logging, previews -------------------------------------------------------------------------
    def export(self, weights: dict[str, torch.Tensor], folder: str, run: dict[str, Any]) -> list[str]:
        """Write the exported student with ``weights`` into the LOCAL ``folder`` (``trainer.students.folder``);
        files relative to it. ``run``: data, steps, stages, alpha, window_points, ema (bool); optionally
        objective, selected, best_step, validation."""
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        """Family-specific counters logged with every step (e.g. prompt-cache hits)."""
        return {}

    def preview_images(self, x_BX: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str] | None:
        """(RGB images [B, 3, H, W] in [0, 1], how they were made) of samples ``x_BX`` for the validation
        sample grid (``trainer.samples``); None: no images (the default: flow nets, whose samples are vectors)."""
        return None


class StudentBase(Student):
    """The concrete base of every student family: the ``Student`` protocol's defaults (a Protocol gives none
    to classes that do not inherit from it). A family sets the class attributes without a default (``kind``,
    ``display_name``, ``teacher_kinds``, ``capabilities``, the three ``DEFAULT_*``: ``trainer.students`` checks
    them when it registers the family) and defines the methods that raise ``NotImplementedError``."""


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


def check_objective(cls, cfg) -> None:
    """The refusal of an objective the family cannot train (``--objective unrolled`` without the capability
    "objective:unrolled"); ``check_run`` runs it after the family's ``check_corpus``."""
    if getattr(cfg, "objective", None) == "unrolled" and "objective:unrolled" not in cls.capabilities:
        raise ValueError(UNROLLED_REFUSAL.format(display_name=cls.display_name))


def cat_conditions(conds: Sequence[Condition]) -> Condition:
    """Position-wise concatenation of conditions (None stays None; every part has the same arity)."""
    return tuple(None if parts[0] is None else torch.cat(list(parts)) for parts in zip(*conds))


def select_condition(cond: Condition, rows: torch.Tensor) -> Condition:
    """The rows ``rows`` (a bool mask or an index tensor) of every tensor of ``cond``."""
    return tuple(None if t is None else t[rows.to(t.device)] for t in cond)


def condition_to(cond: Condition, device) -> Condition:
    return tuple(None if t is None else t.to(device) for t in cond)
