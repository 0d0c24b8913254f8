"""The VP (DDPM-family UNet) <-> rectified-flow conversion, as pure math: no model, no I/O.

A DDPM-family UNet (SD1.5, SD2, SDXL) lives on the variance-preserving path
``z_t = a_t x0 + b_t eps`` (``a_t = sqrt(abar_t)``, ``b_t = sqrt(1 - abar_t)``). Dividing by
``a_t + b_t`` puts it on trajflow's rectified-flow path ``x_sigma = (1 - sigma) x0 + sigma eps`` with
``sigma = b_t / (a_t + b_t)``; the UNet's output at ``(z_t, t(sigma))`` gives ``eps_hat`` and
``x0_hat`` and the flow velocity ``v = eps_hat - x0_hat`` (derivation and range-end handling:
``docs/math.md``, "UNet (epsilon / v-prediction) teachers in rectified-flow sigma").

``VPFlowConversion`` is that conversion for one noise schedule. Everything that turns a UNet into a
velocity field goes through it, so they cannot drift apart:

- ``models.diffusers.unet.DiffusersUNetTeacher.velocity`` (the teacher, under no_grad),
- ``trainer.students.unet.UNetStudentNet.forward`` (the student, differentiable in the output),
- ``models.diffusers.schedulers.FlowUNetScheduler`` (the exported sampler in a stock pipeline).

    conv = VPFlowConversion(scheduler_config)          # dict, FrozenDict or a diffusers scheduler
    z, t_B = conv.model_input(x, sigma_B)              # the UNet's input state and fractional timesteps
    v = conv.velocity(unet(z, t_B, ...), x, sigma_B)   # rectified-flow velocity at (x, sigma)
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from flowcore.teacher import as_sigma_batch
from flowcore.tensors import expand_like

__all__ = ["VPFlowConversion", "PREDICTION_TYPES", "SCHEDULE_KEYS", "sigma_of_alpha_cumprod", "vp_scale",
           "schedule_config"]

PREDICTION_TYPES = ("epsilon", "v_prediction")

#: the scheduler keys that define the noise schedule and the meaning of the UNet's output; sampler
#: settings (clip_sample, thresholding, timestep_spacing, steps_offset, ...) do not enter the ODE
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr", "prediction_type")


def sigma_of_alpha_cumprod(abar) -> np.ndarray:
    """Rectified-flow sigma = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)), float64; abar = 1 -> 0,
    abar = 0 -> 1."""
    abar = np.asarray(abar, dtype=np.float64)
    a, b = np.sqrt(abar), np.sqrt(1.0 - abar)
    return b / (a + b)


def vp_scale(sigma) -> np.ndarray:
    """c(sigma) = sqrt((1 - sigma)^2 + sigma^2) = 1 / (a + b): x_sigma = c * z_t."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.sqrt((1.0 - sigma) ** 2 + sigma**2)


def schedule_config(scheduler_config: Any) -> dict[str, Any]:
    """The schedule-defining keys of a scheduler config (dict, FrozenDict or scheduler object)."""
    if scheduler_config is None:
        raise ValueError("a UNet teacher needs its scheduler config (num_train_timesteps, beta_start, beta_end, "
                         "beta_schedule, prediction_type): the pipeline's scheduler/scheduler_config.json")
    cfg = getattr(scheduler_config, "config", scheduler_config)
    cfg = dict(cfg)
    out = {k: cfg[k] for k in SCHEDULE_KEYS if k in cfg and cfg[k] is not None}
    out.setdefault("prediction_type", "epsilon")
    if out["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {out['prediction_type']!r} is not supported by DiffusersUNetTeacher: "
                         f"choose one of {PREDICTION_TYPES} (flow-matching transformers go through "
                         "models.diffusers.sd3.DiffusersFlowTeacher)")
    return json.loads(json.dumps(out))


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The Glide cosine schedule (``squaredcos_cap_v2``), discretised as diffusers does it."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                         for i in range(num_steps)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers' schedulers do."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def alphas_cumprod_of(schedule: dict[str, Any]) -> np.ndarray:
    """alphas_cumprod [T] exactly as diffusers' DDPM-family schedulers compute them (float32 torch ops, in
    the same order), returned as float64. ``schedule``: ``SCHEDULE_KEYS`` of a scheduler config
    (``tests/test_diffusers_unet.py`` checks equality with ``diffusers.DDPMScheduler``)."""
    T = int(schedule.get("num_train_timesteps", 1000))
    start, end = float(schedule.get("beta_start", 0.0001)), float(schedule.get("beta_end", 0.02))
    kind = schedule.get("beta_schedule", "linear")
    if schedule.get("trained_betas") is not None:
        betas = torch.tensor(schedule["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T)
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2, "
                         "sigmoid, or trained_betas)")
    if schedule.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    abar = torch.cumprod(1.0 - betas, dim=0).double().numpy().copy()
    if abar[-1] == 0.0:
        # zero terminal SNR (rescale_betas_zero_snr): log-SNR is -inf there; use fp16's smallest
        # subnormal, as diffusers' Euler / DPM-Solver schedulers do, so sigma_max = 1 - 2.4e-4
        abar[-1] = 2.0**-24
    return abar


class VPFlowConversion:
    """sigma <-> fractional timestep, and UNet output -> rectified-flow velocity, for one noise schedule.

    ``scheduler_config``: the pipeline's scheduler config (dict, FrozenDict or scheduler object);
    only ``SCHEDULE_KEYS`` are read. Timesteps are fractional: the discrete log-SNR is interpolated
    linearly in t (exact at integers). Outside ``[sigma_min, sigma_max]`` t is clamped and the
    velocity is the one consistent with the state (module docstring of ``models.diffusers.unet``).

    ``sigma`` arguments are a float, a [B] array or a [B] tensor (any device); coefficients are
    computed in float64 from its values.
    """

    def __init__(self, scheduler_config: Any):
        self.schedule = schedule_config(scheduler_config)
        self.prediction_type = self.schedule["prediction_type"]
        abar = alphas_cumprod_of(self.schedule)
        if not (np.all(abar > 0) and np.all(abar < 1) and np.all(np.diff(abar) < 0)):
            raise ValueError("alphas_cumprod must decrease strictly inside (0, 1)")
        self.alphas_cumprod = abar  # float64 [T]
        self.num_train_timesteps = len(abar)
        self._log_snr = np.log(abar) - np.log1p(-abar)  # decreasing in t
        self._timesteps = np.arange(len(abar), dtype=np.float64)

    # ------------------------------------------------------------------ range
    @property
    def sigma_max(self) -> float:
        """sigma of the last training timestep T - 1 (< 1: abar_{T-1} > 0)."""
        return float(sigma_of_alpha_cumprod(self.alphas_cumprod[-1]))

    @property
    def sigma_min(self) -> float:
        """sigma of timestep 0 (> 0)."""
        return float(sigma_of_alpha_cumprod(self.alphas_cumprod[0]))

    # ------------------------------------------------------------------ sigma <-> timestep
    def timestep_of_sigma(self, sigma) -> np.ndarray:
        """Fractional timestep(s) t in [0, T - 1] for sigma(s), float64, by linear interpolation of the
        log-SNR lambda = 2 log((1 - sigma) / sigma) over integer timesteps; clamped outside
        [sigma_min, sigma_max]. Exact (to float64 rounding) at sigma(k) for integer k."""
        s = np.asarray(sigma, dtype=np.float64)
        with np.errstate(divide="ignore"):
            lam = 2.0 * (np.log1p(-s) - np.log(s))  # +inf at 0, -inf at 1
        # np.interp needs increasing x: -lambda_t increases with t
        return np.interp(-lam, -self._log_snr, self._timesteps)

    def sigma_of_timestep(self, t) -> np.ndarray:
        """sigma at fractional timestep(s) t in [0, T - 1] (float64), the inverse of timestep_of_sigma."""
        t = np.asarray(t, dtype=np.float64)
        if np.any(t < 0) or np.any(t > self.num_train_timesteps - 1):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        lam = np.interp(t, self._timesteps, self._log_snr)
        return 1.0 / (1.0 + np.exp(lam / 2.0))

    def alpha_cumprod_of_timestep(self, t) -> np.ndarray:
        """abar at fractional t (sigmoid of the interpolated log-SNR); = alphas_cumprod[t] at integers."""
        lam = np.interp(np.asarray(t, dtype=np.float64), self._timesteps, self._log_snr)
        return 1.0 / (1.0 + np.exp(-lam))

    # ------------------------------------------------------------------ state and velocity
    @staticmethod
    def sigma_array(sigma, batch: int) -> np.ndarray:
        """sigma (float, [B] array or tensor) as a float64 [B] array, checked to lie in [0, 1]."""
        s = as_sigma_batch(sigma, batch, "cpu", torch.float64).numpy()
        if np.any(s < 0) or np.any(s > 1):
            raise ValueError("sigma must lie in [0, 1]")
        return s

    @staticmethod
    def _work_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def model_input(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, t_B): the UNet's VP state ``z = x / c(sigma)`` (float32, float64 for float64 x;
        differentiable in x) and its fractional float32 timesteps ``t(sigma)`` [B] on x's device."""
        s = self.sigma_array(sigma, x.shape[0])
        work = self._work_dtype(x)
        c = expand_like(torch.as_tensor(vp_scale(s), dtype=work).to(x.device), x)
        t_B = torch.as_tensor(self.timestep_of_sigma(s), dtype=torch.float32).to(x.device)
        return x.to(work) / c, t_B

    def velocity(self, out: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        """v = eps_hat - x0_hat from the UNet output ``out`` at ``model_input(x, sigma)``, in the work
        dtype (float32; float64 for float64 x); differentiable in ``out`` (and x). For sigma > sigma_max
        v = (x - x0_hat) / sigma, for sigma < sigma_min v = (eps_hat - x) / (1 - sigma)."""
        s = self.sigma_array(sigma, x.shape[0])
        t = self.timestep_of_sigma(s)
        abar_t = self.alpha_cumprod_of_timestep(t)
        work, dev = self._work_dtype(x), x.device

        def col(a: np.ndarray) -> torch.Tensor:
            return expand_like(torch.as_tensor(a, dtype=work).to(dev), x)

        a_t, b_t = col(np.sqrt(abar_t)), col(np.sqrt(1.0 - abar_t))
        sig = col(s)
        xw = x.to(work)
        z = xw / col(vp_scale(s))
        out = out.to(work)
        if self.prediction_type == "epsilon":
            eps_hat = out
            x0_hat = (z - b_t * eps_hat) / a_t
        else:  # v_prediction: out = a eps - b x0
            x0_hat = a_t * z - b_t * out
            eps_hat = a_t * out + b_t * z
        v = eps_hat - x0_hat
        above = expand_like(torch.as_tensor(s > self.sigma_max, device=dev), x)
        below = expand_like(torch.as_tensor(s < self.sigma_min, device=dev), x)
        # the unselected rows get a harmless denominator: no inf/nan in values or gradients
        if bool(above.any()):
            v = torch.where(above, (xw - x0_hat) / torch.where(above, sig, 1.0), v)
        if bool(below.any()):
            v = torch.where(below, (eps_hat - xw) / torch.where(below, 1.0 - sig, 1.0), v)
        return v
