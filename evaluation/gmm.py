"""Few-step sampling and evaluation against the teacher (exact metrics for GMM teachers).

For a GMM teacher every figure has a ground truth: the teacher's high-accuracy ODE endpoint from
the same noise (coupling error), the true mixture (sliced Wasserstein distance, exact negative
log-likelihood, Bayes class accuracy), and the teacher's own states at window boundaries (one-jump
error per window). The teacher's own 4- and 32-step Euler figures (corrected grid, and diffusers'
default 4-step grid) are reported next to the student's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowcore.metrics import coupling_error, sliced_wasserstein
from flowcore.schedules import few_step_sigmas, shifted_sigmas
from flowcore.solvers import seeded_noise, solve, solve_teacher
from models.diffusers.schedulers import diffusers_default_sigmas
from models.gmm import GMMTeacher

EVAL_SEED_BASE = 10**15  # far from the 63-bit hashed training seeds' typical values; fixed for comparability


def student_velocity_fn(net, cls, guidance):
    p = next(net.parameters())

    @torch.no_grad()
    def fn(x, sigma_B):
        out = net(x.to(p.device, p.dtype), sigma_B.to(p.device, p.dtype), cls.to(p.device) if cls is not None else None,
                  guidance.to(p.device, p.dtype) if guidance is not None else None)
        return out.to(x.dtype)

    return fn


def _quality(teacher: GMMTeacher, x, ref, true_x, cls) -> dict[str, float]:
    D = x[0].numel()
    out = {"coupling_error": coupling_error(x, ref), "swd": sliced_wasserstein(x, true_x)}
    if cls is not None:
        out["nll_per_dim"] = float(-teacher.log_prob(x, cls).mean()) / D
        out["class_accuracy"] = float((teacher.classify(x) == cls).double().mean())
    else:
        out["nll_per_dim"] = float(-teacher.log_prob(x).mean()) / D
    return out


def evaluate_gmm(student, teacher: GMMTeacher, *, shift: float, guidance: float, steps=(1, 2, 4),
                 num_samples: int = 2000, reference_steps: int = 256, teacher_steps=(4, 32),
                 default_grid_steps=(4,)) -> dict[str, Any]:
    """Metrics of a student FlowNet (or None: teacher only) against a GMM teacher.

    The teacher's own Euler sampling is reported at ``teacher_steps`` on the corrected grid
    (``few_step_sigmas``) and at ``default_grid_steps`` on diffusers' default FlowMatchEuler grid.
    """
    shape = teacher.sample_shape
    seeds = [EVAL_SEED_BASE + i for i in range(num_samples)]
    noise = seeded_noise(seeds, shape, torch.float64)
    cls = None if teacher.num_classes is None else torch.arange(num_samples) % teacher.num_classes
    g = torch.full((num_samples,), float(guidance), dtype=torch.float64)
    if reference_steps % math.lcm(*steps) != 0:
        raise ValueError(f"reference_steps {reference_steps} must be a multiple of every evaluated step count")
    ref_grid = shifted_sigmas(reference_steps, shift)
    ref = solve_teacher(teacher, noise, ref_grid, cond=cls, guidance=g, method="heun")
    ref_states = {s: ref.states_BKX[:, i] for i, s in enumerate(ref.sigmas_K.tolist())}
    ref_end = ref.final
    gen = torch.Generator().manual_seed(12345)
    true_x, _ = teacher.sample(num_samples, gen, cls)
    true_x = true_x.double()
    report: dict[str, Any] = {"num_samples": num_samples, "shift": shift, "guidance": guidance,
                              "reference": f"teacher Heun {reference_steps} steps", "teacher": {}, "student": {}}
    report["reference_quality"] = {"swd": sliced_wasserstein(ref_end, true_x)}

    def teacher_run(grid):
        return solve_teacher(teacher, noise, grid, cond=cls, guidance=g, capture_sigmas=[grid[-1]]).final

    for n in teacher_steps:
        report["teacher"][f"{n}_steps"] = _quality(teacher, teacher_run(few_step_sigmas(n, shift)), ref_end, true_x, cls)
    for n in default_grid_steps:
        report["teacher"][f"{n}_steps_diffusers_default_grid"] = _quality(
            teacher, teacher_run([float(s) for s in diffusers_default_sigmas(n, shift)]), ref_end, true_x, cls)
    if student is None:
        return report
    student = student.double().eval()
    vfn = student_velocity_fn(student, cls, g if student.cfg.guidance_cond else None)
    for n in steps:
        grid = few_step_sigmas(n, shift)
        x = solve(vfn, noise, grid, capture_sigmas=[0.0]).final
        q = _quality(teacher, x, ref_end, true_x, cls)
        # one-jump error per window: start on the teacher's own state, jump once, compare with its end
        jumps, teacher_jumps = [], []
        tfn = lambda x_, s_: teacher.velocity(x_, s_, cls, g)  # noqa: E731
        for k in range(n):
            s0, s1 = grid[k], grid[k + 1]
            x0, x1 = ref_states[s0], ref_states[s1]
            sig = torch.full((num_samples,), s0, dtype=torch.float64)
            jumps.append(coupling_error(x0 + (s1 - s0) * vfn(x0, sig), x1))
            teacher_jumps.append(coupling_error(x0 + (s1 - s0) * tfn(x0, sig), x1))
        q["one_jump_error_per_window"] = jumps
        q["teacher_one_jump_error_per_window"] = teacher_jumps
        report["student"][f"{n}_steps"] = q
    return report
