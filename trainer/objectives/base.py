"""The objective protocol: what one training method adds to a step, and nothing the Trainer knows by name.

A step of the Trainer (``trainer.loop``) is, per micro-batch:

1. ``prepare`` of every active objective, in registration order (``trainer.objectives.OBJECTIVES``): each
   may return ``Rows`` that join ONE shared forward of the student (DDP keeps one pass per micro-batch), and
   may run forwards of its own (the unrolled solve's gradient walk, the adversarial no-grad walk). The
   objectives draw from the step's window generator in this order, so a run is reproducible.
2. the shared forward over every objective's rows;
3. the shared regression: rows that carry a ``target_BX`` (reflow windows of the corpus or of an online
   rollout) are regressed together with the aligned-v loss (``flowcore.losses``), one mean over all such rows
   of the micro-batch (ProReflow's batch mixing: a corpus row and an online row weigh the same);
4. ``loss`` of every objective, given the velocities of its own target-less rows: its extra loss term;
5. one backward of the total, then ``after_backward`` (an auxiliary network's own backward, e.g. the
   discriminator's);

then, per optimizer step, the Trainer's clip / step / EMA tail and ``optimizer_step`` of every objective
(auxiliary optimizers). Metrics are returned, never written into a shared dict. Checkpoint state is declared
by ``stateful`` (``trainer.checkpointer``). The math lives in ``flowcore``; an objective module is glue.

Adding a method: one module with an ``Objective`` subclass, plus its line in ``OBJECTIVES`` (or a call to
``register``); ``tests/test_objective_contract.py`` shows one defined inside the test suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from trainer.students.base import Condition

#: the metric under which an objective reports how many samples it brought this step besides the corpus batch
#: (online rollouts): the progress line's samples/s counts them (per rank; summed over micro-batches)
EXTRA_SAMPLES = "online_in_step"


@dataclass
class Rows:
    """Inputs one objective adds to the step's shared forward: rows ``x_BX`` at ``sigma_B`` with the student's
    forward arguments ``cond``. Rows with ``target_BX`` join the shared aligned-v regression (``valid_B`` masks
    placeholder rows out of it); rows without a target come back to their objective's ``loss``."""

    x_BX: torch.Tensor
    sigma_B: torch.Tensor
    cond: Condition
    target_BX: torch.Tensor | None = None
    valid_B: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x_BX.shape[0])


@dataclass
class MicroBatch:
    """One micro-batch as every objective sees it. ``batch``: the corpus batch (None when training online
    only); ``cond``: its rows' student condition (computed once); ``valid``: its non-placeholder rows;
    ``stage``: the progressive stage's step count; ``g``: the step's window generator (seeded by seed, step,
    rank; consumed by the objectives in order)."""

    batch: dict[str, Any] | None
    cond: Condition | None
    valid: torch.Tensor
    stage: int
    g: torch.Generator
    #: True on the last micro-batch of the optimizer step (DDP all-reduces then)
    last: bool = True


@dataclass
class AuxState:
    """An auxiliary network an objective trains, with its optimizer, for the checkpointer: saved as
    ``extra[name]`` / ``extra_optimizers[name]`` (full format) or under the ``name.`` prefix (sharded).
    ``missing``: the message when a checkpoint to resume lacks it; ``upgrade_optimizer``: maps an optimizer
    state dict saved by an older layout of the network to the current one."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    missing: str
    upgrade_optimizer: Callable[[dict[str, Any]], dict[str, Any]] | None = None


@dataclass
class ObjectiveContext:
    """What an objective may use, handed over by the Trainer at build: the resolved run config, the accelerator,
    the student (``trainer.students.base.Student``) and its trainable (DDP-wrapped) network ``model``, the FSDP2
    helper (None under DDP), rank and world size, the card, and resources a caller handed the Trainer (the
    teacher pool's client for online rollouts)."""

    cfg: Any
    accelerator: Any
    student: Any
    model: torch.nn.Module
    fsdp: Any
    rank: int
    world: int
    card: Any
    online_only: bool
    rollout_teacher: Any = None
    resources: dict[str, Any] = field(default_factory=dict)


class Objective:
    """One training method (see the module docstring). Subclasses set ``name``, ``requires`` and override the
    hooks they need; every hook has a neutral default."""

    #: registry name (``--objective`` value for corpus objectives, else a label in logs and errors)
    name: ClassVar[str] = ""
    #: student capabilities (``trainer.students.base.CAPABILITIES``) this objective needs
    requires: ClassVar[frozenset[str]] = frozenset()
    #: metric names summed over the micro-batches of a step (the others keep the last micro-batch's value)
    summed_metrics: ClassVar[frozenset[str]] = frozenset()
    #: whether its loss term is added on top of the reflow fit (the adversarial term) rather than being the
    #: fit itself when no rows regress (the unrolled solve): the ``reflow_loss`` metric counts only the fit
    auxiliary: ClassVar[bool] = False

    @classmethod
    def active(cls, cfg, default_objective: str) -> bool:
        """Whether a run with ``cfg`` uses this objective (``default_objective``: the student family's corpus
        objective when ``cfg.objective`` is None)."""
        return False

    @classmethod
    def check(cls, cfg, rollout_teacher=None) -> None:
        """Refusals of ``cfg`` that need no corpus or student (raised when the Trainer is constructed)."""

    @classmethod
    def refusal(cls, student_cls) -> str:
        """The message when ``student_cls`` lacks a capability of ``requires``."""
        missing = sorted(cls.requires - student_cls.capabilities)
        return f"the {cls.name} objective needs {', '.join(missing)}, which {student_cls.display_name} do not support"

    def __init__(self, ctx: ObjectiveContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    def build(self) -> None:
        """Auxiliary networks, their optimizers and sharding, pools (after the student is built)."""

    def start(self, step: int, stage: int) -> None:
        """Before the first step of ``train()`` (e.g. put the first online requests in flight)."""

    def prepare(self, mb: MicroBatch) -> Rows | None:
        """Rows for the shared forward (None: none), and any forward of the objective's own."""
        return None

    def loss(self, mb: MicroBatch, v_BX: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(This objective's loss term or None, metrics), given the shared forward's velocities at the
        target-less rows ``prepare`` returned (None when it returned none)."""
        return None, {}

    def after_backward(self, mb: MicroBatch, scale: float) -> dict[str, float]:
        """After the student's backward of the micro-batch (losses are multiplied by ``scale``)."""
        return {}

    def optimizer_step(self) -> dict[str, float]:
        """After the student's optimizer step: auxiliary optimizers' steps."""
        return {}

    def progress(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Extra fields for the progress bar's postfix."""
        return {}

    def summary(self) -> str | None:
        """A phrase for the run's closing line (None: nothing to say)."""
        return None

    def stateful(self) -> dict[str, AuxState]:
        """Auxiliary networks to checkpoint, by name."""
        return {}

    def close(self) -> None:
        """Release what ``build`` started."""
