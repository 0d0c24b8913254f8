"""Drop-in diffusers schedulers that sample on the corrected few-step sigma grid.

``CorrectedFlowMatchEulerScheduler`` (flow-matching transformers, SD3) and ``FlowUNetScheduler``
(epsilon / v-prediction UNets, SD1.5 / SDXL: the latents stay in trajflow's rectified-flow state,
see its docstring and ``docs/math.md``).

diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` spaces N timesteps linearly from
``sigma_max`` to ``sigma_min`` and appends 0. ``sigma_min`` is already shifted at construction and
is shifted *again* inside ``set_timesteps``, so with SD3's shift = 3 the 4-step grid is

    [1.0, 0.858, 0.602, 0.0089, 0.0]

whose last step moves sigma by < 0.01: one of the four network evaluations is wasted and the
real work is crammed into the remaining three (FlowSteer, arXiv 2511.18834). The corrected grid
(``flowcore.schedules.few_step_sigmas``, a contract) is shift(linspace(1, 0, N+1)):

    [1.0, 0.9, 0.75, 0.5, 0.0]

i.e. N equal steps of 1/N in unshifted time, ending in exactly 0.

``CorrectedFlowMatchEulerScheduler`` is a subclass of ``FlowMatchEulerDiscreteScheduler`` that
only changes how the default grid is built, so it slots into any stock pipeline that expects a
``FlowMatchEulerDiscreteScheduler`` (SD3, SD3.5, ...) and round-trips through
``save_pretrained`` / ``from_pretrained`` as a plain ``scheduler_config.json``. Loading a whole
pipeline directory with ``DiffusionPipeline.from_pretrained`` does not know this class (it is not
in the diffusers namespace): build it with ``CorrectedFlowMatchEulerScheduler.from_config(
pipe.scheduler.config)`` (or ``from_pretrained(dir, subfolder="scheduler")``) and assign it to
``pipe.scheduler`` / pass ``scheduler=`` explicitly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from flowcore.schedules import few_step_sigmas
from flowcore.vp_flow import VPFlowConversion

__all__ = ["CorrectedFlowMatchEulerScheduler", "FlowUNetScheduler", "diffusers_default_sigmas"]


class CorrectedFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose default grid is ``few_step_sigmas(N, shift)``.

    ``set_timesteps(N)`` sets ``sigmas`` to the N+1 values ``few_step_sigmas(N, shift)`` (ending in
    exactly 0) and ``timesteps = sigmas[:-1] * num_train_timesteps``. ``step()`` is the parent's
    Euler step ``x <- x + (sigma_next - sigma) * v``, unchanged.

    The shift is:

    - ``self.shift`` (the config's ``shift``, or whatever ``set_shift`` set) normally;
    - with ``use_dynamic_shifting=True``, derived from the resolution-dependent ``mu`` the pipeline
      passes: ``shift = exp(mu)`` for ``time_shift_type="exponential"`` (the default) and
      ``shift = mu`` for ``"linear"``. Both are identities: diffusers' time shifts
      ``e^mu / (e^mu + 1/t - 1)`` and ``mu / (mu + 1/t - 1)`` equal ``s t / (1 + (s - 1) t)`` with
      ``s = e^mu`` resp. ``s = mu``. As in the parent, ``mu`` is required then and ignored otherwise.

    An explicit ``sigmas=`` or ``timesteps=`` argument is the caller's own grid and is handled
    exactly as the parent handles it (the Flux pipeline, for example, always passes
    ``sigmas = linspace(1, 1/N, N)``, which with the parent's shift and appended 0 already *is*
    the corrected grid).

    Config options that would rewrite the grid (Karras / exponential / beta sigmas,
    ``shift_terminal``, ``invert_sigmas``) contradict the corrected schedule and are rejected by
    ``set_timesteps`` (not at construction: ``__init__`` is the parent's, so that diffusers'
    ``register_to_config`` / ``from_config`` machinery sees its exact signature).
    """

    _INCOMPATIBLE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                     "invert_sigmas")

    def _check_compatible(self) -> None:
        bad = [name for name in self._INCOMPATIBLE if self.config.get(name)]
        if bad:
            raise ValueError(
                f"CorrectedFlowMatchEulerScheduler builds its own grid few_step_sigmas(N, shift); "
                f"config option(s) {bad} would rewrite it. Unset them (or use the stock "
                f"FlowMatchEulerDiscreteScheduler)."
            )

    def effective_shift(self, mu: float | None = None) -> float:
        """The shift the corrected grid uses (see class docstring)."""
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
            if self.config.time_shift_type == "linear":
                return float(mu)
            return math.exp(float(mu))
        return float(self.shift)

    def corrected_sigmas(self, num_inference_steps: int, mu: float | None = None) -> list[float]:
        """The N+1 sigmas ``few_step_sigmas(N, effective_shift(mu))`` as Python floats (float64)."""
        return few_step_sigmas(int(num_inference_steps), self.effective_shift(mu))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """Set ``sigmas`` = few_step_sigmas(N, shift) (N+1 values, last exactly 0) and
        ``timesteps`` = sigmas[:-1] * num_train_timesteps; an explicit ``sigmas``/``timesteps``
        falls through to the parent's behaviour."""
        if sigmas is not None or timesteps is not None:
            return super().set_timesteps(
                num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps
            )
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required when neither sigmas nor timesteps are given")
        self._check_compatible()
        grid = self.corrected_sigmas(num_inference_steps, mu)
        sigmas_t = torch.tensor(grid, dtype=torch.float32, device=device)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = sigmas_t[:-1] * self.config.num_train_timesteps
        self.sigmas = sigmas_t
        self._step_index = None
        self._begin_index = None


def diffusers_default_sigmas(num_steps: int, shift: float = 1.0, **config) -> list[float]:
    """The N+1 sigmas a stock ``FlowMatchEulerDiscreteScheduler(shift=shift, **config)`` uses after
    ``set_timesteps(num_steps)`` (for comparison; e.g. N=4, shift=3 -> ~[1.0, 0.858, 0.602, 0.0089, 0.0]).

    With ``use_dynamic_shifting=True`` in ``config``, pass ``mu`` in ``config`` too.
    """
    mu = config.pop("mu", None)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, **config)
    sched.set_timesteps(num_steps, mu=mu)
    return [float(s) for s in sched.sigmas]


class FlowUNetScheduler(DDIMScheduler):
    """A stock-pipeline scheduler for epsilon / v-prediction UNets that samples trajflow's ODE on the
    corrected few-step grid, with the latents kept in the rectified-flow state.

    ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` accept it in place of their scheduler
    (``scheduler=`` or ``pipe.scheduler = ...``); it round-trips through ``save_pretrained`` /
    ``from_pretrained`` (``shift`` is part of its config). What the pipeline's loop sees:

    - ``set_timesteps(N)``: ``sigmas`` = ``few_step_sigmas(N, shift)`` (N+1 values, last exactly 0)
      and ``timesteps`` = the fractional float32 UNet timesteps ``t(sigma)`` of the first N, exactly
      as ``DiffusersUNetTeacher`` queries the UNet (``flowcore.vp_flow.VPFlowConversion``: log-SNR
      interpolation, ``t = T - 1`` above ``sigma_max``, ``t = 0`` below ``sigma_min``).
      ``set_timesteps(sigmas=[...])`` takes a custom decreasing grid in (0, 1] (0 appended unless it
      ends in 0); custom ``timesteps`` are refused (several sigmas can share the clamped t = T - 1).
    - ``init_noise_sigma = 1.0``: the pipeline's initial latents are the noise, i.e. the RF state
      ``x`` at sigma = 1 (``x_1 = eps``).
    - ``scale_model_input(x, t)`` = ``z = x / c(sigma)``: the VP state the UNet expects.
    - ``step(out, t, x)``: ``v`` = the flow velocity from the (CFG-combined) UNet output with the same
      formulas as the teacher, then the Euler step ``x + (sigma_next - sigma) v``. With eta = 0 only
      (the probability-flow ODE); ``generator`` is accepted and unused.

    The state after the last step is at sigma = 0, where ``x = x0``: the pipeline decodes it as
    usual. Sampler heuristics of DDIM (``clip_sample``, ``thresholding``) do not apply. With the
    teacher's UNet and guidance this is ``solve_teacher(DiffusersUNetTeacher, noise,
    few_step_sigmas(N, shift), ...)`` step for step (``tests/test_unet_student.py``).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        clip_sample: bool = False,
        set_alpha_to_one: bool = True,
        steps_offset: int = 1,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
    ):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.conversion = VPFlowConversion(self.config)
        self.init_noise_sigma = 1.0
        self.grid: list[float] | None = None  # float64 sigmas of the current schedule (N+1)
        self.sigmas: torch.Tensor | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------ step bookkeeping (as diffusers' Euler)
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def _init_step_index(self, timestep) -> None:
        if self.grid is None:
            raise RuntimeError("call set_timesteps before sampling")
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        self._step_index = int(hits[0])

    # ------------------------------------------------------------------ schedule
    def corrected_sigmas(self, num_inference_steps: int) -> list[float]:
        """``few_step_sigmas(N, shift)`` as Python floats (float64)."""
        return few_step_sigmas(int(num_inference_steps), float(self.config.shift))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, timesteps: list[float] | None = None):
        """sigmas = few_step_sigmas(N, shift) (or the custom ``sigmas``), timesteps = t(sigmas[:-1])."""
        if timesteps is not None:
            raise ValueError("FlowUNetScheduler takes num_inference_steps or sigmas, not timesteps: above sigma_max "
                             "several sigmas share the clamped timestep T - 1")
        if sigmas is not None:
            grid = [float(s) for s in sigmas]
            if not grid or grid[-1] != 0.0:
                grid.append(0.0)
            if not all(a > b for a, b in zip(grid, grid[1:])) or grid[0] > 1.0 or len(grid) < 2:
                raise ValueError(f"sigmas must decrease strictly within (0, 1], got {list(sigmas)}")
        else:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps is required when no sigmas are given")
            grid = self.corrected_sigmas(num_inference_steps)
        self.grid = grid
        self.num_inference_steps = len(grid) - 1
        self.sigmas = torch.tensor(grid, dtype=torch.float32, device=device)
        t = self.conversion.timestep_of_sigma(np.asarray(grid[:-1], dtype=np.float64))
        self.timesteps = torch.as_tensor(t, dtype=torch.float32).to(device)
        self._step_index = None
        self._begin_index = None

    # ------------------------------------------------------------------ the loop
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """z = x / c(sigma): the UNet's VP input for the RF state ``sample`` at the current step."""
        if self._step_index is None:
            self._init_step_index(timestep)
        z, _ = self.conversion.model_input(sample, self.grid[self._step_index])
        return z.to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        """Euler step of the flow velocity read off ``model_output``: x <- x + (sigma_next - sigma) v."""
        if eta != 0.0 or variance_noise is not None:
            raise ValueError("FlowUNetScheduler samples the probability-flow ODE: eta must be 0")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i + 1 >= len(self.grid):
            raise IndexError("step() called more often than the schedule has steps; call set_timesteps again")
        s, s_next = self.grid[i], self.grid[i + 1]
        v = self.conversion.velocity(model_output, sample, s)
        xw = sample.to(v.dtype)
        prev = (xw + (s_next - s) * v).to(sample.dtype)
        x0 = (xw - s * v).to(sample.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        raise NotImplementedError("FlowUNetScheduler keeps latents in the rectified-flow state; noising real "
                                  "latents (img2img/inpainting) is not supported: x = (1 - sigma) x0 + sigma eps")
