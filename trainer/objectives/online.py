"""Online trajectory alignment (OTA): a share of every batch from the live teacher pool's rollouts
(``trainer.ota.OTAMixer`` keeps the requests in flight), as reflow windows in the shared regression."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from storage_schemas.locations import LocationPolicy
from trainer.objectives.base import EXTRA_SAMPLES, MicroBatch, Objective, Rows
from trainer.ota import OTAMixer, load_card_prompts


class OnlineObjective(Objective):
    """``--ota-ratio R``: R of each rank's batch are windows of the oldest finished rollout (``--ota-mode``
    fresh | student | perflow); a slow or absent pool costs samples (``ota_shortfall``), never a step."""

    name: ClassVar[str] = "online"
    summed_metrics: ClassVar[frozenset[str]] = frozenset({EXTRA_SAMPLES})

    @classmethod
    def active(cls, cfg, default_objective: str) -> bool:
        return cfg.ota_ratio > 0

    @classmethod
    def check(cls, cfg, rollout_teacher=None) -> None:
        if cfg.ota_ratio > 0 and rollout_teacher is None:
            raise ValueError("ota-ratio > 0 needs a teacher pool: `trajflow train` connects to one (see --address), "
                             "Python callers pass rollout_teacher=")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.mixer: OTAMixer | None = None
        self._rows = 0  # online rows of the current micro-batch

    def build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        prompts = None
        if ctx.card.conditioning.kind == "prompt":  # online requests draw from the corpus's prompt file
            policy = LocationPolicy(cfg.data, cfg.allow_teacher_locations)  # a card-named file: root or allowed
            prompts = load_card_prompts(ctx.card, cfg.storage_options,
                                        check_location=lambda loc: policy.check(loc, "the prompt file"))
        self.mixer = OTAMixer(ctx.rollout_teacher, ctx.card, mode=cfg.ota_mode, samples_per_step=cfg.ota_samples,
                              seed=cfg.seed, rank=ctx.rank, window_points=cfg.window_points,
                              prefetch=cfg.ota_prefetch, timeout_s=cfg.ota_timeout,
                              real_sampler=ctx.student.real_sampler, verbose=ctx.accelerator.is_main_process,
                              prompts=prompts)

    @property
    def stats(self) -> dict[str, int]:
        """The ota_* counters (samples, shortfall, failures, timeouts, stale)."""
        return self.mixer.stats

    def _student_fn(self):
        """The student's sampler for ``--ota-mode student`` requests (None in the other modes)."""
        if self.cfg.ota_mode != "student":
            return None
        return self.ctx.student.sampler(self.ctx.accelerator.autocast, self.ctx.accelerator.device)

    def start(self, step: int, stage: int) -> None:
        self.mixer.fill(stage, self._student_fn())  # the first rollouts are in flight before the first step
        self.mixer.wait_first(min(self.cfg.ota_timeout, 120.0))

    def prepare(self, mb: MicroBatch) -> Rows | None:
        ob = self.mixer.take(mb.stage, mb.g, wait=mb.batch is None)  # online only: nothing else to train on
        self.mixer.fill(mb.stage, self._student_fn())
        self._rows = 0 if ob is None else len(ob.windows.x_BX)
        if ob is None:
            if mb.batch is None:
                raise RuntimeError(f"no online rollout arrived within {self.cfg.ota_timeout:.0f} s and there is no "
                                   "corpus part (ota-ratio 1); is the teacher pool up?")
            return None
        w = ob.windows
        return Rows(w.x_BX, w.sigma_B, self.ctx.student.online_condition(ob), target_BX=w.v_target_BX,
                    valid_B=torch.ones(len(w.x_BX), dtype=torch.bool))

    def loss(self, mb: MicroBatch, v_BX) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {**self.mixer.stats, EXTRA_SAMPLES: self._rows}

    def progress(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"ota_short": metrics.get("ota_shortfall", 0)}

    def summary(self) -> str | None:
        st = self.mixer.stats
        return (f"online samples {st['ota_samples']}, shortfall {st['ota_shortfall']} "
                f"({st['ota_failures']} failed, {st['ota_timeouts']} timed-out rollouts)")

    def close(self) -> None:
        if self.mixer is not None:
            self.mixer.close()
