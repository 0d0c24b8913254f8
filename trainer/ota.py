"""OTA mixing: a share of every batch from online teacher rollouts, requested ahead, never waited on.

``OTAMixer`` keeps ``prefetch`` rollout requests in flight on a ``flowcore.rollout.RolloutTeacher``
(the live pool's client, or an in-process ``LocalRollout``). Each step the trainer ``take``s the
oldest request if it is done and ``fill``s the queue again. When the pool is slow or gone the step
goes on with the corpus part of the batch only; the missing samples are counted (``shortfall``),
a warning is printed once per outage, and mixing resumes by itself when results arrive again.

In ``student`` mode the student's own Euler steps to each window start (EMA weights, no grad) run on
a helper thread together with the request, so they do not lengthen the training step either; the
thread reads the EMA weights while the step updates them, which at most mixes two adjacent EMA
states.

Noise, classes (or prompts), guidance weights and windows of request n come from a generator seeded
by (seed, rank, n): a request is reproducible, but *which* step consumes it depends on the pool's
timing, so runs with OTA are not bit-reproducible (the corpus part still is).

Prompt-conditioned corpora (diffusers students): request n draws its prompts uniformly from the
corpus's own prompt file (the card's ``run.prompts``: url + sha256, read by ``load_card_prompts``
and checked against the sha256) and sends them as TEXTS; the pool's teacher encodes them with its own
text encoders and solves with CFG at the card's fixed guidance. The online windows come back with
their texts (``OTABatch.prompts``), which the trainer embeds like the corpus's.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flowcore.ota import (
    OTA_MODES,
    interpolated_starts,
    stage_solver_bounds,
    student_window_starts,
    window_grids,
)
from flowcore.windows import WindowBatch, sample_windows, windows_from_endpoints
from storage_schemas import DatasetCard
from storage_schemas._fields import seed63
from storage_schemas.prompts import parse_prompt_file


def load_card_prompts(card: DatasetCard, storage_options: dict[str, Any] | None = None, *,
                      check_location=None) -> list[str]:
    """The prompt texts of a prompt-conditioned corpus: its prompt file (card ``run.prompts``), sha256-checked."""
    rec = card.run.get("prompts") or {}
    url = rec.get("url") if isinstance(rec, dict) else None
    if not url:
        raise ValueError("OTA for a prompt-conditioned corpus draws prompts from the corpus's prompt file, but the "
                         "card does not record one (run.prompts)")
    from fsspec.core import url_to_fs

    from storage_schemas.retry import with_retries

    if check_location is not None:  # the card is input: its prompt file is read only where the caller allows
        check_location(str(url))
    try:
        fs, path = url_to_fs(url, **(storage_options or {}))
        data = with_retries(lambda: fs.cat_file(path), what=f"reading prompt file {url}")
    except (OSError, ValueError) as e:
        raise ValueError(f"OTA draws prompts from the corpus's prompt file {url} (card run.prompts), which cannot be "
                         f"read here: {e}") from None
    want = rec.get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"the prompt file {url} changed since the corpus was generated (sha256 differs from the "
                         "card's run.prompts.sha256)")
    return [text for _, text in parse_prompt_file(data, url)]


@dataclass
class OTABatch:
    """Online windows for one step: the WindowBatch plus each sample's class (or prompt text) and guidance."""

    windows: WindowBatch
    class_B: torch.Tensor | None
    guidance_B: torch.Tensor
    prompts: list[str] | None = None


@dataclass
class _Pending:
    number: int
    future: Any
    mode: str
    stage: int
    submitted: float
    window_B: torch.Tensor | None
    class_B: torch.Tensor | None
    guidance_B: torch.Tensor
    x_start_BX: torch.Tensor | None
    sigma_start_B: torch.Tensor | None
    sigma_end_B: torch.Tensor | None
    prompts: list[str] | None = None


class OTAMixer:
    """Requests online rollouts ahead and hands out finished ones (see module docstring)."""

    def __init__(self, client, card: DatasetCard, *, mode: str, samples_per_step: int, seed: int, rank: int,
                 window_points: str = "start", prefetch: int = 2, timeout_s: float = 60.0, real_sampler=None,
                 verbose: bool = True, prompts: Sequence[str] | None = None):
        if mode not in OTA_MODES:
            raise ValueError(f"ota-mode must be one of {', '.join(OTA_MODES)}, got {mode!r}")
        if card.conditioning.kind == "prompt" and not prompts:
            raise ValueError("OTA mixing for a prompt-conditioned corpus needs its prompts (see load_card_prompts)")
        self.prompts = list(prompts) if card.conditioning.kind == "prompt" else None
        if mode == "perflow" and real_sampler is None:
            raise ValueError("the perflow baseline needs real data samples (available for GMM teachers only)")
        fp = getattr(client, "fingerprint", None)
        if callable(fp) and fp() != card.teacher.fingerprint:
            raise ValueError("the teacher pool serves a different teacher than the corpus's (fingerprints differ); "
                             "start the pool with the corpus's teacher SPEC")
        self.client, self.card, self.mode = client, card, mode
        self.n = int(samples_per_step)
        self.seed, self.rank, self.window_points = seed, rank, window_points
        self.prefetch, self.timeout_s = max(1, int(prefetch)), float(timeout_s)
        self.real_sampler = real_sampler
        self.verbose = verbose
        self.solver_sigmas = list(card.solver.sigmas)
        self.saved_sigmas = list(card.saved_sigmas)
        self.method = card.solver.name
        self.pending: deque[_Pending] = deque()
        self._prep = cf.ThreadPoolExecutor(self.prefetch, thread_name_prefix="ota-student") if mode == "student" else None
        self.requested = 0
        self.stats = {"ota_samples": 0, "ota_shortfall": 0, "ota_failures": 0, "ota_timeouts": 0, "ota_stale": 0}
        self._outage = False

    # -- requests ---------------------------------------------------------------------------------
    def _conditions(self, g: torch.Generator) -> tuple[torch.Tensor | list[str] | None, torch.Tensor]:
        """(class ids, or prompt texts, or None; guidance weights) of one request."""
        card = self.card
        cls = None
        if card.conditioning.kind == "class":
            cls = torch.randint(0, card.conditioning.num_classes, (self.n,), generator=g)
        elif self.prompts is not None:
            cls = [self.prompts[i] for i in torch.randint(0, len(self.prompts), (self.n,), generator=g).tolist()]
        gd = card.solver.guidance
        if isinstance(gd, (int, float)):
            guid = torch.full((self.n,), float(gd))
        else:
            guid = gd.min + (gd.max - gd.min) * torch.rand(self.n, generator=g)
        return cls, guid

    def _submit(self, stage: int, student_fn) -> None:
        number = self.requested
        self.requested += 1
        g = torch.Generator().manual_seed(seed63(self.seed, "ota", self.rank, number))
        cls, guid = self._conditions(g)
        noise = torch.randn((self.n, *self.card.sample_shape), generator=g)
        p = _Pending(number, None, self.mode, stage, time.monotonic(), None, None, guid, None, None, None)
        if isinstance(cls, list):
            p.prompts = cls
        else:
            p.class_B = cls
        if self.mode == "fresh":  # the teacher's whole ODE from new noise; windows are drawn at take time
            grid = torch.tensor(self.solver_sigmas, dtype=torch.float64).expand(self.n, -1)
            save = [i for i, _ in enumerate(self.solver_sigmas)
                    if any(abs(self.solver_sigmas[i] - s) <= 1e-6 for s in self.saved_sigmas)]
            x_start = noise
        else:
            bounds = stage_solver_bounds(self.solver_sigmas, self.saved_sigmas, stage)
            w = torch.randint(0, stage, (self.n,), generator=g)
            grid = window_grids(self.solver_sigmas, bounds, w)
            s0, s1 = grid[:, 0].float(), grid[:, -1].float()
            save = [0, grid.shape[1] - 1]
            p.window_B, p.sigma_start_B, p.sigma_end_B = w, s0, s1
            if self.mode == "student":
                # the student's own steps to the window start run on a helper thread, off the training step
                boundary = [self.solver_sigmas[i] for i in bounds]

                def prepare_and_roll_out(p=p, noise=noise, grid=grid, save=save, cls=cls, guid=guid, w=w):
                    p.x_start_BX = student_window_starts(lambda x, s: student_fn(x, s, cls, guid), noise, boundary, w)
                    return self.client.submit(p.x_start_BX, grid, save, cls, guid, method=self.method).result(
                        timeout=self.timeout_s)

                p.future = self._prep.submit(prepare_and_roll_out)
                self.pending.append(p)
                return
            x0, real_cls = self.real_sampler(self.n, g, cls)
            x_start = interpolated_starts(x0, noise, s0)
            p.x_start_BX = x_start
        try:
            p.future = self.client.submit(x_start, grid, save, cls, guid, method=self.method)
        except Exception as e:  # noqa: BLE001 - a pool that is gone must not stop training
            self._failed(f"submitting a rollout failed: {type(e).__name__}: {e}")
            return
        self.pending.append(p)

    def fill(self, stage: int, student_fn=None) -> None:
        """Keep ``prefetch`` requests in flight (student_fn(x, sigma, class, guidance) for student mode)."""
        while len(self.pending) < self.prefetch:
            before = len(self.pending)
            self._submit(stage, student_fn)
            if len(self.pending) == before:  # submit failed: try again next step
                break

    # -- results ----------------------------------------------------------------------------------
    def _failed(self, msg: str, key: str = "ota_failures") -> None:
        self.stats[key] += 1
        if not self._outage and self.verbose:
            warnings.warn(f"OTA: {msg}; training continues on the corpus until rollouts arrive again", stacklevel=3)
        self._outage = True

    def take(self, stage: int, generator: torch.Generator, wait: bool = False) -> OTABatch | None:
        """The oldest finished rollout as training windows of ``stage``, or None (shortfall counted).

        wait: block up to the timeout for the oldest request (online-only training has nothing else to do).
        """
        now = time.monotonic()
        while self.pending:
            p = self.pending[0]
            if wait and not p.future.done():
                try:
                    p.future.result(timeout=max(0.0, self.timeout_s - (now - p.submitted)))
                except Exception:  # noqa: BLE001 - reported below
                    pass
                now = time.monotonic()
            if not p.future.done():
                if now - p.submitted > self.timeout_s:
                    self.pending.popleft()
                    p.future.cancel()
                    self._failed(f"a rollout took longer than {self.timeout_s:.0f} s", "ota_timeouts")
                    continue
                break
            self.pending.popleft()
            try:
                states = p.future.result(timeout=0)
            except Exception as e:  # noqa: BLE001
                self._failed(f"a rollout failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            if p.mode != "fresh" and p.stage != stage:
                self.stats["ota_stale"] += 1  # requested for the previous stage's windows
                continue
            batch = self._to_windows(p, states, stage, generator)
            if batch is None:
                continue
            if self._outage and self.verbose:
                print(f"OTA: rollouts arrive again (shortfall so far {self.stats['ota_shortfall']} samples)", flush=True)
            self._outage = False
            self.stats["ota_samples"] += self.n
            return batch
        self.stats["ota_shortfall"] += self.n
        return None

    def _to_windows(self, p: _Pending, states: torch.Tensor, stage: int, g: torch.Generator) -> OTABatch | None:
        states = torch.as_tensor(states, dtype=torch.float32)
        if not bool(torch.isfinite(states).all()):
            self._failed("a rollout returned NaN or inf states")
            return None
        if p.mode == "fresh":
            wb = sample_windows(states, torch.tensor(self.saved_sigmas), stage, self.window_points, generator=g)
        else:
            wb = windows_from_endpoints(p.x_start_BX, states[:, -1], p.sigma_start_B, p.sigma_end_B, p.window_B,
                                        self.window_points, generator=g)
        return OTABatch(wb, p.class_B, p.guidance_B, p.prompts)

    def wait_first(self, timeout_s: float) -> bool:
        """Block until the oldest request is done (start-up: the first steps should not all be shortfall)."""
        if not self.pending:
            return False
        try:
            self.pending[0].future.result(timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - reported by take()
            return False

    def close(self) -> None:
        for p in self.pending:
            p.future.cancel()
        self.pending.clear()
        if self._prep is not None:
            self._prep.shutdown(wait=False, cancel_futures=True)
