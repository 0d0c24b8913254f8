"""Reflow windows (ProReflow): the corpus batch's windows of the current stage, regressed onto their
straight-line targets with aligned v-prediction in the Trainer's shared regression."""

from __future__ import annotations

from typing import ClassVar

from flowcore.windows import sample_windows
from trainer.objectives.base import MicroBatch, Objective, Rows


class WindowsObjective(Objective):
    """One window per corpus trajectory of the stage (``flowcore.windows.sample_windows``, points per
    ``--window-points``); the rows join the shared forward with their window's velocity target."""

    name: ClassVar[str] = "windows"

    @classmethod
    def active(cls, cfg, default_objective: str) -> bool:
        return (cfg.objective or default_objective) == cls.name

    def prepare(self, mb: MicroBatch) -> Rows | None:
        if mb.batch is None:
            return None
        wb = sample_windows(mb.batch["states"], mb.batch["sigmas"][0], mb.stage, self.cfg.window_points,
                            generator=mb.g)
        return Rows(wb.x_BX, wb.sigma_B, mb.cond, target_BX=wb.v_target_BX, valid_B=mb.valid)
