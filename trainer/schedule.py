"""The run's schedules as pure functions of the optimizer step: the progressive stage and the learning rate."""

from __future__ import annotations

from collections.abc import Sequence


def stage_at(step: int, stages: Sequence[int], stage_steps: Sequence[int]) -> int:
    """The stage (student step count) that optimizer step ``step`` trains: ``stages[i]`` for the
    ``stage_steps[i]`` steps of stage i, the last stage after them."""
    acc = 0
    for stage, n in zip(stages, stage_steps):
        acc += n
        if step < acc:
            return stage
    return stages[-1]


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps`` optimizer steps, then constant."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))
