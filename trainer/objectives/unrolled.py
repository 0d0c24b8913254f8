"""The unrolled solve: the student's own few-step Euler solve from each stored noise, with gradient
through every step, against the stored endpoint (the error the user sees, including how the steps'
errors compound)."""

from __future__ import annotations

from typing import ClassVar

import torch

from flowcore.solvers import euler_walk
from flowcore.windows import stage_boundary_indices
from trainer.objectives.base import MicroBatch, Objective, Rows
from trainer.students.base import UNROLLED_REFUSAL, condition_to


class UnrolledObjective(Objective):
    """Mean squared distance between the student's ``stage``-step Euler solve from each trajectory's stored
    noise (its state at sigma 1) and the stored endpoint; rows that are not valid do not count. Its forwards
    are its own (one per step of the solve), not part of the shared forward."""

    name: ClassVar[str] = "unrolled"
    requires: ClassVar[frozenset[str]] = frozenset({"objective:unrolled"})

    @classmethod
    def active(cls, cfg, default_objective: str) -> bool:
        return (cfg.objective or default_objective) == cls.name

    @classmethod
    def refusal(cls, student_cls) -> str:
        return UNROLLED_REFUSAL.format(display_name=student_cls.display_name)

    def __init__(self, ctx):
        super().__init__(ctx)
        self._loss: torch.Tensor | None = None

    def prepare(self, mb: MicroBatch) -> Rows | None:
        # computed here, before the other objectives draw from the generator or walk the student, so the
        # step's order of forwards is the one it always was
        self._loss = None if mb.batch is None else self.solve_loss(mb.batch, mb.cond, mb.valid, mb.stage)
        return None

    def loss(self, mb: MicroBatch, v_BX) -> tuple[torch.Tensor | None, dict[str, float]]:
        out, self._loss = self._loss, None
        return out, {}

    def solve_loss(self, batch, cond, valid: torch.Tensor, stage: int) -> torch.Tensor:
        """The unrolled loss of a corpus ``batch`` whose rows have student condition ``cond``."""
        acc, model = self.ctx.accelerator, self.ctx.model
        device = acc.device
        states, sig = batch["states"], batch["sigmas"][0].float()
        bounds = stage_boundary_indices(states.shape[1], stage)
        rows = condition_to(cond, device)

        def velocity(x, sigma_B):
            with acc.autocast():
                v = model(x, sigma_B, *rows)
            return v.float()

        x = euler_walk(velocity, states[:, 0].to(device).float(), [float(sig[i]) for i in bounds])
        err = ((x - states[:, bounds[-1]].to(device).float()) ** 2).flatten(1).mean(1)
        mask = valid.to(device)
        if bool(mask.all()):
            return err.mean()
        return err[mask].mean() if bool(mask.any()) else err.sum() * 0.0
