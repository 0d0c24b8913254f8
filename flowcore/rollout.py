"""Teacher rollouts on per-sample sigma grids: what online trajectory alignment (OTA) asks a teacher for.

A rollout request is a batch of start states and, for each sample, its own solver grid:

    states_BMX = teacher_rollout(teacher, x_start_BX, sigmas_BS, save=[0, S], cond=..., guidance=...)

``sigmas_BS`` [B, S+1] holds one strictly decreasing grid per row (rows may differ: in ``student``
mode each sample solves a different window, but every window of a stage spans the same number of
solver steps, so the grids have equal length). ``save`` picks the grid points whose states are
returned. Every returned state is a solver state (never an interpolation), exactly as in a corpus.

``cond`` is what the teacher's ``velocity`` takes (a class-id tensor, None, or a prompt condition),
or, for prompt-conditioned teachers (diffusers SD3 / SD1.5 / SDXL), the prompt TEXTS of the batch
(``list[str]``, one per sample): the teacher then encodes them with its own ``encode_prompts``, once
per distinct text of the request (``prompt_condition``), and solves with CFG at ``guidance``.

``RolloutTeacher`` is the protocol the trainer consumes: ``submit`` returns a
``concurrent.futures.Future`` so rollouts are requested ahead and the training step never waits.
``LocalRollout`` serves it in-process from a thread (tests, benchmarks, single-machine runs); the
live teacher pool's client in ``pipeline.pool`` serves it from Ray replicas. flowcore knows neither
Ray nor storage.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from flowcore.solvers import SOLVERS
from flowcore.tensors import expand_like


def check_grids(sigmas_BS: torch.Tensor, batch: int) -> None:
    """Raise ValueError unless ``sigmas_BS`` is [batch, S+1], S >= 1, each row strictly decreasing in [0, 1]."""
    if sigmas_BS.ndim != 2 or sigmas_BS.shape[0] != batch or sigmas_BS.shape[1] < 2:
        raise ValueError(f"sigma grids must have shape [{batch}, S+1] with S >= 1, got {tuple(sigmas_BS.shape)}")
    if not bool(torch.isfinite(sigmas_BS).all()):
        raise ValueError("sigma grids contain NaN or inf")
    if bool((sigmas_BS[:, 1:] >= sigmas_BS[:, :-1]).any()):
        raise ValueError("every sigma grid must be strictly decreasing")
    if bool((sigmas_BS > 1).any()) or bool((sigmas_BS < 0).any()):
        raise ValueError("sigmas must lie in [0, 1]")


def is_prompt_list(cond: Any) -> bool:
    """True for a condition given as prompt texts (a list or tuple of str)."""
    return isinstance(cond, (list, tuple)) and all(isinstance(t, str) for t in cond) and len(cond) > 0


def prompt_condition(teacher: Any, texts: Sequence[str]) -> Any:
    """The teacher's condition for ``texts`` [B]: each distinct text encoded once by ``teacher.encode_prompts``,
    rows repeated in the batch's order."""
    encode = getattr(teacher, "encode_prompts", None)
    if encode is None:
        raise ValueError(f"a rollout with prompt texts needs a teacher that encodes prompts; {type(teacher).__name__} "
                         "has no encode_prompts")
    unique = list(dict.fromkeys(texts))
    cond = encode(unique)
    if len(unique) == len(texts):
        return cond
    where = {t: i for i, t in enumerate(unique)}
    return cond.index(torch.tensor([where[t] for t in texts], dtype=torch.long))


@torch.no_grad()
def teacher_rollout(
    teacher: Any,
    x_start_BX: torch.Tensor,
    sigmas_BS: torch.Tensor,
    save: Sequence[int],
    *,
    cond: Any = None,
    guidance: float | torch.Tensor = 1.0,
    method: str = "euler",
) -> torch.Tensor:
    """Integrate the teacher's ODE from x_start_BX over each row's grid; states at ``save`` -> [B, len(save), *X].

    x_start_BX: [B, *X] states at sigmas_BS[:, 0]; sigmas_BS: [B, S+1]; save: increasing grid indices.
    cond: the teacher's condition, or B prompt texts (encoded here by the teacher, see module docstring).
    Heun takes an Euler step into sigma = 0, as ``flowcore.solvers.solve`` does.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {SOLVERS}")
    B = x_start_BX.shape[0]
    sigmas_BS = sigmas_BS.to(torch.float64)
    check_grids(sigmas_BS, B)
    S = sigmas_BS.shape[1] - 1
    save = [int(i) for i in save]
    if not save or save != sorted(set(save)) or save[0] < 0 or save[-1] > S:
        raise ValueError(f"save must be increasing grid indices in [0, {S}], got {save}")
    if not bool(torch.isfinite(x_start_BX).all()):
        raise ValueError("start states contain NaN or inf")
    if is_prompt_list(cond):
        if len(cond) != B:
            raise ValueError(f"a rollout of {B} samples got {len(cond)} prompt texts")
        cond = prompt_condition(teacher, list(cond))
    x = x_start_BX
    out = [x] if save[0] == 0 else []
    for i in range(S):
        s = sigmas_BS[:, i].to(x.device)
        s_next = sigmas_BS[:, i + 1].to(x.device)
        v = teacher.velocity(x, s.to(x.dtype), cond, guidance)
        h = expand_like((s_next - s).to(x.dtype), x)
        if method == "heun" and bool((s_next > 0).all()):
            v2 = teacher.velocity(x + h * v, s_next.to(x.dtype), cond, guidance)
            x = x + h * 0.5 * (v + v2)
        else:
            x = x + h * v
        if i + 1 in save:
            out.append(x)
    return torch.stack(out, dim=1)


@runtime_checkable
class RolloutTeacher(Protocol):
    """A teacher that serves rollouts asynchronously (the OTA side of the Teacher protocol)."""

    #: one sample's shape and the number of classes (None: unconditional), as in ``flowcore.teacher.Teacher``
    sample_shape: tuple[int, ...]
    num_classes: int | None

    def submit(
        self,
        x_start_BX: torch.Tensor,
        sigmas_BS: torch.Tensor,
        save: Sequence[int],
        cond: Any = None,
        guidance: float | torch.Tensor = 1.0,
        method: str = "euler",
    ) -> cf.Future:
        """Request a rollout with solver ``method``; the future resolves to states [B, len(save), *X]
        (float32, CPU) or raises."""
        ...


class LocalRollout:
    """``RolloutTeacher`` over an in-process Teacher, solved on a background thread.

    torch releases the GIL inside its kernels, so a rollout overlaps the training step on another core.
    """

    def __init__(self, teacher: Any, max_workers: int = 1):
        self.teacher = teacher
        self.sample_shape = tuple(teacher.sample_shape)
        self.num_classes = teacher.num_classes
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rollout")

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()

    def rollout(self, x_start_BX, sigmas_BS, save, cond=None, guidance=1.0, method="euler") -> torch.Tensor:
        return teacher_rollout(self.teacher, x_start_BX, sigmas_BS, save, cond=cond, guidance=guidance,
                               method=method).float().cpu()

    def submit(self, x_start_BX, sigmas_BS, save, cond=None, guidance=1.0, method="euler") -> cf.Future:
        if is_prompt_list(cond):
            cond = list(cond)
        return self._pool.submit(self.rollout, x_start_BX, sigmas_BS, list(save), cond, guidance, method)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
