"""The Trainer: build / train / close, one readable loop on accelerate.

Each optimizer step: take this rank's batch of authentic trajectories from the streaming corpus; each active
objective (``trainer.objectives``: reflow windows or the unrolled solve on the corpus, online rollouts, the
adversarial term) prepares its rows; ONE forward of the student serves every objective's rows; rows with a
velocity target are regressed together with aligned v-prediction; each objective adds its own loss term; one
backward; then gradient clipping, AdamW with linear warmup, EMA, and the objectives' auxiliary optimizer steps;
the data cursor advances by the global batch. Window draws use a generator seeded by (seed, step, rank), so a
resumed run replays exactly the steps an uninterrupted run would have taken.

The Trainer knows no objective by name and has no branch on the student family: families are behind
``trainer.students.base.Student``, objectives behind ``trainer.objectives.base.Objective``, checkpoints go
through ``trainer.checkpointer.Checkpointer``, evaluation through ``trainer.evaluator.Evaluator``.

    cfg = TrainConfig(data="s3://bucket/corpus", out="s3://bucket/runs/r1", stages=(8, 4, 2))
    trainer = Trainer(cfg).build()
    try:
        trainer.train()
        trainer.export_student()
    finally:
        trainer.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flowcore.losses import aligned_v_loss
from flowcore.windows import stage_boundary_indices
from storage_schemas._fields import seed63
from trainer.checkpoint import public_config, redact_url
from trainer.checkpointer import Checkpointer
from trainer.config import WARN_EPOCHS, TrainConfig
from trainer.data import CorpusStream, StreamConfig, make_dataloader, open_corpus
from trainer.ema import EMA
from trainer.evaluator import Evaluator
from trainer.objectives import (
    EXTRA_SAMPLES,
    MicroBatch,
    Objective,
    ObjectiveContext,
    Rows,
    active_objectives,
    check_config,
    check_requirements,
)
from trainer.schedule import lr_at, stage_at
from trainer.students import Student, check_run, student_class_for
from trainer.students.base import cat_conditions, condition_to
from trainer.trackers import start_trackers, tracker_names


class NonFiniteLossError(ValueError):
    """Training stopped at a non-finite loss or gradient (the weights of the step before are kept)."""


def _regression_loss(v: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Aligned-v loss over the valid rows; a batch of placeholders only (skip policy) gives a zero loss
    that still touches every parameter, which keeps DDP in lockstep."""
    if bool(valid.all()):
        return aligned_v_loss(v, target, alpha)
    if bool(valid.any()):
        return aligned_v_loss(v[valid], target[valid], alpha)
    return v.sum() * 0.0


class Trainer:
    """Distils a few-step student from a corpus (see module docstring).

    rollout_teacher: a ``flowcore.rollout.RolloutTeacher`` (the live pool's client, or a LocalRollout)
    that serves online rollouts when ``cfg.ota_ratio > 0``. The trainer never imports ``pipeline``.
    """

    def __init__(self, cfg: TrainConfig, rollout_teacher=None):
        self.cfg = cfg
        self.step = 0
        self.rollout_teacher = rollout_teacher
        # what close() releases, so that a build() that fails part-way can still be closed
        self.accelerator = self._metrics = self._consumed = self.stream = self._batches = None
        self.objectives: list[Objective] = []
        self.fsdp = None  # trainer.fsdp.FSDP2 with --parallelism fsdp2
        self.evaluator: Evaluator | None = None
        self.checkpointer: Checkpointer | None = None
        check_config(cfg, rollout_teacher)

    # -- build -----------------------------------------------------------------------------------
    def build(self) -> Trainer:
        from accelerate import Accelerator

        corpus = open_corpus(self.cfg.data, self.cfg.storage_options)  # read once: the stream reuses it
        card = corpus.card
        cuda = torch.cuda.is_available()
        # memory-aware defaults by the student family; the batch split is validated with them
        self.cfg = cfg = self.cfg.resolved(student_class_for(card), cuda=cuda,
                                           bf16_supported=cuda and torch.cuda.is_bf16_supported())
        student_cls = check_run(card, cfg)  # every refusal of this family, before anything is built
        check_requirements(student_cls, cfg)  # every objective's required capability, before anything is built
        self.checkpointer = Checkpointer(cfg)
        self.ckpt = self.checkpointer.store
        self.ckpt.check_writable()  # an unwritable --out fails before training
        # TensorBoard writes local files: next to the checkpoints for a local --out, else under ./runs/<hash>
        if "://" not in cfg.out or cfg.out.startswith("file://"):
            self.log_dir = cfg.out.removeprefix("file://")
        else:
            self.log_dir = os.path.join("runs", hashlib.sha256(cfg.out.encode()).hexdigest()[:12])
        log_with = tracker_names(cfg.report_to)
        self.accelerator = acc = Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision, log_with=log_with,
                                             project_dir=str(Path(self.log_dir) / "logs"))
        self.rank, self.world = acc.process_index, acc.num_processes
        self.checkpointer.own(acc)  # this run owns --out (checkpoints/owner.json) before it writes anything there
        try:
            self._build(card, corpus, student_cls, log_with)
        except BaseException:
            self.checkpointer.release()  # a failed build leaves --out to the next run
            raise
        return self

    def _build(self, card, corpus, student_cls, log_with) -> None:
        cfg, acc = self.cfg, self.accelerator
        if cfg.parallelism == "fsdp2":  # the process group (its own for one process), mesh and precision policy
            from trainer.fsdp import FSDP2

            self.fsdp = FSDP2(cfg.fsdp_mixed_precision, acc.device)
        self.online_only = cfg.corpus_batch_size == 0  # ota-ratio 1: the corpus gives the card only
        self.checkpointer.check_format()  # a sharded checkpoint needs an fsdp2 run, a full one a ddp run
        order = cfg.stream_order or self.checkpointer.stream_order() or "partitioned"
        self.stream_cfg = StreamConfig(url=cfg.data, batch_size=max(1, cfg.corpus_batch_size),
                                       storage_options=cfg.storage_options, seed=cfg.seed,
                                       shuffle_buffer=cfg.shuffle_buffer, cache_dir=cfg.cache_dir,
                                       on_corrupt=cfg.on_corrupt, order=order, partitions=cfg.stream_partitions)
        self.stream = CorpusStream(self.stream_cfg, self.rank, self.world, batched=True, corpus=corpus)
        self.card = self.stream.card
        for stage in cfg.stages:
            stage_boundary_indices(self.card.num_saved_states, stage)  # a clear message if the corpus cannot serve it
        self.train_samples = self.stream.corpus.num_samples  # the training split
        self.stage_steps = cfg.stage_steps(student_cls, self.train_samples, self.world)
        self.total_steps = sum(self.stage_steps)
        self.samples_seen = 0  # corpus samples consumed by all ranks (epochs = samples_seen / train_samples)
        planned = self.total_steps * self.stream.global_batch * cfg.gradient_accumulation_steps / self.train_samples
        if acc.is_main_process and not self.online_only and planned > WARN_EPOCHS:
            print(f"note: {self.total_steps} steps x {self.stream.global_batch * cfg.gradient_accumulation_steps} "
                  f"corpus samples = {planned:.0f} epochs over {self.train_samples} training trajectories; a "
                  "student over-fits a small corpus (generate more trajectories, or pass fewer --max-steps)",
                  file=sys.stderr)

        self.student: Student = student_cls.build(self.card, cfg, device=acc.device,
                                                  main_process_first=acc.main_process_first,
                                                  progress=cfg.progress and acc.is_main_process)
        network = self.student.network
        self.objective = cfg.objective or self.student.default_objective  # the corpus objective's name
        if self.fsdp is not None:  # sharded in place before the EMA and the optimizer see its parameters
            self.fsdp.shard(network, self.student.fsdp_units())
        self.ema = EMA(self.student.ema_tensors(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # FSDP2 modules are not wrapped (their hooks all-gather and reduce-scatter); DDP through accelerate
        self.model, self.optimizer = (network, optimizer) if self.fsdp is not None else acc.prepare(network, optimizer)
        self.checkpointer.attach(accelerator=acc, fsdp=self.fsdp, student=self.student, model=self.model,
                                 optimizer=self.optimizer, ema=self.ema)
        ctx = ObjectiveContext(cfg=cfg, accelerator=acc, student=self.student, model=self.model, fsdp=self.fsdp,
                               rank=self.rank, world=self.world, card=self.card, online_only=self.online_only,
                               rollout_teacher=self.rollout_teacher)
        for cls in active_objectives(cfg, self.student.default_objective):
            objective = cls(ctx)
            self.objectives.append(objective)  # (closed by close() even if its build fails)
            objective.build()
            for name, part in objective.stateful().items():
                self.checkpointer.register(name, part)
        self.skipped_samples = 0
        if cfg.resume:
            self._resume()
        if acc.is_main_process and log_with:  # the same scalars as metrics.jsonl go to every tracker
            start_trackers(acc, cfg, self.log_dir)
        if acc.is_main_process:  # one JSON line per logged step, next to the TensorBoard logs (plots, tests)
            Path(self.log_dir, "logs").mkdir(parents=True, exist_ok=True)
            self._metrics = open(Path(self.log_dir) / "logs" / "metrics.jsonl", "a")
        if cfg.consumed_log:
            Path(cfg.consumed_log).mkdir(parents=True, exist_ok=True)
            self._consumed = open(Path(cfg.consumed_log) / f"rank-{self.rank}.jsonl", "a")
        self.evaluator = Evaluator(self)
        self.evaluator.resume(self.step)

    def _resume(self) -> None:
        resumed = self.checkpointer.resume()
        if resumed is None:
            return
        rng, st, path = resumed
        torch.set_rng_state(rng["torch_cpu"])
        self.step = int(st["step"])
        self.skipped_samples = int(st.get("skipped_samples", 0))
        self.stream.load_state_dict(st["data"])  # any world size: the cursor is global
        if self.accelerator.is_main_process:
            print(f"resumed from {redact_url(self.cfg.out)}/{path} at step {self.step} "
                  f"(epoch {self.stream.epoch}, cursor {self.stream.cursor})")

    # -- what callers read ---------------------------------------------------------------------------
    def part(self, name: str) -> Objective | None:
        """The active objective named ``name`` (``trainer.objectives``), or None."""
        return next((o for o in self.objectives if o.name == name), None)

    @property
    def best(self) -> dict[str, Any] | None:
        """The best validation evaluation so far with its weights (``trainer.evaluator``), or None."""
        return None if self.evaluator is None else self.evaluator.best

    @property
    def epochs_made(self) -> float:
        """Passes over the training split so far (the stream's epoch plus the used part of the current one)."""
        return self.stream.epoch + self.stream.cursor / max(1, self.train_samples)

    @property
    def teacher(self):
        """The corpus's teacher where the student family keeps it (flow nets of GMM/flow-net corpora), else None."""
        return self.student.teacher

    def summaries(self) -> list[str]:
        """The objectives' phrases for the run's closing line."""
        return [s for s in (o.summary() for o in self.objectives) if s]

    def stage_at(self, step: int) -> int:
        return stage_at(step, self.cfg.stages, self.stage_steps)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.cfg.lr, self.cfg.warmup_steps)

    # -- the loop --------------------------------------------------------------------------------
    def _corpus_batches(self):
        """This rank's corpus batches, epoch after epoch, from one loader: its workers start once and
        roll into the next epoch themselves; begin_step moves the stream to the next epoch when one is
        used up and checks each batch against the cursor."""
        for batch in make_dataloader(self.stream, num_workers=self.cfg.num_workers, epochs=None):
            self.stream.begin_step(batch)
            if self._consumed is not None:
                self._consumed.write(json.dumps({
                    "step": self.step, "rank": self.rank, "epoch": self.stream.epoch,
                    "positions": batch["position"].tolist(), "indices": batch["index"].tolist(),
                    "valid": batch["valid"].tolist()}) + "\n")
                self._consumed.flush()
            yield batch

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last = {}
        for objective in self.objectives:
            objective.start(self.step, self.stage_at(self.step))
        self._t_last, self._samples_since = time.perf_counter(), 0
        self._batches = None if self.online_only else self._corpus_batches()  # ota-ratio 1: no corpus batches
        try:
            while self.step < self.total_steps:
                batches, corpus_samples = [], 0
                for _ in range(cfg.gradient_accumulation_steps):
                    batch = None if self._batches is None else next(self._batches)
                    if batch is not None:  # the cursor moves as a batch is taken: a checkpoint after the
                        self.stream.advance()  # step sits on an optimizer-step boundary
                        corpus_samples += self.stream.global_batch
                        self.samples_seen += self.stream.global_batch
                    batches.append(batch)
                last = self.train_step(batches)
                self.step += 1
                # samples the objectives brought besides the corpus (per rank, times the world size)
                self._after_step(last, bar, corpus_samples + last.get(EXTRA_SAMPLES, 0) * self.world)
        finally:
            if self._batches is not None:
                self._batches.close()  # stops the DataLoader's workers
                self._batches = None
            if bar is not None:
                bar.close()
        return last

    def log_metrics(self, row: dict[str, Any], *, eval_row: bool = False) -> None:
        """``row`` to the trackers and to metrics.jsonl (main process) at the current step."""
        self.accelerator.log(row, step=self.step)
        if self._metrics is not None:
            extra = {"eval": True} if eval_row else {}
            self._metrics.write(json.dumps({"step": self.step, "time": time.time(), **extra, **row}) + "\n")
            self._metrics.flush()

    def _after_step(self, last: dict[str, Any], bar, samples: int) -> None:
        """Metrics (trackers, metrics.jsonl, progress bar), evaluation and checkpoints after an optimizer step."""
        cfg = self.cfg
        self._samples_since += samples
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            dt = time.perf_counter() - self._t_last
            last["samples_per_s"] = self._samples_since / max(dt, 1e-9)
            last["epoch"] = self.stream.epoch
            last["skipped_samples"] = self.skipped_samples
            self.log_metrics(last)
            if bar is not None:
                extra = {k: v for o in self.objectives for k, v in o.progress(last).items()}
                bar.set_postfix(loss=f"{last['loss']:.4f}", stage=last["stage"],
                                sps=f"{last['samples_per_s']:.0f}", **extra)
            self._t_last, self._samples_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if self.evaluator.due(self.step, self.total_steps):
            self.evaluator.evaluate()
        if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
            self.save_checkpoint()
        else:
            self.checkpointer.heartbeat()  # tells a live run from a killed one

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, Any] | None] | dict[str, Any] | None) -> dict[str, float]:
        """One optimizer step over ``cfg.gradient_accumulation_steps`` micro-batches (a corpus batch each, or
        None when training online only): one forward and one backward per micro-batch, gradients summed (each
        loss / K), then one clip / step / EMA and the objectives' auxiliary steps. One window generator per
        optimizer step, seeded by (seed, step, rank) and consumed by the micro-batches in order, so K
        micro-batches of b draw the windows one batch of K x b would (with window_points start). A non-finite
        loss or gradient stops training before the weights change (``NonFiniteLossError``)."""
        if batches is None or isinstance(batches, dict):
            batches = [batches]
        cfg, acc = self.cfg, self.accelerator
        g = torch.Generator().manual_seed(seed63(cfg.seed, self.step, self.rank))
        stage = self.stage_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        K = len(batches)
        totals = {"loss": 0.0, "reflow_loss": 0.0}
        counts = {"valid": 0}
        metrics: dict[str, Any] = {}
        for i, batch in enumerate(batches):
            last_micro = i == K - 1
            # DDP all-reduces on the last micro-batch only (no_sync), as accelerate's accumulate() does; FSDP2
            # reduce-scatters every micro-batch into the sharded gradients (no full-size gradient is kept)
            with contextlib.nullcontext() if last_micro or self.world == 1 or self.fsdp else acc.no_sync(self.model):
                micro, micro_metrics = self._micro_step(batch, stage, g, 1.0 / K, last_micro)
            for k in totals:
                totals[k] += micro[k] / K
            counts["valid"] += micro["valid"]
            for o, m in micro_metrics:
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0) + v if k in o.summed_metrics else v
        grad_norm = self._clip(self.trainable, cfg.grad_clip)
        # the gradient norm is the same on every rank (after the all-reduce), so every rank stops together; fp16's
        # loss scaler skips overflowing steps itself
        if ((self.world == 1 and not math.isfinite(totals["loss"]))
                or (cfg.mixed_precision != "fp16" and not math.isfinite(float(grad_norm)))):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"training stopped at step {self.step}: the loss is {totals['loss']:.6g} and the "
                                     f"gradient norm {float(grad_norm):.6g} (non-finite); the weights of the last "
                                     "checkpoint are kept: lower --lr or --grad-clip, or check the corpus")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for o in self.objectives:
            metrics.update(o.optimizer_step())
        if self.ema is not None:
            self.ema.update(self.student.trainable_state_dict())
        return {**totals, "grad_norm": float(grad_norm), "stage": stage, "lr": self.lr_at(self.step), **counts,
                **self.student.step_metrics(), **metrics}

    def _clip(self, params, max_norm: float):
        """Gradient clipping (accelerate's for DDP; over the sharded gradients for FSDP2); the total norm."""
        if self.fsdp is not None:
            return self.fsdp.clip_grad_norm_(params, max_norm)
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def _micro_step(self, batch: dict[str, Any] | None, stage: int, g: torch.Generator, scale: float,
                    last: bool) -> tuple[dict[str, float], list[tuple[Objective, dict[str, float]]]]:
        """Forward and backward of one micro-batch: every objective's rows in one forward, the shared regression
        over the rows with a target, each objective's loss term; the losses are multiplied by ``scale``
        before backward. Returns (loss, reflow_loss, valid rows) and each objective's metrics."""
        cfg, acc, device = self.cfg, self.accelerator, self.accelerator.device
        valid = torch.ones(0, dtype=torch.bool) if batch is None else batch["valid"].bool()
        mb = MicroBatch(batch, None if batch is None else self.student.corpus_condition(batch), valid, stage, g, last)
        rows: list[tuple[Objective, Rows | None]] = [(o, o.prepare(mb)) for o in self.objectives]
        present = [(o, r) for o, r in rows if r is not None and len(r) > 0]
        v_all, offsets, at = None, {}, 0
        if present:
            with acc.autocast():  # one forward for every objective's rows keeps DDP to one pass per micro-batch
                v_all = self.model(torch.cat([r.x_BX for _, r in present]).to(device),
                                   torch.cat([r.sigma_B for _, r in present]).to(device),
                                   *condition_to(cat_conditions([r.cond for _, r in present]), device))
            for o, r in present:
                offsets[id(o)] = (at, at + len(r))
                at += len(r)
        loss = reflow = None
        targets = [(o, r) for o, r in present if r.target_BX is not None]
        if targets:  # rows with a velocity target (corpus and online windows): one aligned-v regression
            lo, hi = offsets[id(targets[0][0])][0], offsets[id(targets[-1][0])][1]
            contiguous = hi - lo == sum(len(r) for _, r in targets)
            v = v_all[lo:hi] if contiguous else torch.cat([v_all[slice(*offsets[id(o)])] for o, _ in targets])
            loss = reflow = _regression_loss(
                v.float(), torch.cat([r.target_BX for _, r in targets]).to(device),
                torch.cat([torch.ones(len(r), dtype=torch.bool) if r.valid_B is None else r.valid_B
                           for _, r in targets]).to(device), cfg.alpha)
        metrics: list[tuple[Objective, dict[str, float]]] = []
        for o, r in rows:
            own = None if r is None or r.target_BX is not None or id(o) not in offsets else v_all[slice(*offsets[id(o)])]
            term, m = o.loss(mb, own)
            metrics.append((o, m))
            if term is not None:
                loss = term if loss is None else loss + term
                if reflow is None and not o.auxiliary:  # the corpus objective that replaces the regression
                    reflow = term
        if loss is None:
            raise RuntimeError(f"no objective gave a loss at step {self.step} (objectives: "
                               f"{', '.join(o.name for o in self.objectives) or 'none'})")
        acc.backward(loss * scale if scale != 1.0 else loss)
        for o in self.objectives:
            m = o.after_backward(mb, scale)
            if m:
                metrics.append((o, m))
        self.skipped_samples += int((~valid).sum())
        reflow = loss if reflow is None else reflow
        return {"loss": float(loss.detach()), "reflow_loss": float(reflow.detach()), "valid": int(valid.sum())}, metrics

    # -- checkpoints and export -----------------------------------------------------------------------
    def host_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full CPU copies of ``tensors`` on the main process. FSDP2: gathered from the shards (a collective: every
        rank calls it; the other ranks get {})."""
        if self.fsdp is not None:
            return self.fsdp.full_tensors(tensors, keep=self.accelerator.is_main_process)
        return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.step, {"data": self.stream.state_dict(), "skipped_samples": self.skipped_samples,
                                           "stage": self.stage_at(max(0, self.step - 1)),
                                           "train_config": public_config(self.cfg.to_dict())})  # no secrets at rest

    def export_student(self) -> str | None:
        """The EMA (or raw) weights plus what evaluation and the stock pipelines need, under out/student/
        (``student.safetensors`` for flow nets; a folder a stock diffusers pipeline loads otherwise).

        FSDP2: the exported weights are gathered from the shards onto the main process (a collective: every
        rank calls this), which builds the student unsharded on the CPU from the card (the teacher's frozen
        weights, the same LoRA adapters) and exports it with those weights exactly as a DDP run does."""
        acc, best = self.accelerator, self.best
        best = best if self.cfg.export == "best" else None  # the weights that did best on the validation split
        if best is not None:
            weights = best["weights"]
        else:
            weights = self.ema.state_dict() if self.ema is not None else self.student.trainable_state_dict()
            if self.fsdp is not None:
                weights = self.host_weights(weights)
        if not acc.is_main_process:
            if self.fsdp is not None:
                acc.wait_for_everyone()
            return None
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never hand a user NaN weights that a stock pipeline would load without a word
            if self.fsdp is not None:
                acc.wait_for_everyone()  # the other ranks wait for the export
            raise NonFiniteLossError(f"not exporting: {len(bad)} of {len(weights)} weight tensors are non-finite "
                                     f"(first: {bad[0]}); the run diverged")
        student = self.student
        if self.fsdp is not None:
            from dataclasses import replace

            student = type(self.student).build(self.card, replace(self.cfg, adv_weight=0.0, gradient_checkpointing=False),
                                               device="cpu")
        run = {"data": redact_url(self.cfg.data), "steps": self.step, "stages": list(self.cfg.stages), "alpha": self.cfg.alpha,
               "window_points": self.cfg.window_points, "objective": self.objective, "ema": self.ema is not None,
               "selected": "last"}
        if best is not None:
            run.update(selected="best", best_step=best["step"],
                       validation={k: best[k] for k in ("steps", "coupling_error", "swd", "window_errors")})
        with tempfile.TemporaryDirectory() as tmp:
            for rel in student.export(weights, tmp, run):
                self.ckpt.write(f"student/{rel}", Path(tmp, rel).read_bytes())
        if self.fsdp is not None:
            acc.wait_for_everyone()
        entry = type(self.student).export_entry
        return f"{self.cfg.out}/student" + (f"/{entry}" if entry else "")

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
        for objective in self.objectives:
            objective.close()
        for f in (self._metrics, self._consumed):
            if f is not None:
                f.close()
        if self.stream is not None:
            self.stream.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
        if self.fsdp is not None:
            self.fsdp.close()
        if self.checkpointer is not None:
            self.checkpointer.release()
