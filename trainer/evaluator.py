"""Evaluation while training: the EMA student on the validation split, the best weights so far, and the
validation sample grids.

At each evaluation the EMA student solves the validation trajectories' noise in the current stage's step
count (``trainer.validation``); the scores are logged as ``val_*`` (metrics.jsonl and the trackers); at the
final stage's step count the lowest coupling error so far makes these weights the best (kept in memory and
under ``checkpoints/best/``, where a resumed run finds them). Families that make images (diffusers students)
also show the first validation samples as a grid (``trainer.samples``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from safetensors.torch import save as st_save

from trainer.checkpoint import MAX_SMALL_JSON_BYTES, CheckpointCorrupt, check_step, redact_url
from trainer.samples import GRID_SAMPLES, encode_png, log_to_trackers, sample_grid, sample_png_path
from trainer.validation import evaluate_student, load_validation

#: the best weights on the validation split so far, and what they scored (written at each new best)
BEST_WEIGHTS = "checkpoints/best/weights.safetensors"
BEST_META = "checkpoints/best/best.json"


class Evaluator:
    """Evaluates a Trainer's student (see the module docstring). ``best``: {step, steps, coupling_error, swd,
    window_errors, weights} of the best evaluation so far, or None."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg, acc = trainer.cfg, trainer.accelerator
        self.validation = self.best = None
        self._no_grids = False  # set when a sample grid failed (training goes on without them)
        self.every = cfg.eval_every if cfg.eval_every is not None else max(1, trainer.total_steps // 10)
        # FSDP2: every rank evaluates (each forward all-gathers the weights), the main process reports
        if (not acc.is_main_process and trainer.fsdp is None) or cfg.eval_every == 0:
            return
        self.validation = load_validation(cfg.data, cfg.storage_options, cache_dir=cfg.cache_dir,
                                          on_corrupt=cfg.on_corrupt)
        if self.validation is None:
            print(f"note: {redact_url(cfg.data)} has no validation split (generate with --validation-trajectories): "
                  "no evaluation while training; the export holds the last weights", file=sys.stderr)

    def resume(self, step: int) -> None:
        """A resumed run keeps the best weights of its first part (those up to ``step``). Damaged best files (a
        run killed while writing them, before writes were atomic) are ignored with a warning naming the file:
        the next evaluation writes new ones. The main process decides and (FSDP2) tells the other ranks, which
        must agree on the best so far (a new best is a collective)."""
        t = self.trainer
        acc = t.accelerator
        if self.validation is None:
            return
        best, error = None, None
        if acc.is_main_process and t.ckpt.exists(BEST_META):
            try:
                meta = t.ckpt.read_json(BEST_META, max_bytes=MAX_SMALL_JSON_BYTES)
                if not isinstance(meta, dict) or not isinstance(meta.get("coupling_error"), (int, float)):
                    raise CheckpointCorrupt(t.ckpt.where(BEST_META), "not a best-weights record")
                if check_step(meta.get("step", 0), t.ckpt.where(BEST_META)) <= step:
                    best = {**meta, "weights": t.ckpt.read_weights(BEST_WEIGHTS)}
            except CheckpointCorrupt as e:
                error = str(e)
        if error is not None:
            print(f"warning: {error}; the best weights so far are ignored (the next evaluation writes new ones)",
                  file=sys.stderr)
        if t.fsdp is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            meta = broadcast_object_list([None if best is None else {k: v for k, v in best.items() if k != "weights"}])[0]
            best = best if acc.is_main_process else (None if meta is None else {**meta, "weights": {}})
        self.best = best

    def due(self, step: int, total_steps: int) -> bool:
        return self.validation is not None and (step % self.every == 0 or step == total_steps)

    def evaluate(self) -> dict[str, Any]:
        """The EMA student on the validation split at the current stage's step count (see the module docstring)."""
        t = self.trainer
        acc = t.accelerator
        stage = t.stage_at(max(0, t.step - 1))
        ema = None if t.ema is None else t.ema.state_dict()
        t.model.eval()
        try:
            with t.student.ema_sampler(ema, acc.autocast, acc.device) as fn:
                res = evaluate_student(fn, t.student.corpus_condition, self.validation, stage,
                                       keep_samples=GRID_SAMPLES)
        finally:
            t.model.train()
        references, samples = res.pop("references"), res.pop("samples")
        if acc.is_main_process and not self._no_grids:
            try:
                self._sample_grid(references, samples, stage)
            except (RuntimeError, OSError, ValueError) as e:  # a failed picture must not end a long run
                self._no_grids = True
                print(f"warning: the validation sample grid failed at step {t.step} ({' '.join(str(e).split())[:200]}); "
                      "training goes on without grids", file=sys.stderr)
        row = {"val_steps": stage, "val_coupling_error": res["coupling_error"], "val_swd": res["swd"],
               **{f"val_window_{w}_error": e for w, e in enumerate(res["window_errors"])}}
        t.log_metrics(row, eval_row=True)
        if stage == t.cfg.stages[-1] and (self.best is None or res["coupling_error"] < self.best["coupling_error"]):
            weights = t.host_weights(ema or t.student.trainable_state_dict())
            self.best = {"step": t.step, "steps": stage, "coupling_error": res["coupling_error"], "swd": res["swd"],
                         "window_errors": res["window_errors"], "weights": weights}
            if acc.is_main_process:  # (FSDP2: every rank evaluates)
                t.ckpt.write(BEST_WEIGHTS, st_save({k: v.contiguous() for k, v in weights.items()}))
                t.ckpt.write(BEST_META, json.dumps({k: v for k, v in self.best.items() if k != "weights"},
                                                   sort_keys=True).encode())
        return res

    def _sample_grid(self, references: torch.Tensor, samples: torch.Tensor, stage: int) -> None:
        """The teacher's stored endpoints | the EMA student's ``stage``-step samples, as images where the family
        makes them, written under <out>/logs/samples/ and sent to the trackers. Main process; no collective."""
        t = self.trainer
        made = t.student.preview_images(torch.cat([references, samples]), t.accelerator.device)
        if made is None:  # the family shows no images (flow nets: their samples are vectors)
            return
        images, how = made
        n = references.shape[0]
        grid = sample_grid(images[:n], images[n:])
        t.ckpt.write(sample_png_path(t.step), encode_png(grid))
        caption = (f"step {t.step}: left the teacher's endpoint, right the EMA student's {stage}-step sample "
                   f"({how}); the first {n} validation trajectories")
        log_to_trackers(t.accelerator.trackers, grid, t.step, caption)
