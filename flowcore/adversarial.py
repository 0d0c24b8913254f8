"""Adversarial distillation on ODE trajectory states (FlowSteer): the losses and the student's judged step.

A discriminator D(x, sigma, condition) tells *teacher* states at the student's sigmas (real: the
authentic states of the same noise) from the *student's* rollout states at the same sigmas (fake), and
returns its logit and per-block features for feature matching. The networks are the families' own
(``trainer/students/*_discriminator.py``); this module holds only the math they share:

    discriminator (hinge):  E[relu(1 - D(real))] + E[relu(1 + D(fake))]
    generator:              adv_weight * E[-D(fake)] + fm_weight * sum_l mean((f_l(fake) - f_l(real))^2)

Which state the student is judged at: the output of one of its N steps, drawn per sample with
``step_probs`` (first step's output ... final sample). FlowSteer's weighting for 4 steps puts 0.4
on one step and 0.2 on the others; we put it on the final sample, the one users see
(``DEFAULT_STEP_PROBS``); other step counts default to uniform. ``student_last_step_inputs`` walks the
student (``flowcore.solvers.euler_walk``) to where that judged step starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowcore.solvers import euler_walk

#: probabilities of judging the output of step 1..4 of a 4-step student (final sample last)
DEFAULT_STEP_PROBS = (0.2, 0.2, 0.2, 0.4)


def discriminator_hinge_loss(logit_real_B: torch.Tensor, logit_fake_B: torch.Tensor) -> torch.Tensor:
    """E[relu(1 - D(real))] + E[relu(1 + D(fake))] -> scalar."""
    return torch.relu(1.0 - logit_real_B).mean() + torch.relu(1.0 + logit_fake_B).mean()


def generator_adversarial_loss(logit_fake_B: torch.Tensor) -> torch.Tensor:
    """E[-D(fake)] -> scalar."""
    return -logit_fake_B.mean()


def feature_matching_loss(feats_fake: Sequence[torch.Tensor], feats_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over trunk blocks of mean((f(fake) - f(real))^2), real features treated as constants."""
    if len(feats_fake) != len(feats_real) or not feats_fake:
        raise ValueError("feature lists must be non-empty and of equal length")
    return sum(torch.mean((a.float() - b.detach().float()) ** 2) for a, b in zip(feats_fake, feats_real))


def step_probabilities(num_steps: int, probs: Sequence[float] | None = None) -> torch.Tensor:
    """[N] probabilities of judging each student step's output (first ... final)."""
    if probs is None:
        probs = DEFAULT_STEP_PROBS if num_steps == len(DEFAULT_STEP_PROBS) else [1.0] * num_steps
    p = torch.tensor([float(v) for v in probs], dtype=torch.float64)
    if p.numel() != num_steps:
        raise ValueError(f"need {num_steps} step probabilities, got {p.numel()}")
    if bool((p < 0).any()) or float(p.sum()) <= 0 or not bool(torch.isfinite(p).all()):
        raise ValueError(f"step probabilities must be >= 0 with a positive sum, got {list(probs)}")
    return (p / p.sum()).float()


@torch.no_grad()
def student_last_step_inputs(
    student_fn,
    noise_BX: torch.Tensor,
    boundary_sigmas: Sequence[float],
    steps_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the student's last judged step starts: (x_BX after steps_B - 1 steps, sigma_from_B, sigma_to_B).

    student_fn(x_BX, sigma_B) -> v_BX; boundary_sigmas: the N + 1 sigmas (1 ... 0) of its Euler steps;
    steps_B: [B] in 1..N. The earlier steps run without gradients; the caller takes the final step
    x + (sigma_to - sigma_from) * v_theta(x, sigma_from) *with* gradients (in the same forward as the
    reflow loss, which keeps DDP to one forward per step), so the generator is judged on its jump from
    states it really reaches at a cost of one differentiable forward per sample.
    """
    B = noise_BX.shape[0]
    n = steps_B.to(noise_BX.device)
    if B and (int(n.min()) < 1 or int(n.max()) > len(boundary_sigmas) - 1):
        raise ValueError(f"steps must lie in 1..{len(boundary_sigmas) - 1}")
    start = euler_walk(student_fn, noise_BX, boundary_sigmas, stop_B=n - 1)
    sig = torch.tensor([float(s) for s in boundary_sigmas], device=noise_BX.device, dtype=noise_BX.dtype)
    return start, sig[n - 1], sig[n]
