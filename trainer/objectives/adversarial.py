"""Adversarial distillation on trajectory states (FlowSteer): a discriminator judges the student's own
few-step states against the teacher's stored states at the same sigmas; the student gets the generator's
hinge term plus feature matching, the discriminator its hinge loss (``flowcore.adversarial``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from flowcore.adversarial import (
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    step_probabilities,
    student_last_step_inputs,
)
from flowcore.tensors import expand_like
from flowcore.windows import stage_boundary_indices
from trainer.objectives.base import AuxState, MicroBatch, Objective, Rows
from trainer.students.base import Condition, condition_to, select_condition


@dataclass
class _Judged:
    """Where the student's judged step starts, and the teacher's state where it ends."""

    start_BX: torch.Tensor
    sigma_from_B: torch.Tensor
    sigma_to_B: torch.Tensor
    real_BX: torch.Tensor
    cond: Condition       # the student's forward arguments for these rows
    disc_cond: Condition  # the discriminator's arguments after (x, sigma)


class AdversarialObjective(Objective):
    """``--adv-weight W``: per corpus row, a step n of the stage is drawn (``--adv-step-probs``); the student
    walks its own first n-1 steps without gradient from the stored noise, and its n-th step (in the shared
    forward, with gradient) lands on a fake state; the teacher's stored state at that sigma is the real one.
    The discriminator (the family's, ``Student.build_discriminator``) trains with its own AdamW
    (``--disc-lr``, betas 0/0.99) after each student step."""

    name: ClassVar[str] = "adversarial"
    requires: ClassVar[frozenset[str]] = frozenset({"adversarial"})
    auxiliary: ClassVar[bool] = True

    @classmethod
    def active(cls, cfg, default_objective: str) -> bool:
        return cfg.adv_weight > 0

    def __init__(self, ctx):
        super().__init__(ctx)
        self.disc = self.disc_optimizer = None
        self._judged: _Judged | None = None
        self._fake: torch.Tensor | None = None
        self._stepped = False

    def build(self) -> None:
        ctx, cfg, acc = self.ctx, self.cfg, self.ctx.accelerator
        if ctx.online_only:
            raise ValueError("adversarial training judges against corpus states; use ota-ratio < 1 with adv-weight")
        torch.manual_seed(cfg.seed + 1)
        disc = ctx.student.build_discriminator(cfg)
        if ctx.fsdp is not None:
            ctx.fsdp.shard(disc, disc.fsdp_units())
        d_opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr,
                                  betas=(0.0, 0.99))
        self.disc, self.disc_optimizer = (disc, d_opt) if ctx.fsdp is not None else acc.prepare(disc, d_opt)

    def stateful(self) -> dict[str, AuxState]:
        d = self.ctx.accelerator.unwrap_model(self.disc)
        return {"disc": AuxState(self.disc, self.disc_optimizer, upgrade_optimizer=d.upgrade_optimizer_state_dict,
                                 missing="the checkpoint under {out} has no discriminator; it was trained without "
                                         "--adv-weight (start a new --out, or keep the run's settings)")}

    # -- one micro-batch ---------------------------------------------------------------------------
    def prepare(self, mb: MicroBatch) -> Rows | None:
        """Real: the corpus's teacher states at the student's sigmas; and where the student's judged step
        starts (its own Euler walk, no grad, from the same noise)."""
        self._judged = None
        if mb.batch is None:
            return None
        batch, cfg, ctx = mb.batch, self.cfg, self.ctx
        valid = batch["valid"].bool()
        if not bool(valid.any()):  # a batch of placeholders (skip policy): judge them rather than desync DDP
            valid = torch.ones_like(valid)
        states = batch["states"][valid]
        bounds = stage_boundary_indices(states.shape[1], mb.stage)
        sig_K = batch["sigmas"][0].float()
        boundary_sigmas = [float(sig_K[i]) for i in bounds]
        probs = step_probabilities(mb.stage, cfg.adv_step_probs if cfg.adv_step_probs is not None
                                   and len(cfg.adv_step_probs) == mb.stage else None)
        n_B = torch.multinomial(probs, states.shape[0], replacement=True, generator=mb.g) + 1
        real = states[torch.arange(states.shape[0]), torch.tensor(bounds)[n_B]]
        rows = select_condition(mb.cond, valid)
        fn = ctx.student.sampler(ctx.accelerator.autocast, ctx.accelerator.device)
        walked = int(n_B.max()) - 1  # student forwards of the walk (no grad)
        pad = 0 if ctx.fsdp is None else ctx.fsdp.all_max(walked) - walked
        start, s_from, s_to = student_last_step_inputs(lambda x, s: fn(x, s, *rows), states[:, 0], boundary_sigmas,
                                                       n_B)
        if pad:  # FSDP2: every rank runs as many student forwards (each one all-gathers the weights)
            one = select_condition(rows, torch.zeros(1, dtype=torch.long))
            for _ in range(pad):
                fn(states[:1, 0], torch.ones(1), *one)
        self._judged = _Judged(start, s_from, s_to, real, rows, ctx.student.discriminator_condition(rows))
        return Rows(start, s_from, rows)

    def loss(self, mb: MicroBatch, v_BX) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The student's judged step lands on fake states; the generator's adversarial + feature-matching loss."""
        adv = self._judged
        if adv is None:
            return None, {}
        cfg, acc = self.cfg, self.ctx.accelerator
        device = acc.device
        v_fake = v_BX.float()
        h = expand_like((adv.sigma_to_B - adv.sigma_from_B).to(device), v_fake)
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
        self._fake = fake.detach()
        return (cfg.adv_weight * g_adv + cfg.fm_weight * g_fm,
                {"adv_g_loss": float(g_adv.detach()), "adv_fm_loss": float(g_fm.detach())})

    def after_backward(self, mb: MicroBatch, scale: float) -> dict[str, float]:
        """The discriminator's hinge loss on real vs fake states, backward (times ``scale``); its optimizer
        steps in ``optimizer_step`` after the last micro-batch."""
        adv, fake = self._judged, self._fake
        self._judged = self._fake = None
        if adv is None or fake is None:
            return {}
        ctx, acc = self.ctx, self.ctx.accelerator
        device = acc.device
        n = fake.shape[0]
        sig = adv.sigma_to_B.to(device)
        dcond = tuple(None if c is None else torch.cat([c, c]).to(device) for c in adv.disc_cond)
        sync = mb.last or ctx.world == 1 or ctx.fsdp
        with contextlib.nullcontext() if sync else acc.no_sync(self.disc):
            with acc.autocast():
                logits, _ = self.disc(torch.cat([adv.real_BX.to(device), fake]), torch.cat([sig, sig]), *dcond)
            logits = logits.float()
            d_loss = discriminator_hinge_loss(logits[:n], logits[n:])
            acc.backward(d_loss * scale if scale != 1.0 else d_loss)
        self._stepped = True
        return {"adv_d_loss": float(d_loss.detach()), "adv_d_real": float(logits[:n].detach().mean()),
                "adv_d_fake": float(logits[n:].detach().mean())}

    def optimizer_step(self) -> dict[str, float]:
        if not self._stepped:
            return {}
        self._stepped = False
        params = [p for p in self.disc.parameters() if p.requires_grad]
        if self.ctx.fsdp is not None:
            self.ctx.fsdp.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            self.ctx.accelerator.clip_grad_norm_(params, self.cfg.grad_clip)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {}
