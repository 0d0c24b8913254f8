"""A drop-in diffusers scheduler that samples on the corrected few-step sigma grid.

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

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowcore.schedules import few_step_sigmas

__all__ = ["CorrectedFlowMatchEulerScheduler", "diffusers_default_sigmas"]


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
