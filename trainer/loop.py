"""The Trainer: build / train / close, one readable loop on accelerate.

Each step: take this rank's batch of authentic trajectories from the streaming corpus, draw one
window per sample of the current progressive stage (``flowcore.windows``), predict the velocity at
the training point and minimise the aligned v-prediction loss against the straight-line window
target; AdamW with linear warmup, gradient clipping, EMA; the data cursor advances by the global
batch. Window draws use a generator seeded by (seed, step, rank), so a resumed run replays exactly
the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from flowcore.adversarial import (
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    step_probabilities,
    student_last_step_inputs,
)
from flowcore.losses import aligned_v_loss
from flowcore.windows import sample_windows, stage_boundary_indices
from models.flownet import save_flow_net
from models.gmm import GMMTeacher
from trainer.checkpoint import CheckpointStore
from trainer.config import TrainConfig
from trainer.data import CorpusStream, StreamConfig, make_dataloader, open_corpus
from trainer.ota import OTAMixer, load_card_prompts
from trainer.students.flownet import build_student, student_net_config
from trainer.students.flownet_discriminator import TrajectoryDiscriminator
from trainer.teacher import teacher_from_card

#: TrainConfig fields that do not change what a checkpoint holds (ignored when explaining a mismatch)
_RUN_ONLY_KEYS = {"data", "out", "max_steps", "steps_per_stage", "resume", "progress", "cache_dir", "storage_options",
                  "consumed_log", "log_every", "checkpoint_every", "num_workers", "ota_timeout", "ota_prefetch"}


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
        self.ota = self._metrics = self._consumed = self.stream = None
        if cfg.ota_ratio > 0 and rollout_teacher is None:
            raise ValueError("ota-ratio > 0 needs a teacher pool: `trajflow train` connects to one (see --address), "
                             "Python callers pass rollout_teacher=")

    # -- build -----------------------------------------------------------------------------------
    def build(self) -> Trainer:
        from accelerate import Accelerator

        cfg = self.cfg
        # TensorBoard writes local files: next to the checkpoints for a local --out, else under ./runs/<hash>
        if "://" not in cfg.out or cfg.out.startswith("file://"):
            log_dir = cfg.out.removeprefix("file://")
        else:
            log_dir = os.path.join("runs", hashlib.sha256(cfg.out.encode()).hexdigest()[:12])
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
        if cfg.batch_size is None or cfg.mixed_precision is None:  # memory-aware defaults by the corpus's teacher
            kind = open_corpus(cfg.data, cfg.storage_options).card.teacher.kind
            cuda = torch.cuda.is_available()
            cfg.resolve_defaults(kind, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                                       log_with=log_with, project_dir=str(Path(log_dir) / "logs"))
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.online_only = cfg.corpus_batch_size == 0  # ota-ratio 1: the corpus gives the card only
        if self.online_only and cfg.adv_weight > 0:
            raise ValueError("adversarial training judges against corpus states; use ota-ratio < 1 with adv-weight")
        self.stream_cfg = StreamConfig(url=cfg.data, batch_size=max(1, cfg.corpus_batch_size), storage_options=cfg.storage_options,
                                       seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, cache_dir=cfg.cache_dir,
                                       on_corrupt=cfg.on_corrupt)
        self.stream = CorpusStream(self.stream_cfg, self.rank, self.world, batched=True)
        self.card = self.stream.card
        K = self.card.num_saved_states
        for stage in cfg.stages:
            stage_boundary_indices(K, stage)  # raises with a clear message if the corpus cannot serve it
        self.stage_steps = cfg.stage_steps(self.card.teacher.kind)
        self.total_steps = sum(self.stage_steps)
        # the teacher's own diffusers network as the student (full or LoRA): an SD3 transformer or an SD1.5/SDXL UNet
        self.diffusers = self.card.teacher.kind in ("diffusers", "diffusers_unet")
        self.diffusers_ema = None  # EMA of the trainable weights only
        if self.diffusers:
            student = self._build_diffusers_student()
            self.ema = None
            params = [p for p in student.parameters() if p.requires_grad]
        else:
            self.teacher = teacher_from_card(self.card, cfg.storage_options)
            self.net_cfg = student_net_config(self.card, cfg.student_arch, cfg.student_width, cfg.student_depth)
            with acc.main_process_first():  # rank 0 fits (and caches) the GMM teacher's net first
                student = build_student(self.card, self.net_cfg, cfg.init, self.teacher, cfg.teacher_fit_steps,
                                        seed=cfg.seed, progress=cfg.progress and acc.is_main_process)
            self.ema = copy.deepcopy(student).requires_grad_(False) if cfg.ema_decay > 0 else None
            params = list(student.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = acc.prepare(student, optimizer)
        self.disc = self.disc_optimizer = None
        if cfg.adv_weight > 0:
            torch.manual_seed(cfg.seed + 1)
            if self.diffusers:  # copies of the teacher's first blocks, taken before LoRA went in
                disc = self._diffusers_disc
            else:
                disc = TrajectoryDiscriminator(self.net_cfg, cfg.disc_blocks).load_backbone(student)
            d_opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr,
                                      betas=(0.0, 0.99))
            self.disc, self.disc_optimizer = acc.prepare(disc, d_opt)
        self.ota = None
        if cfg.ota_ratio > 0:
            real = None
            if isinstance(self.teacher, GMMTeacher):
                def real(n, g, cls, _t=self.teacher):
                    return _t.sample(n, g, cls)
            prompts = None
            if self.card.conditioning.kind == "prompt":  # online requests draw from the corpus's prompt file
                prompts = load_card_prompts(self.card, cfg.storage_options)
            self.ota = OTAMixer(self.rollout_teacher, self.card, mode=cfg.ota_mode, samples_per_step=cfg.ota_samples,
                                seed=cfg.seed, rank=self.rank, window_points=cfg.window_points,
                                prefetch=cfg.ota_prefetch, timeout_s=cfg.ota_timeout, real_sampler=real,
                                verbose=acc.is_main_process, prompts=prompts)
        self.ckpt = CheckpointStore(cfg.out, cfg.storage_options)
        self.skipped_samples = 0
        if cfg.resume:
            self._resume()
        if acc.is_main_process and log_with:
            acc.init_trackers("trajflow", config={k: v for k, v in cfg.to_dict().items()
                                                  if isinstance(v, (int, float, str, bool))})
        self._metrics = None
        if acc.is_main_process:  # one JSON line per logged step, next to the TensorBoard logs (plots, tests)
            Path(log_dir, "logs").mkdir(parents=True, exist_ok=True)
            self._metrics = open(Path(log_dir) / "logs" / "metrics.jsonl", "a")
        self._consumed = None
        if cfg.consumed_log:
            Path(cfg.consumed_log).mkdir(parents=True, exist_ok=True)
            self._consumed = open(Path(cfg.consumed_log) / f"rank-{self.rank}.jsonl", "a")
        return self

    def _build_diffusers_student(self):
        """The teacher's transformer (SD3) or UNet (SD1.5/SDXL) as the student (LoRA or full), its frozen
        text encoders for the prompts."""
        from trainer.students.diffusers import PromptEmbeddingCache, check_diffusers_corpus
        from trainer.students.sd3 import build_sd3_student
        from trainer.students.unet import build_unet_student

        cfg, acc = self.cfg, self.accelerator
        check_diffusers_corpus(self.card, cfg)
        teacher = teacher_from_card(self.card, cfg.storage_options, device=acc.device)
        gc = cfg.gradient_checkpointing
        if gc is None:  # memory-aware default: activations dominate at 1024 px on a GPU; CPU runs are tiny
            gc = acc.device.type == "cuda"
        build = build_sd3_student if self.card.teacher.kind == "diffusers" else build_unet_student
        if cfg.adv_weight > 0:  # D copies the teacher's first blocks *before* LoRA adapters go into them
            from trainer.students.sd3_discriminator import SD3TrajectoryDiscriminator

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                self._diffusers_disc = SD3TrajectoryDiscriminator(
                    teacher.transformer, cfg.disc_blocks, num_train_timesteps=teacher.num_train_timesteps)
        student = build(teacher, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, gradient_checkpointing=gc,
                        init=cfg.init, seed=cfg.seed)
        self.teacher = None  # its network *is* the student now: no second copy in memory
        self.prompts = PromptEmbeddingCache(teacher.prompt_encoder, cfg.prompt_cache_size)
        self.condition_tensors = student.condition_tensors  # prompt condition -> the student's forward arguments
        self.net_cfg = None
        if cfg.ema_decay > 0:  # EMA of the trainable weights only (the LoRA adapters, or the whole network)
            self.diffusers_ema = {n: p.detach().clone() for n, p in student.trainable_state_dict().items()}
        return student

    def _resume(self) -> None:
        latest = self.ckpt.latest()
        if latest is None:
            return
        ck = self.ckpt.load(latest["path"])
        try:
            if self.diffusers:
                self.accelerator.unwrap_model(self.model).load_trainable_state_dict(ck["model"])
                if self.diffusers_ema is not None and ck["ema"] is not None:
                    ema = self.diffusers_ema
                    self.diffusers_ema = {n: t.to(ema[n].device, ema[n].dtype) for n, t in ck["ema"].items()}
            else:
                self.accelerator.unwrap_model(self.model).load_state_dict(ck["model"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another student than this run's
            before = ck["state"].get("train_config", {})
            now = self.cfg.to_dict()
            diff = sorted(k for k in now if k in before and before[k] != now[k] and k not in _RUN_ONLY_KEYS)
            raise ValueError(f"the checkpoint under {self.cfg.out} ({latest['path']}) does not fit this run's student "
                             f"(settings that differ: {', '.join(diff) or 'none recorded'}; {str(e)[:160]}); "
                             "use a new --out, or --no-resume") from None
        if self.disc is not None:
            if "disc" not in ck["extra"]:
                raise ValueError(f"the checkpoint under {self.cfg.out} has no discriminator; it was trained without "
                                 "--adv-weight (start a new --out, or keep the run's settings)")
            self.accelerator.unwrap_model(self.disc).load_state_dict(ck["extra"]["disc"])
            self.disc_optimizer.load_state_dict(ck["extra_optimizers"]["disc"])
        torch.set_rng_state(ck["rng"]["torch_cpu"])
        st = ck["state"]
        self.step = int(st["step"])
        self.skipped_samples = int(st.get("skipped_samples", 0))
        self.stream.load_state_dict(st["data"])  # any world size: the cursor is global
        if self.accelerator.is_main_process:
            print(f"resumed from {self.cfg.out}/{latest['path']} at step {self.step} "
                  f"(epoch {self.stream.epoch}, cursor {self.stream.cursor})")

    # -- train -----------------------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        acc = 0
        for stage, n in zip(self.cfg.stages, self.stage_steps):
            acc += n
            if step < acc:
                return stage
        return self.cfg.stages[-1]

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def _student_fn(self):
        """v(x, sigma, class, guidance) of the weights the student samples with (EMA if kept), no grad."""
        net = self.ema if self.ema is not None else self.accelerator.unwrap_model(self.model)
        use_cls, use_guid = bool(self.net_cfg.num_classes), self.net_cfg.guidance_cond

        @torch.no_grad()
        def fn(x, sigma, cls=None, guid=None):
            return net(x, sigma, cls if use_cls else None, guid if use_guid else None)

        return fn

    def _online_windows(self, stage: int, g: torch.Generator, wait: bool) -> tuple[Any, dict[str, float]]:
        """OTA (both student kinds): the oldest finished rollout as windows of ``stage`` (an OTABatch, or None
        when none is ready), the request queue refilled, and the ota_* counters."""
        if self.ota is None:
            return None, {}
        ob = self.ota.take(stage, g, wait=wait)
        self.ota.fill(stage, self._ota_student_fn())
        return ob, dict(self.ota.stats)

    def _ota_student_fn(self):
        """The student's sampler for ``--ota-mode student`` requests (None in the other modes)."""
        return self._student_fn() if self.cfg.ota_mode == "student" else None

    def _diffusers_train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One step of a diffusers student: windows as for flow nets, prompts encoded by the frozen text encoders."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        valid = batch["valid"].bool()
        g = torch.Generator().manual_seed(_seed_of(cfg.seed, self.step, self.rank))
        stage = self.stage_at(self.step)
        wb = sample_windows(batch["states"], batch["sigmas"][0], stage, cfg.window_points, generator=g)
        texts = batch.get("prompt") or [""] * len(valid)  # unconditional corpora: the empty prompt
        cond = self.prompts(list(texts)).to(device=device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        x, sigma, ctens, adv, stats = wb.x_BX, wb.sigma_B, self.condition_tensors(cond), None, {}
        target, mask = wb.v_target_BX, valid
        ob, ota_stats = self._online_windows(stage, g, wait=False)
        stats.update(ota_stats)
        if ob is not None:  # OTA: online windows join the reflow part, their prompts embedded like the corpus's
            w = ob.windows
            ocond = self.prompts(list(ob.prompts or [""] * len(w.x_BX))).to(device=device)
            x, sigma = torch.cat([x, w.x_BX]), torch.cat([sigma, w.sigma_B])
            target, mask = torch.cat([target, w.v_target_BX]), torch.cat([mask, torch.ones(len(w.x_BX), dtype=torch.bool)])
            ctens = tuple(None if a is None else torch.cat([a, b]) for a, b in zip(ctens, self.condition_tensors(ocond)))
        n_online = x.shape[0] - wb.x_BX.shape[0]
        n_reflow = x.shape[0]
        if self.disc is not None:  # the student's own few-step states vs the teacher's, as for flow nets
            adv = self._adversarial_inputs(batch, stage, g, cond)
            x, sigma = torch.cat([x, adv["start"]]), torch.cat([sigma, adv["sigma_from"]])
            ctens = tuple(torch.cat([a, b]) for a, b in zip(ctens, adv["cond"]))
        with acc.autocast():  # one forward for the reflow and adversarial parts
            v_all = self.model(x.to(device), sigma.to(device), *ctens)
        loss = reflow = _masked_loss(v_all[:n_reflow].float(), target.to(device), mask.to(device), cfg.alpha)
        if adv is not None:
            fake = self._adversarial_generator_part(adv, v_all[n_reflow:].float(), stats)
            loss = loss + stats.pop("_g_loss_tensor")
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if adv is not None:
            self._discriminator_step(adv, fake.detach(), stats)
        if self.diffusers_ema is not None:
            with torch.no_grad():
                for n, p in acc.unwrap_model(self.model).trainable_state_dict().items():
                    self.diffusers_ema[n].lerp_(p.detach().to(self.diffusers_ema[n].dtype), 1.0 - cfg.ema_decay)
        self.skipped_samples += int((~valid).sum())
        return {"loss": float(loss.detach()), "reflow_loss": float(reflow.detach()), "grad_norm": float(grad_norm),
                "stage": stage, "lr": self.lr_at(self.step), "valid": int(valid.sum()),
                "prompt_cache_hits": self.prompts.hits, "prompt_cache_misses": self.prompts.misses,
                "online_in_step": n_online, **stats}

    def train_step(self, batch: dict[str, Any] | None) -> dict[str, float]:
        """One optimizer step on a corpus batch (None when training online only) plus online windows."""
        if self.diffusers:
            return self._diffusers_train_step(batch)
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        g = torch.Generator().manual_seed(_seed_of(cfg.seed, self.step, self.rank))
        stage = self.stage_at(self.step)
        parts = []  # (x, sigma, target, valid mask, class, guidance) of the corpus and the online windows
        if batch is not None:
            valid = batch["valid"].bool()
            wb = sample_windows(batch["states"], batch["sigmas"][0], stage, cfg.window_points, generator=g)
            parts.append((wb.x_BX, wb.sigma_B, wb.v_target_BX, valid, batch["class_id"], batch["guidance"].float()))
        else:
            valid = torch.ones(0, dtype=torch.bool)
        ob, stats = self._online_windows(stage, g, wait=batch is None)
        if ob is not None:  # online windows join the batch when a rollout is ready
            w = ob.windows
            parts.append((w.x_BX, w.sigma_B, w.v_target_BX, torch.ones(len(ob.guidance_B), dtype=torch.bool),
                          ob.class_B, ob.guidance_B.float()))
        if not parts:
            raise RuntimeError(f"no online rollout arrived within {cfg.ota_timeout:.0f} s and there is no corpus "
                               "part (ota-ratio 1); is the teacher pool up?")
        n_online = sum(len(p[0]) for p in parts[0 if batch is None else 1:])
        x, sigma, target, mask = (torch.cat([p[i] for p in parts]) for i in range(4))
        cls = torch.cat([p[4] for p in parts]) if self.net_cfg.num_classes else None
        guid = torch.cat([p[5] for p in parts]) if self.net_cfg.guidance_cond else None
        n_reflow = x.shape[0]
        adv = None
        if self.disc is not None and batch is not None:  # the student's own few-step states vs the teacher's
            adv = self._adversarial_inputs(batch, stage, g)
            x = torch.cat([x, adv["start"]])
            sigma = torch.cat([sigma, adv["sigma_from"]])
            if cls is not None:
                cls = torch.cat([cls, adv["cls"]])
            if guid is not None:
                guid = torch.cat([guid.float(), adv["guid"].float()])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with acc.autocast():  # one forward for reflow and adversarial parts keeps DDP to one pass per step
            v_all = self.model(x.to(device), sigma.to(device), None if cls is None else cls.to(device),
                               None if guid is None else guid.to(device))
        v = v_all[:n_reflow]
        loss = _masked_loss(v, target.to(device), mask.to(device), cfg.alpha)
        stats["reflow_loss"] = float(loss.detach())
        if adv is not None:
            fake = self._adversarial_generator_part(adv, v_all[n_reflow:], stats)
            loss = loss + stats.pop("_g_loss_tensor")
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if adv is not None:
            self._discriminator_step(adv, fake.detach(), stats)
        if self.ema is not None:
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), acc.unwrap_model(self.model).parameters()):
                    pe.lerp_(pm.detach().to(pe.dtype), 1.0 - cfg.ema_decay)
        self.skipped_samples += int((~valid).sum())
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "stage": stage,
                "lr": self.lr_at(self.step), "valid": int(valid.sum()), "online_in_step": n_online, **stats}

    # -- adversarial distillation on trajectory states ----------------------------------------------
    def _adversarial_inputs(self, batch, stage: int, g: torch.Generator, cond=None) -> dict[str, Any]:
        """Real: the corpus's teacher states at the student's sigmas; and where the student's judged step starts.

        cond: a diffusers student's prompt condition for the batch's rows (None for flow nets). Returns
        start/sigma_from/sigma_to/real, the student's condition for the judged step (cls/guid for flow nets,
        ``cond`` [the student's condition tensors] for diffusers students) and ``disc_cond``, D's condition
        arguments after (x, sigma): (class | None,) for flow nets, (prompt_embeds, pooled) for SD3."""
        valid = batch["valid"].bool()
        if not bool(valid.any()):  # a batch of placeholders (skip policy): judge them rather than desync DDP
            valid = torch.ones_like(valid)
        states = batch["states"][valid]
        K = states.shape[1]
        bounds = stage_boundary_indices(K, stage)
        sig_K = batch["sigmas"][0].float()
        boundary_sigmas = [float(sig_K[i]) for i in bounds]
        probs = step_probabilities(stage, self.cfg.adv_step_probs if self.cfg.adv_step_probs is not None
                                   and len(self.cfg.adv_step_probs) == stage else None)
        n_B = torch.multinomial(probs, states.shape[0], replacement=True, generator=g) + 1
        real = states[torch.arange(states.shape[0]), torch.tensor(bounds)[n_B]]
        if self.diffusers:  # the current (not EMA) weights: swapping an EMA in would copy them twice per step
            ctens = tuple(t[valid.to(t.device)] for t in self.condition_tensors(cond))
            net, acc = self.accelerator.unwrap_model(self.model), self.accelerator

            def student_fn(x, s):
                with acc.autocast():
                    return net(x.to(acc.device), s.to(acc.device), *ctens).float().to(x.device)

            start, s_from, s_to = student_last_step_inputs(student_fn, states[:, 0], boundary_sigmas, n_B)
            return {"start": start, "sigma_from": s_from, "sigma_to": s_to, "real": real, "cond": ctens,
                    "disc_cond": ctens}
        cls = batch["class_id"][valid] if self.net_cfg.num_classes else None
        guid = batch["guidance"][valid] if self.net_cfg.guidance_cond else None
        fn = self._student_fn()
        start, s_from, s_to = student_last_step_inputs(lambda x, s: fn(x, s, cls, guid), states[:, 0],
                                                       boundary_sigmas, n_B)
        return {"start": start, "sigma_from": s_from, "sigma_to": s_to, "real": real, "cls": cls, "guid": guid,
                "disc_cond": (batch["class_id"][valid] if self.net_cfg.num_classes else None,)}

    def _adversarial_generator_part(self, adv, v_fake, stats) -> torch.Tensor:
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        h = (adv["sigma_to"] - adv["sigma_from"]).to(device).reshape(-1, *([1] * (v_fake.ndim - 1)))
        fake = adv["start"].to(device) + h * v_fake
        d = acc.unwrap_model(self.disc)  # no DDP hooks: the generator's loss must not train D
        trainable = [p for p in d.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        sig = adv["sigma_to"].to(device)
        dcond = tuple(None if c is None else c.to(device) for c in adv["disc_cond"])
        with acc.autocast():
            logit_fake, feats_fake = d(fake, sig, *dcond)
            with torch.no_grad():
                _, feats_real = d(adv["real"].to(device), sig, *dcond)
        for p in trainable:
            p.requires_grad_(True)
        g_adv = generator_adversarial_loss(logit_fake.float())
        g_fm = feature_matching_loss(feats_fake, feats_real)
        stats["_g_loss_tensor"] = cfg.adv_weight * g_adv + cfg.fm_weight * g_fm
        stats["adv_g_loss"] = float(g_adv.detach())
        stats["adv_fm_loss"] = float(g_fm.detach())
        return fake

    def _discriminator_step(self, adv, fake, stats) -> None:
        acc = self.accelerator
        device = acc.device
        n = fake.shape[0]
        sig = adv["sigma_to"].to(device)
        dcond = tuple(None if c is None else torch.cat([c, c]).to(device) for c in adv["disc_cond"])
        with acc.autocast():
            logits, _ = self.disc(torch.cat([adv["real"].to(device), fake]), torch.cat([sig, sig]), *dcond)
        logits = logits.float()
        d_loss = discriminator_hinge_loss(logits[:n], logits[n:])
        acc.backward(d_loss)
        acc.clip_grad_norm_([p for p in self.disc.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        stats["adv_d_loss"] = float(d_loss.detach())
        stats["adv_d_real"] = float(logits[:n].detach().mean())
        stats["adv_d_fake"] = float(logits[n:].detach().mean())

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
        while self.step < self.total_steps and self.online_only:  # ota-ratio 1: no corpus batches
            last = self.train_step(None)
            self.step += 1
            self._after_step(last, bar, last.get("online_in_step", 0) * self.world)
        while self.step < self.total_steps:
            if self.stream.remaining_steps == 0:
                self.stream.set_epoch(self.stream.epoch + 1)
            loader = make_dataloader(self.stream, num_workers=cfg.num_workers)
            for batch in loader:
                self._log_consumed(batch)
                last = self.train_step(batch)
                self.stream.advance()
                self.step += 1
                # online samples that really arrived (per rank, times the world size)
                self._after_step(last, bar, self.stream.global_batch + last.get("online_in_step", 0) * self.world)
                if self.step >= self.total_steps:
                    break
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
        if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process and self.diffusers:
            model = acc.unwrap_model(self.model)
            self.ckpt.save(self.step, model=model.trainable_state_dict(), ema=self.diffusers_ema,
                           optimizer=self.optimizer.state_dict(),
                           state={"data": self.stream.state_dict(), "skipped_samples": self.skipped_samples,
                                  "stage": self.stage_at(max(0, self.step - 1)), "train_config": self.cfg.to_dict()},
                           net_config=model.config(),
                           extra={} if self.disc is None else {"disc": acc.unwrap_model(self.disc).state_dict()},
                           extra_optimizers={} if self.disc is None else {"disc": self.disc_optimizer.state_dict()})
        elif acc.is_main_process:
            model = acc.unwrap_model(self.model)
            self.ckpt.save(self.step, model=model.state_dict(), ema=None if self.ema is None else self.ema.state_dict(),
                           optimizer=self.optimizer.state_dict(),
                           state={"data": self.stream.state_dict(), "skipped_samples": self.skipped_samples,
                                  "stage": self.stage_at(max(0, self.step - 1)), "train_config": self.cfg.to_dict()},
                           net_config=asdict(self.net_cfg),
                           extra={} if self.disc is None else {"disc": acc.unwrap_model(self.disc).state_dict()},
                           extra_optimizers={} if self.disc is None else {"disc": self.disc_optimizer.state_dict()})
        acc.wait_for_everyone()

    def export_student(self) -> str | None:
        """The EMA (or raw) weights plus what evaluation needs, as out/student/student.safetensors."""
        acc = self.accelerator
        if not acc.is_main_process:
            return None
        if self.diffusers:
            return self._export_diffusers_student()
        net = self.ema if self.ema is not None else acc.unwrap_model(self.model)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "student.safetensors")
            save_flow_net(net, path, extra={
                "card": json.loads(self.card.to_json()), "data": self.cfg.data, "steps": self.step,
                "stages": list(self.cfg.stages), "final_stage": self.cfg.stages[-1],
                "shift": float(self.card.run.get("shift", 1.0)), "alpha": self.cfg.alpha,
                "window_points": self.cfg.window_points})
            self.ckpt.write("student/student.safetensors", Path(path).read_bytes())
        return f"{self.cfg.out}/student/student.safetensors"

    def _export_diffusers_student(self) -> str:
        """out/student/: LoRA weights (or the transformer / UNet), our scheduler's config, trajflow_student.json:
        a folder a stock StableDiffusion3Pipeline / StableDiffusionPipeline / StableDiffusionXLPipeline loads."""
        import tempfile

        from trainer.students.sd3 import export_sd3_student
        from trainer.students.unet import export_unet_student

        model = self.accelerator.unwrap_model(self.model)
        weights = self.diffusers_ema if self.diffusers_ema is not None else model.trainable_state_dict()
        export = export_sd3_student if self.card.teacher.kind == "diffusers" else export_unet_student
        with tempfile.TemporaryDirectory() as tmp:
            files = export(model, weights, self.card, tmp, extra={
                "data": self.cfg.data, "train_steps": self.step, "stages": list(self.cfg.stages),
                "num_inference_steps": self.cfg.stages[-1], "alpha": self.cfg.alpha,
                "window_points": self.cfg.window_points, "ema": self.diffusers_ema is not None})
            for rel in files:
                self.ckpt.write(f"student/{rel}", Path(tmp, rel).read_bytes())
        return f"{self.cfg.out}/student"

    def close(self) -> None:
        if self.ota is not None:
            self.ota.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._consumed is not None:
            self._consumed.close()
        if self.stream is not None:
            self.stream.close()
        self.accelerator.end_training()
