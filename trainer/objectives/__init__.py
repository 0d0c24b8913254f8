"""Training objectives, one module each, behind one protocol (``trainer.objectives.base.Objective``).

``OBJECTIVES`` is the registry, in the order the objectives act within a step (corpus objective, online
rollouts, adversarial term): their ``prepare`` calls draw from the step's window generator in this order.
``register`` adds one (a new method is one module plus one ``register`` call or one line here);
``active_objectives`` picks a run's, ``check_requirements`` refuses, before anything is built, a run whose
student family lacks a capability an active objective requires.
"""

from __future__ import annotations

from trainer.objectives.adversarial import AdversarialObjective
from trainer.objectives.base import (
    EXTRA_SAMPLES,
    AuxState,
    MicroBatch,
    Objective,
    ObjectiveContext,
    Rows,
)
from trainer.objectives.online import OnlineObjective
from trainer.objectives.unrolled import UnrolledObjective
from trainer.objectives.windows import WindowsObjective

__all__ = ["OBJECTIVES", "EXTRA_SAMPLES", "AuxState", "MicroBatch", "Objective", "ObjectiveContext", "Rows",
           "register", "active_objectives", "check_requirements", "check_config"]

#: every objective, in step order
OBJECTIVES: list[type[Objective]] = [WindowsObjective, UnrolledObjective, OnlineObjective, AdversarialObjective]


def register(cls: type[Objective], *, before: str | None = None) -> type[Objective]:
    """Add an objective to the registry (at the end, or before the one named ``before``); returns ``cls``
    so it can decorate the class. Registering a name twice replaces the earlier class."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    OBJECTIVES[:] = [o for o in OBJECTIVES if o.name != cls.name]
    names = [o.name for o in OBJECTIVES]
    OBJECTIVES.insert(names.index(before) if before in names else len(OBJECTIVES), cls)
    return cls


def active_objectives(cfg, default_objective: str) -> list[type[Objective]]:
    """The objectives a run with ``cfg`` uses, in step order (``default_objective``: the student family's)."""
    return [o for o in OBJECTIVES if o.active(cfg, default_objective)]


def check_config(cfg, rollout_teacher=None) -> None:
    """Each objective's own refusals of ``cfg`` (no corpus or student needed: when the Trainer is made)."""
    for o in OBJECTIVES:
        if o.active(cfg, ""):
            o.check(cfg, rollout_teacher)


def check_requirements(student_cls, cfg) -> None:
    """Refuse, before anything is built, an objective of ``cfg`` whose ``requires`` the student family lacks
    (the objectives the config turns on; a family's own default objective is one it supports)."""
    for o in OBJECTIVES:
        if o.active(cfg, "") and not o.requires <= student_cls.capabilities:
            raise ValueError(o.refusal(student_cls))
