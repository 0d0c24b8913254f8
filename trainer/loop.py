"""The Trainer: build / train / close, one readable loop on accelerate.

Each step: take this rank's batch of authentic trajectories from the streaming corpus, draw one
window per sample of the current progressive stage (``flowcore.windows``), predict the velocity at
the training point and minimise the aligned v-prediction loss against the straight-line window
target; online windows (OTA) and the adversarial part join the same forward; AdamW with linear
warmup, gradient clipping, EMA; the data cursor advances by the global batch. Window draws use a
generator seeded by (seed, step, rank), so a resumed run replays exactly the steps an uninterrupted
run would have taken.

Everything that differs between student families (flow nets, SD3 transformers, SD1.5/SDXL UNets) is
behind ``trainer.students.base.Student``; this module has no branch on the family.

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
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flowcore.adversarial import (
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    step_probabilities,
    student_last_step_inputs,
)
from flowcore.losses import aligned_v_loss
from flowcore.windows import sample_windows, stage_boundary_indices
from storage_schemas.locations import LocationPolicy
from trainer.checkpoint import CheckpointStore, public_config, redact_url
from trainer.config import WARN_EPOCHS, TrainConfig
from trainer.data import CorpusStream, StreamConfig, make_dataloader, open_corpus
from trainer.ema import EMA
from trainer.ota import OTAMixer, load_card_prompts
from trainer.samples import GRID_SAMPLES, encode_png, log_to_trackers, sample_grid, sample_png_path
from trainer.students import Student, check_run
from trainer.students.base import Condition, cat_conditions, condition_to, select_condition
from trainer.validation import evaluate_student, load_validation

#: --report-to choices -> the accelerate trackers they start (metrics.jsonl is always written)
TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "mlflow": ["mlflow"],
            "all": ["tensorboard", "wandb", "mlflow"], "none": []}


def tracker_names(report_to: str) -> list[str]:
    """The accelerate trackers of ``--report-to`` (comma-separated names allowed), each checked to be
    installed, with the pip command when it is not."""
    names: list[str] = []
    for part in str(report_to).split(","):
        part = part.strip()
        if part not in TRACKERS:
            raise ValueError(f"--report-to {part!r}: choose from {', '.join(TRACKERS)} (comma-separated)")
        names += [n for n in TRACKERS[part] if n not in names]
    import importlib.util

    for n in names:
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"--report-to {n} needs the {n} package: pip install {n}"
                             + (" (or mlflow-skinny)" if n == "mlflow" else ""))
    return names


#: the best weights on the validation split so far, and what they scored (written at each new best)
BEST_WEIGHTS = "checkpoints/best/weights.safetensors"
BEST_META = "checkpoints/best/best.json"

#: TrainConfig fields that do not change what a checkpoint holds (ignored when explaining a mismatch)
_RUN_ONLY_KEYS = {"data", "out", "max_steps", "steps_per_stage", "resume", "progress", "cache_dir", "storage_options",
                  "consumed_log", "log_every", "checkpoint_every", "num_workers", "ota_timeout", "ota_prefetch",
                  "allow_teacher_locations", "eval_every", "export", "report_to", "parallelism",
                  "fsdp_mixed_precision"}


def _masked_loss(v: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Aligned-v loss over the valid rows; a batch of placeholders only (skip policy) gives a zero loss
    that still touches every parameter, which keeps DDP in lockstep."""
    if bool(valid.all()):
        return aligned_v_loss(v, target, alpha)
    if bool(valid.any()):
        return aligned_v_loss(v[valid], target[valid], alpha)
    return v.sum() * 0.0


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") & (2**63 - 1)


@dataclass
class _Part:
    """Rows of one step that share the reflow loss: windows of the corpus batch or of an online rollout."""

    x_BX: torch.Tensor
    sigma_B: torch.Tensor
    target_BX: torch.Tensor
    valid_B: torch.Tensor
    cond: Condition


@dataclass
class _Adversarial:
    """The adversarial part of a step: where the student's judged step starts, and the teacher's state there."""

    start_BX: torch.Tensor
    sigma_from_B: torch.Tensor
    sigma_to_B: torch.Tensor
    real_BX: torch.Tensor
    cond: Condition       # the student's forward arguments for these rows
    disc_cond: Condition  # the discriminator's arguments after (x, sigma)


class Trainer:
    """Distils a few-step student from a corpus (see module docstring).

    rollout_teacher: a ``flowcore.rollout.RolloutTeacher`` (the live pool's client, or a LocalRollout)
    that serves OTA rollouts when ``cfg.ota_ratio > 0``. The trainer never imports ``pipeline``.
    """

    def __init__(self, cfg: TrainConfig, rollout_teacher=None):
        self.cfg = cfg
        self.step = 0
        self.rollout_teacher = rollout_teacher
        # what close() releases, so that a build() that fails part-way can still be closed
        self.accelerator = self.ota = self._metrics = self._consumed = self.stream = self._batches = None
        self.fsdp = None  # trainer.fsdp.FSDP2 with --parallelism fsdp2
        self._no_grids = False  # set when a validation sample grid failed (training goes on without them)
        self._resume_from: tuple[dict[str, Any], dict[str, Any]] | None = None  # _resume_point(), read once
        self._resume_read = False
        if cfg.ota_ratio > 0 and rollout_teacher is None:
            raise ValueError("ota-ratio > 0 needs a teacher pool: `trajflow train` connects to one (see --address), "
                             "Python callers pass rollout_teacher=")

    # -- build -----------------------------------------------------------------------------------
    def build(self) -> Trainer:
        from accelerate import Accelerator

        corpus = open_corpus(self.cfg.data, self.cfg.storage_options)  # read once: the stream reuses it
        card = corpus.card
        cuda = torch.cuda.is_available()
        # memory-aware defaults by the corpus's teacher; the batch split is validated with them
        self.cfg = cfg = self.cfg.resolved(card.teacher.kind, cuda=cuda,
                                           bf16_supported=cuda and torch.cuda.is_bf16_supported())
        student_cls = check_run(card, cfg)  # every refusal of this family, before anything is built
        if cfg.objective == "unrolled" and student_cls.kind != "flownet":
            raise ValueError(f"--objective unrolled (the student's whole few-step solve, gradients through every "
                             f"step) is for flow-net students; {student_cls.display_name} train windows (drop "
                             "--objective, or --objective windows)")
        CheckpointStore(cfg.out, cfg.storage_options).check_writable()  # an unwritable --out fails before training
        # TensorBoard writes local files: next to the checkpoints for a local --out, else under ./runs/<hash>
        if "://" not in cfg.out or cfg.out.startswith("file://"):
            log_dir = cfg.out.removeprefix("file://")
        else:
            log_dir = os.path.join("runs", hashlib.sha256(cfg.out.encode()).hexdigest()[:12])
        log_with = tracker_names(cfg.report_to)
        self.accelerator = acc = Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision, log_with=log_with,
                                             project_dir=str(Path(log_dir) / "logs"))
        self.rank, self.world = acc.process_index, acc.num_processes
        if cfg.parallelism == "fsdp2":  # the process group (its own for one process), mesh and precision policy
            from trainer.fsdp import FSDP2

            self.fsdp = FSDP2(cfg.fsdp_mixed_precision, acc.device)
        self.online_only = cfg.corpus_batch_size == 0  # ota-ratio 1: the corpus gives the card only
        if self.online_only and cfg.adv_weight > 0:
            raise ValueError("adversarial training judges against corpus states; use ota-ratio < 1 with adv-weight")
        self.ckpt = CheckpointStore(cfg.out, cfg.storage_options)
        self._check_checkpoint_format()  # a sharded checkpoint needs an fsdp2 run, a full one a ddp run
        order = cfg.stream_order or self._checkpoint_stream_order() or "partitioned"
        self.stream_cfg = StreamConfig(url=cfg.data, batch_size=max(1, cfg.corpus_batch_size),
                                       storage_options=cfg.storage_options, seed=cfg.seed,
                                       shuffle_buffer=cfg.shuffle_buffer, cache_dir=cfg.cache_dir,
                                       on_corrupt=cfg.on_corrupt, order=order, partitions=cfg.stream_partitions)
        self.stream = CorpusStream(self.stream_cfg, self.rank, self.world, batched=True, corpus=corpus)
        self.card = self.stream.card
        for stage in cfg.stages:
            stage_boundary_indices(self.card.num_saved_states, stage)  # a clear message if the corpus cannot serve it
        self.train_samples = self.stream.corpus.num_samples  # the training split
        self.stage_steps = cfg.stage_steps(self.card.teacher.kind, self.train_samples, self.world)
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
        self.objective = cfg.objective or getattr(self.student, "default_objective", "windows")
        if self.fsdp is not None:  # sharded in place before the EMA and the optimizer see its parameters
            self.fsdp.shard(network)
        self.ema = EMA(self.student.ema_tensors(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # FSDP2 modules are not wrapped (their hooks all-gather and reduce-scatter); DDP through accelerate
        self.model, self.optimizer = (network, optimizer) if self.fsdp is not None else acc.prepare(network, optimizer)
        self.disc = self.disc_optimizer = None
        if cfg.adv_weight > 0:
            torch.manual_seed(cfg.seed + 1)
            disc = self.student.build_discriminator(cfg)
            if self.fsdp is not None:
                self.fsdp.shard(disc)
            d_opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr,
                                      betas=(0.0, 0.99))
            self.disc, self.disc_optimizer = (disc, d_opt) if self.fsdp is not None else acc.prepare(disc, d_opt)
        if cfg.ota_ratio > 0:
            prompts = None
            if self.card.conditioning.kind == "prompt":  # online requests draw from the corpus's prompt file
                policy = LocationPolicy(cfg.data, cfg.allow_teacher_locations)  # a card-named file: root or allowed
                prompts = load_card_prompts(self.card, cfg.storage_options,
                                            check_location=lambda loc: policy.check(loc, "the prompt file"))
            self.ota = OTAMixer(self.rollout_teacher, self.card, mode=cfg.ota_mode, samples_per_step=cfg.ota_samples,
                                seed=cfg.seed, rank=self.rank, window_points=cfg.window_points,
                                prefetch=cfg.ota_prefetch, timeout_s=cfg.ota_timeout,
                                real_sampler=self.student.real_sampler, verbose=acc.is_main_process, prompts=prompts)
        self.skipped_samples = 0
        if cfg.resume:
            self._resume()
        if acc.is_main_process and log_with:  # the same scalars as metrics.jsonl go to every tracker
            run_name = Path(log_dir).name or "trajflow"
            acc.init_trackers("trajflow", config={k: v for k, v in public_config(cfg.to_dict()).items()
                                                  if isinstance(v, (int, float, str, bool))},
                              init_kwargs={"wandb": {"dir": str(Path(log_dir) / "logs"), "name": run_name},
                                           "mlflow": {"run_name": run_name}})
        if acc.is_main_process:  # one JSON line per logged step, next to the TensorBoard logs (plots, tests)
            Path(log_dir, "logs").mkdir(parents=True, exist_ok=True)
            self._metrics = open(Path(log_dir) / "logs" / "metrics.jsonl", "a")
        if cfg.consumed_log:
            Path(cfg.consumed_log).mkdir(parents=True, exist_ok=True)
            self._consumed = open(Path(cfg.consumed_log) / f"rank-{self.rank}.jsonl", "a")
        self._build_validation()
        return self

    def _build_validation(self) -> None:
        """The validation split (main process: it evaluates, the other ranks go on) and the best weights so far."""
        cfg, acc = self.cfg, self.accelerator
        self.validation = self.best = None
        self.eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, self.total_steps // 10)
        # FSDP2: every rank evaluates (each forward all-gathers the weights), the main process reports
        if (not acc.is_main_process and self.fsdp is None) or cfg.eval_every == 0:
            return
        self.validation = load_validation(cfg.data, cfg.storage_options, cache_dir=cfg.cache_dir)
        if self.validation is None:
            print(f"note: {redact_url(cfg.data)} has no validation split (generate with --validation-trajectories): "
                  "no evaluation while training; the export holds the last weights", file=sys.stderr)
            return
        if self.ckpt.exists(BEST_META):  # a resumed run keeps the best weights of its first part
            meta = json.loads(self.ckpt.read(BEST_META))
            if meta.get("step", 0) <= self.step:
                self.best = {**meta, "weights": st_load(self.ckpt.read(BEST_WEIGHTS)) if acc.is_main_process else {}}

    def _resume_point(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(``CheckpointStore.latest()``, its state.json) of the checkpoint this run resumes from; None for a new
        run or an empty --out. Read once: the format check, the stream order and the resume all use it (on object
        storage each read is a round trip, and an unusable latest.json would warn each time)."""
        if not self._resume_read:
            self._resume_read = True
            latest = self.ckpt.latest() if self.cfg.resume else None
            if latest is not None:
                self._resume_from = (latest, json.loads(self.ckpt.read(f"{latest['path']}/state.json")))
        return self._resume_from

    def _checkpoint_stream_order(self) -> str | None:
        """The sample order of the checkpoint this run resumes from (runs saved before partitioned streaming
        used the global order: their state has version 1 and no "order"), None for a new run."""
        point = self._resume_point()
        if point is None:
            return None
        data = point[1].get("data") or {}
        return str(data.get("order", "global"))

    @property
    def epochs_made(self) -> float:
        """Passes over the training split so far (the stream's epoch plus the used part of the current one)."""
        return self.stream.epoch + self.stream.cursor / max(1, self.train_samples)

    @property
    def teacher(self):
        """The corpus's teacher where the student family keeps it (flow nets of GMM/flow-net corpora), else None."""
        return getattr(self.student, "teacher", None)

    def _misfit(self, latest: dict[str, Any], state: dict[str, Any], e: BaseException) -> ValueError:
        """The error for a checkpoint of another student than this run's, naming the settings that differ."""
        before = state.get("train_config", {})
        now = public_config(self.cfg.to_dict())  # as saved: without storage options and credentials
        diff = sorted(k for k in now if k in before and before[k] != now[k] and k not in _RUN_ONLY_KEYS)
        return ValueError(f"the checkpoint under {self.cfg.out} ({latest['path']}) does not fit this run's student "
                          f"(settings that differ: {', '.join(diff) or 'none recorded'}; {' '.join(str(e).split())[:160]}); "
                          "use a new --out, or --no-resume")

    def _no_disc_error(self) -> ValueError:
        return ValueError(f"the checkpoint under {self.cfg.out} has no discriminator; it was trained without "
                          "--adv-weight (start a new --out, or keep the run's settings)")

    def _check_checkpoint_format(self) -> None:
        """Before the student is built: the checkpoint this run resumes from was written with its parallelism."""
        from trainer.fsdp import SHARDED_FORMAT

        point = self._resume_point()
        if point is None:
            return
        latest, st = point
        sharded = st.get("format") == SHARDED_FORMAT
        if sharded != (self.cfg.parallelism == "fsdp2"):
            written = "--parallelism fsdp2 (sharded)" if sharded else "--parallelism ddp (full weights)"
            raise ValueError(f"the checkpoint under {redact_url(self.cfg.out)} ({latest['path']}) was written by a "
                             f"{written} run; resume it with --parallelism {'fsdp2' if sharded else 'ddp'} (any number "
                             "of processes), or use a new --out / --no-resume")

    def _resume(self) -> None:
        from trainer.fsdp import SHARDED_FORMAT

        point = self._resume_point()
        if point is None:
            return
        latest, st = point
        if st.get("format") == SHARDED_FORMAT:
            rng = self._resume_sharded(latest, st)
        else:
            rng = self._resume_full(latest)
        torch.set_rng_state(rng["torch_cpu"])
        self.step = int(st["step"])
        self.skipped_samples = int(st.get("skipped_samples", 0))
        self.stream.load_state_dict(st["data"])  # any world size: the cursor is global
        if self.accelerator.is_main_process:
            print(f"resumed from {redact_url(self.cfg.out)}/{latest['path']} at step {self.step} "
                  f"(epoch {self.stream.epoch}, cursor {self.stream.cursor})")

    def _resume_full(self, latest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights, EMA and optimizers of a DDP checkpoint (full tensors); returns its RNG state."""
        ck = self.ckpt.load(latest["path"])
        try:
            self.student.load_trainable_state_dict(ck["model"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another student than this run's
            raise self._misfit(latest, ck["state"], e) from None
        if self.disc is not None:
            if "disc" not in ck["extra"]:
                raise self._no_disc_error()
            disc = self.accelerator.unwrap_model(self.disc)
            disc.load_state_dict(ck["extra"]["disc"])
            d_osd = ck["extra_optimizers"]["disc"]
            if hasattr(disc, "upgrade_optimizer_state_dict"):  # saved before D's parameters changed (the SD3 one's)
                d_osd = disc.upgrade_optimizer_state_dict(d_osd)
            self.disc_optimizer.load_state_dict(d_osd)
        return ck["rng"]

    def _sharded_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
        """(tensors, optimizer scalars, the discriminator's state dict) of a sharded checkpoint, by checkpoint key
        (``trainer.fsdp.checkpoint_tensors``): the student's trainable weights, EMA and optimizer; the
        discriminator's weights and optimizer under ``disc.``. The tensors are the live (sharded) storage."""
        from trainer.fsdp import checkpoint_tensors

        tensors, scalars = checkpoint_tensors(self.model, self.optimizer, self.student.trainable_state_dict(),
                                              None if self.ema is None else self.ema.state_dict())
        disc_sd = None
        if self.disc is not None:
            disc_sd = self.disc.state_dict()
            t, sc = checkpoint_tensors(self.disc, self.disc_optimizer, disc_sd, None, prefix="disc.")
            tensors.update(t)
            scalars.update(sc)
        return tensors, scalars, disc_sd

    def _resume_sharded(self, latest: dict[str, Any], st: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights, EMA and optimizers of a sharded (FSDP2) checkpoint written at any world size, each rank reading
        the chunks of its own shards; returns the RNG state."""
        from trainer.fsdp import SHARDS_DIR, load_sharded, restore_optimizer

        if self.disc is not None and "disc" not in st.get("extra", []):
            raise self._no_disc_error()
        tensors, _, disc_sd = self._sharded_tensors()
        try:
            with self.ckpt.local_folder(f"{latest['path']}/{SHARDS_DIR}", "r") as folder:
                load_sharded(tensors, folder)
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:  # another student than this run's
            raise self._misfit(latest, st, e) from None
        scalars = st.get("optimizer_scalars", {})
        restore_optimizer(self.model, self.optimizer, tensors, scalars)
        if self.disc is not None:
            self.disc.load_state_dict(disc_sd)
            restore_optimizer(self.disc, self.disc_optimizer, tensors, scalars, prefix="disc.")
        return st_load(self.ckpt.read(f"{latest['path']}/rng.safetensors"))

    # -- schedules -------------------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        acc = 0
        for stage, n in zip(self.cfg.stages, self.stage_steps):
            acc += n
            if step < acc:
                return stage
        return self.cfg.stages[-1]

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    # -- one step --------------------------------------------------------------------------------
    def _ota_student_fn(self):
        """The student's sampler for ``--ota-mode student`` requests (None in the other modes)."""
        if self.cfg.ota_mode != "student":
            return None
        return self.student.sampler(self.accelerator.autocast, self.accelerator.device)

    def _online_part(self, stage: int, g: torch.Generator, wait: bool) -> tuple[_Part | None, dict[str, float]]:
        """OTA: the oldest finished rollout as windows of ``stage`` (None when none is ready), the request
        queue refilled, and the ota_* counters."""
        if self.ota is None:
            return None, {}
        ob = self.ota.take(stage, g, wait=wait)
        self.ota.fill(stage, self._ota_student_fn())
        if ob is None:
            return None, dict(self.ota.stats)
        w = ob.windows
        part = _Part(w.x_BX, w.sigma_B, w.v_target_BX, torch.ones(len(w.x_BX), dtype=torch.bool),
                     self.student.online_condition(ob))
        return part, dict(self.ota.stats)

    def train_step(self, batches: list[dict[str, Any] | None] | dict[str, Any] | None) -> dict[str, float]:
        """One optimizer step over ``cfg.gradient_accumulation_steps`` micro-batches (a corpus batch each, or
        None when training online only), each with its online windows and, with a discriminator, its
        adversarial part: one forward and one backward per micro-batch, gradients summed (each loss / K),
        then one clip / step / EMA. One window generator per optimizer step, seeded by (seed, step, rank) and
        consumed by the micro-batches in order, so K micro-batches of b draw the windows one batch of K x b
        would (with window_points start)."""
        if batches is None or isinstance(batches, dict):
            batches = [batches]
        cfg, acc, student = self.cfg, self.accelerator, self.student
        g = torch.Generator().manual_seed(_seed_of(cfg.seed, self.step, self.rank))
        stage = self.stage_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        K = len(batches)
        totals: dict[str, float] = {}
        counts = {"valid": 0, "online_in_step": 0}
        stats: dict[str, float] = {}
        for i, batch in enumerate(batches):
            last_micro = i == K - 1
            # DDP all-reduces on the last micro-batch only (no_sync), as accelerate's accumulate() does; FSDP2
            # reduce-scatters every micro-batch into the sharded gradients (no full-size gradient is kept)
            with contextlib.nullcontext() if last_micro or self.world == 1 or self.fsdp else acc.no_sync(self.model):
                micro = self._micro_step(batch, stage, g, 1.0 / K, stats, sync_disc=last_micro)
            for k in ("loss", "reflow_loss"):
                totals[k] = totals.get(k, 0.0) + micro[k] / K
            for k in counts:
                counts[k] += micro[k]
        grad_norm = self._clip(self.trainable, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc is not None and "adv_d_loss" in stats:
            self._clip([p for p in self.disc.parameters() if p.requires_grad], cfg.grad_clip)
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(student.trainable_state_dict())
        return {**totals, "grad_norm": float(grad_norm), "stage": stage, "lr": self.lr_at(self.step), **counts,
                **student.step_metrics(), **stats}

    def _clip(self, params, max_norm: float):
        """Gradient clipping (accelerate's for DDP; over the sharded gradients for FSDP2); the total norm."""
        if self.fsdp is not None:
            return self.fsdp.clip_grad_norm_(params, max_norm)
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def _micro_step(self, batch: dict[str, Any] | None, stage: int, g: torch.Generator, scale: float,
                    stats: dict[str, float], sync_disc: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch (its corpus windows, online windows, adversarial part);
        the losses are multiplied by ``scale`` before backward. ``stats`` gathers the ota_*/adv_* metrics."""
        cfg, acc, student = self.cfg, self.accelerator, self.student
        device = acc.device
        parts: list[_Part] = []
        valid = torch.ones(0, dtype=torch.bool)
        unrolled = None
        if batch is not None:
            valid = batch["valid"].bool()
            batch_cond = student.corpus_condition(batch)
            if self.objective == "unrolled":
                unrolled = self._unrolled_loss(batch, batch_cond, valid, stage)
            else:
                wb = sample_windows(batch["states"], batch["sigmas"][0], stage, cfg.window_points, generator=g)
                parts.append(_Part(wb.x_BX, wb.sigma_B, wb.v_target_BX, valid, batch_cond))
        online, ota_stats = self._online_part(stage, g, wait=batch is None)
        stats.update(ota_stats)
        if online is not None:
            parts.append(online)
        if not parts and unrolled is None:
            raise RuntimeError(f"no online rollout arrived within {cfg.ota_timeout:.0f} s and there is no corpus "
                               "part (ota-ratio 1); is the teacher pool up?")
        n_online = 0 if online is None else online.x_BX.shape[0]
        adv = None
        if self.disc is not None and batch is not None:  # the student's own few-step states vs the teacher's
            adv = self._adversarial_inputs(batch, batch_cond, stage, g)
        loss = reflow = unrolled if unrolled is not None else torch.zeros((), device=device)
        if parts or adv is not None:
            xs = [p.x_BX for p in parts] + ([adv.start_BX] if adv is not None else [])
            sigmas = [p.sigma_B for p in parts] + ([adv.sigma_from_B] if adv is not None else [])
            cond = cat_conditions([p.cond for p in parts] + ([adv.cond] if adv is not None else []))
            n_reflow = sum(p.x_BX.shape[0] for p in parts)
            with acc.autocast():  # one forward for every part keeps DDP to one pass per micro-batch
                v_all = self.model(torch.cat(xs).to(device), torch.cat(sigmas).to(device), *condition_to(cond, device))
            if parts:
                target = torch.cat([p.target_BX for p in parts]).to(device)
                mask = torch.cat([p.valid_B for p in parts]).to(device)
                reflow = _masked_loss(v_all[:n_reflow].float(), target, mask, cfg.alpha)
                loss = reflow if unrolled is None else unrolled + reflow
        if adv is not None:
            fake, g_loss = self._generator_part(adv, v_all[n_reflow:].float(), stats)
            loss = loss + g_loss
        acc.backward(loss * scale if scale != 1.0 else loss)
        if adv is not None:
            self._discriminator_backward(adv, fake.detach(), stats, scale, sync=sync_disc)
        self.skipped_samples += int((~valid).sum())
        return {"loss": float(loss.detach()), "reflow_loss": float(reflow.detach()), "valid": int(valid.sum()),
                "online_in_step": n_online}

    def _unrolled_loss(self, batch, cond: Condition, valid: torch.Tensor, stage: int) -> torch.Tensor:
        """Mean squared distance between the student's own ``stage``-step Euler solve from each trajectory's stored
        noise (its state at sigma 1) and the stored endpoint, with gradient through every step, so a step learns
        to make up for the errors of the steps before it. Rows that are not ``valid`` do not count."""
        acc, device = self.accelerator, self.accelerator.device
        states, sig = batch["states"], batch["sigmas"][0].float()
        bounds = stage_boundary_indices(states.shape[1], stage)
        rows = condition_to(cond, device)
        x = states[:, 0].to(device).float()
        for i0, i1 in zip(bounds[:-1], bounds[1:]):
            s0, s1 = float(sig[i0]), float(sig[i1])
            with acc.autocast():
                v = self.model(x, torch.full((x.shape[0],), s0, device=device), *rows)
            x = x + (s1 - s0) * v.float()
        err = ((x - states[:, bounds[-1]].to(device).float()) ** 2).flatten(1).mean(1)
        mask = valid.to(device)
        if bool(mask.all()):
            return err.mean()
        return err[mask].mean() if bool(mask.any()) else err.sum() * 0.0

    # -- adversarial distillation on trajectory states ----------------------------------------------
    def _adversarial_inputs(self, batch, cond: Condition, stage: int, g: torch.Generator) -> _Adversarial:
        """Real: the corpus's teacher states at the student's sigmas; and where the student's judged step
        starts (its own Euler walk, no grad, from the same noise). ``cond``: the batch's student condition."""
        valid = batch["valid"].bool()
        if not bool(valid.any()):  # a batch of placeholders (skip policy): judge them rather than desync DDP
            valid = torch.ones_like(valid)
        states = batch["states"][valid]
        bounds = stage_boundary_indices(states.shape[1], stage)
        sig_K = batch["sigmas"][0].float()
        boundary_sigmas = [float(sig_K[i]) for i in bounds]
        probs = step_probabilities(stage, self.cfg.adv_step_probs if self.cfg.adv_step_probs is not None
                                   and len(self.cfg.adv_step_probs) == stage else None)
        n_B = torch.multinomial(probs, states.shape[0], replacement=True, generator=g) + 1
        real = states[torch.arange(states.shape[0]), torch.tensor(bounds)[n_B]]
        rows = select_condition(cond, valid)
        fn = self.student.sampler(self.accelerator.autocast, self.accelerator.device)
        walked = int(n_B.max()) - 1  # student forwards of the walk (no grad)
        pad = 0 if self.fsdp is None else self.fsdp.all_max(walked) - walked
        start, s_from, s_to = student_last_step_inputs(lambda x, s: fn(x, s, *rows), states[:, 0], boundary_sigmas,
                                                       n_B)
        if pad:  # FSDP2: every rank runs as many student forwards (each one all-gathers the weights)
            one = select_condition(rows, torch.zeros(1, dtype=torch.long))
            for _ in range(pad):
                fn(states[:1, 0], torch.ones(1), *one)
        return _Adversarial(start, s_from, s_to, real, rows, self.student.discriminator_condition(rows))

    def _generator_part(self, adv: _Adversarial, v_fake, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake states after the student's judged step, the generator's adversarial + feature-matching loss)."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        h = (adv.sigma_to_B - adv.sigma_from_B).to(device).reshape(-1, *([1] * (v_fake.ndim - 1)))
        fake = adv.start_BX.to(device) + h * v_fake
        d = acc.unwrap_model(self.disc)  # no DDP hooks: the generator's loss must not train D
        trainable = [p for p in d.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        sig = adv.sigma_to_B.to(device)
        dcond = condition_to(adv.disc_cond, device)
        with acc.autocast():
            logit_fake, feats_fake = d(fake, sig, *dcond)
            with torch.no_grad():
                _, feats_real = d(adv.real_BX.to(device), sig, *dcond)
        for p in trainable:
            p.requires_grad_(True)
        g_adv = generator_adversarial_loss(logit_fake.float())
        g_fm = feature_matching_loss(feats_fake, feats_real)
        stats["adv_g_loss"] = float(g_adv.detach())
        stats["adv_fm_loss"] = float(g_fm.detach())
        return fake, cfg.adv_weight * g_adv + cfg.fm_weight * g_fm

    def _discriminator_backward(self, adv: _Adversarial, fake, stats, scale: float, sync: bool) -> None:
        """The discriminator's hinge loss on real vs fake states, backward (times ``scale``); its optimizer
        steps in ``train_step`` after the last micro-batch."""
        acc = self.accelerator
        device = acc.device
        n = fake.shape[0]
        sig = adv.sigma_to_B.to(device)
        dcond = tuple(None if c is None else torch.cat([c, c]).to(device) for c in adv.disc_cond)
        with contextlib.nullcontext() if sync or self.world == 1 or self.fsdp else acc.no_sync(self.disc):
            with acc.autocast():
                logits, _ = self.disc(torch.cat([adv.real_BX.to(device), fake]), torch.cat([sig, sig]), *dcond)
            logits = logits.float()
            d_loss = discriminator_hinge_loss(logits[:n], logits[n:])
            acc.backward(d_loss * scale if scale != 1.0 else d_loss)
        stats["adv_d_loss"] = float(d_loss.detach())
        stats["adv_d_real"] = float(logits[:n].detach().mean())
        stats["adv_d_fake"] = float(logits[n:].detach().mean())

    # -- the loop --------------------------------------------------------------------------------
    def _corpus_batches(self):
        """This rank's corpus batches, epoch after epoch, from one loader: its workers start once and
        roll into the next epoch themselves; begin_step moves the stream to the next epoch when one is
        used up and checks each batch against the cursor."""
        for batch in make_dataloader(self.stream, num_workers=self.cfg.num_workers, epochs=None):
            self.stream.begin_step(batch)
            self._log_consumed(batch)
            yield batch

    def _log_consumed(self, batch) -> None:
        if self._consumed is not None:
            self._consumed.write(json.dumps({
                "step": self.step, "rank": self.rank, "epoch": self.stream.epoch,
                "positions": batch["position"].tolist(), "indices": batch["index"].tolist(),
                "valid": batch["valid"].tolist()}) + "\n")
            self._consumed.flush()

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last = {}
        if self.ota is not None:  # the first rollouts are in flight before the first step
            self.ota.fill(self.stage_at(self.step), self._ota_student_fn())
            self.ota.wait_first(min(cfg.ota_timeout, 120.0))
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
                # online samples that really arrived (per rank, times the world size)
                self._after_step(last, bar, corpus_samples + last.get("online_in_step", 0) * self.world)
        finally:
            if self._batches is not None:
                self._batches.close()  # stops the DataLoader's workers
                self._batches = None
            if bar is not None:
                bar.close()
        return last

    def _after_step(self, last: dict[str, Any], bar, samples: int) -> None:
        """Metrics (TensorBoard, metrics.jsonl, progress bar) and checkpoints after an optimizer step."""
        cfg, acc = self.cfg, self.accelerator
        self._samples_since += samples
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            dt = time.perf_counter() - self._t_last
            last["samples_per_s"] = self._samples_since / max(dt, 1e-9)
            last["epoch"] = self.stream.epoch
            last["skipped_samples"] = self.skipped_samples
            acc.log(last, step=self.step)
            if self._metrics is not None:
                self._metrics.write(json.dumps({"step": self.step, "time": time.time(), **last}) + "\n")
                self._metrics.flush()
            if bar is not None:
                extra = {} if self.ota is None else {"ota_short": last.get("ota_shortfall", 0)}
                bar.set_postfix(loss=f"{last['loss']:.4f}", stage=last["stage"],
                                sps=f"{last['samples_per_s']:.0f}", **extra)
            self._t_last, self._samples_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if self.validation is not None and (self.step % self.eval_every == 0 or self.step == self.total_steps):
            self.evaluate()
        if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
            self.save_checkpoint()

    def evaluate(self) -> dict[str, Any]:
        """The EMA student on the validation split at the current stage's step count (``trainer.validation``):
        logged as val_* (metrics.jsonl, trackers); diffusers students also show the first validation samples as
        an image grid (``_sample_grid``); at the final stage's step count, the lowest coupling error so far makes
        these weights the best (kept in memory and under checkpoints/best/)."""
        stage = self.stage_at(max(0, self.step - 1))
        ema = None if self.ema is None else self.ema.state_dict()
        self.model.eval()
        try:
            with self.student.ema_sampler(ema, self.accelerator.autocast, self.accelerator.device) as fn:
                res = evaluate_student(fn, self.student.corpus_condition, self.validation, stage,
                                       keep_samples=GRID_SAMPLES)
        finally:
            self.model.train()
        references, samples = res.pop("references"), res.pop("samples")
        if self.accelerator.is_main_process and not self._no_grids:
            try:
                self._sample_grid(references, samples, stage)
            except (RuntimeError, OSError, ValueError) as e:  # a failed picture must not end a long run
                self._no_grids = True
                print(f"warning: the validation sample grid failed at step {self.step} ({' '.join(str(e).split())[:200]}); "
                      "training goes on without grids", file=sys.stderr)
        row = {"val_steps": stage, "val_coupling_error": res["coupling_error"], "val_swd": res["swd"],
               **{f"val_window_{w}_error": e for w, e in enumerate(res["window_errors"])}}
        self.accelerator.log(row, step=self.step)
        if self._metrics is not None:
            self._metrics.write(json.dumps({"step": self.step, "time": time.time(), "eval": True, **row}) + "\n")
            self._metrics.flush()
        if stage == self.cfg.stages[-1] and (self.best is None or res["coupling_error"] < self.best["coupling_error"]):
            weights = self._host_weights(ema or self.student.trainable_state_dict())
            self.best = {"step": self.step, "steps": stage, "coupling_error": res["coupling_error"], "swd": res["swd"],
                         "window_errors": res["window_errors"], "weights": weights}
            if self.accelerator.is_main_process:  # (FSDP2: every rank evaluates)
                self.ckpt.write(BEST_WEIGHTS, st_save({k: v.contiguous() for k, v in weights.items()}))
                self.ckpt.write(BEST_META, json.dumps({k: v for k, v in self.best.items() if k != "weights"},
                                                      sort_keys=True).encode())
        return res

    def _sample_grid(self, references: torch.Tensor, samples: torch.Tensor, stage: int) -> None:
        """The validation sample grid (``trainer.samples``): the teacher's stored endpoints | the EMA student's
        ``stage``-step samples, as images where the family makes them (diffusers students), written under
        <out>/logs/samples/ and sent to the trackers. Main process; no collective (the samples are at hand)."""
        preview = getattr(self.student, "preview_images", None)  # optional: flow nets show no images
        made = None if preview is None else preview(torch.cat([references, samples]), self.accelerator.device)
        if made is None:
            return
        images, how = made
        n = references.shape[0]
        grid = sample_grid(images[:n], images[n:])
        self.ckpt.write(sample_png_path(self.step), encode_png(grid))
        caption = (f"step {self.step}: left the teacher's endpoint, right the EMA student's {stage}-step sample "
                   f"({how}); the first {n} validation trajectories")
        log_to_trackers(self.accelerator.trackers, grid, self.step, caption)

    def _host_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full CPU copies of ``tensors`` on the main process. FSDP2: gathered from the shards (a collective: every
        rank calls it; the other ranks get {})."""
        if self.fsdp is not None:
            return self.fsdp.full_tensors(tensors, keep=self.accelerator.is_main_process)
        return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}

    # -- checkpoints and export -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        acc = self.accelerator
        if self.fsdp is not None:
            return self._save_sharded()
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.ckpt.save(self.step, model=self.student.trainable_state_dict(),
                           ema=None if self.ema is None else self.ema.state_dict(),
                           optimizer=self.optimizer.state_dict(),
                           state={"data": self.stream.state_dict(), "skipped_samples": self.skipped_samples,
                                  "stage": self.stage_at(max(0, self.step - 1)),
                                  "train_config": public_config(self.cfg.to_dict())},  # no secrets at rest
                           net_config=self.student.net_config(),
                           extra={} if self.disc is None else {"disc": acc.unwrap_model(self.disc).state_dict()},
                           extra_optimizers={} if self.disc is None else {"disc": self.disc_optimizer.state_dict()})
        acc.wait_for_everyone()

    def _save_sharded(self) -> None:
        """A sharded checkpoint (FSDP2): every rank writes its chunks of the weights, EMA and optimizer state
        through torch.distributed.checkpoint's safetensors storage (``trainer.fsdp``), then the main process
        writes rng.safetensors and state.json (with the optimizer's scalars) and commits latest.json."""
        from trainer.fsdp import SHARDED_FORMAT, SHARDS_DIR, save_sharded

        acc = self.accelerator
        acc.wait_for_everyone()
        rel = f"checkpoints/step-{self.step:08d}"
        tensors, scalars, _ = self._sharded_tensors()
        with self.ckpt.local_folder(f"{rel}/{SHARDS_DIR}", "w") as folder:
            save_sharded(tensors, folder)
        acc.wait_for_everyone()  # every rank's shards are written before the commit
        if acc.is_main_process:
            self.ckpt.commit(self.step, rel, rng={"torch_cpu": torch.get_rng_state()}, state={
                "format": SHARDED_FORMAT, "world_size": self.world, "net_config": self.student.net_config(),
                "data": self.stream.state_dict(), "skipped_samples": self.skipped_samples,
                "stage": self.stage_at(max(0, self.step - 1)), "optimizer_scalars": scalars,
                "extra": [] if self.disc is None else ["disc"],
                "train_config": public_config(self.cfg.to_dict())})  # no secrets at rest
        acc.wait_for_everyone()

    def export_student(self) -> str | None:
        """The EMA (or raw) weights plus what evaluation and the stock pipelines need, under out/student/
        (``student.safetensors`` for flow nets; a folder a stock diffusers pipeline loads otherwise).

        FSDP2: the exported weights are gathered from the shards onto the main process (a collective: every rank
        calls this), which builds the student unsharded on the CPU from the card (the teacher's frozen weights,
        the same LoRA adapters) and exports it with those weights exactly as a DDP run does."""
        acc = self.accelerator
        best = self.cfg.export == "best" and self.best is not None  # the weights that did best on the validation split
        if best:
            weights = self.best["weights"]
        elif self.fsdp is not None:
            weights = self._host_weights(self.ema.state_dict() if self.ema is not None
                                         else self.student.trainable_state_dict())
        else:
            weights = self.ema.state_dict() if self.ema is not None else self.student.trainable_state_dict()
        if not acc.is_main_process:
            if self.fsdp is not None:
                acc.wait_for_everyone()
            return None
        student = self.student
        if self.fsdp is not None:
            from dataclasses import replace

            student = type(self.student).build(self.card, replace(self.cfg, adv_weight=0.0, gradient_checkpointing=False),
                                               device="cpu")
        run = {"data": redact_url(self.cfg.data), "steps": self.step, "stages": list(self.cfg.stages), "alpha": self.cfg.alpha,
               "window_points": self.cfg.window_points, "objective": self.objective, "ema": self.ema is not None,
               "selected": "last"}
        if best:
            run.update(selected="best", best_step=self.best["step"],
                       validation={k: self.best[k] for k in ("steps", "coupling_error", "swd", "window_errors")})
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
        if self.ota is not None:
            self.ota.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._consumed is not None:
            self._consumed.close()
        if self.stream is not None:
            self.stream.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
        if self.fsdp is not None:
            self.fsdp.close()
