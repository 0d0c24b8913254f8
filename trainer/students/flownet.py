"""The flow-net student (``FlowNetStudent``): its architecture from the card, initialised from the teacher's weights.

The analytic GMM teacher has no weights. Its student (``init="teacher"``, the default) is the exact GMM
velocity plus a residual flow net whose output layer starts at zero (``FlowNetConfig.base_gmm``), so the
untrained student samples exactly as the teacher does and training only learns the correction that the
few-step windows need, as a diffusers student fine-tunes a copy of its teacher. ``init="fitted"`` is the
earlier route: a plain flow net fitted to the same GMM by flow matching (``models.flownet.fit_flow_net``),
cached on local disk by (GMM fingerprint, architecture, fit budget) so every run and every rank reuses it;
its own approximation error (4-step coupling 0.46 on latent10 against the teacher's 0.18) was more than a
few-step student can win back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
from dataclasses import replace
from typing import Any, ClassVar

import torch

from models.cache import cache_root
from models.digits import read_cached_flow_net, write_cached_flow_net
from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher, fit_flow_net, save_flow_net
from models.gmm import GMMTeacher
from storage_schemas import DatasetCard
from trainer.students.base import Condition, Sampler, StudentBase
from trainer.students.flownet_discriminator import TrajectoryDiscriminator
from trainer.students.folder import FLOWNET_STUDENT_FILE, flownet_student_metadata
from trainer.teacher import teacher_from_card


def student_net_config(card: DatasetCard, arch: str, width: int, depth: int) -> FlowNetConfig:
    shape = tuple(card.sample_shape)
    if arch == "auto":
        arch = "mlp" if math.prod(shape) <= 1024 or len(shape) != 3 else "conv"
    guidance_cond = not isinstance(card.solver.guidance, (int, float))
    num_classes = card.conditioning.num_classes if card.conditioning.kind == "class" else None
    return FlowNetConfig(arch, shape, num_classes, width=width, depth=depth, guidance_cond=guidance_cond)


def pretrained_gmm_net(teacher: GMMTeacher, net_cfg: FlowNetConfig, fit_steps: int, seed: int = 0,
                       progress: bool = False) -> FlowNet:
    """A flow net fitted to the GMM (the weights a student starts from), cached on disk."""
    base_cfg = replace(net_cfg, guidance_cond=False)
    key = hashlib.sha256(json.dumps({"gmm": teacher.fingerprint(), "net": base_cfg.to_dict(), "steps": fit_steps,
                                     "seed": seed}, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root() / "pretrained" / f"gmm-{key}.safetensors"
    cached = read_cached_flow_net(path, expect=base_cfg)  # None: a miss, or an entry whose digest does not match
    if cached is not None:
        return cached[0]
    torch.manual_seed(seed)
    net = FlowNet(base_cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=fit_steps, desc="fit teacher net", unit="step", leave=False)

    def tick(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    fit_flow_net(net, lambda n, g: teacher.sample(n, g), steps=fit_steps, batch_size=256, lr=2e-3, seed=seed,
                 progress=tick)
    if bar is not None:
        bar.close()
    # digest in the entry, written atomically; returned as later processes load it (bit-identical weights)
    return write_cached_flow_net(path, net, extra={"fitted_to": teacher.fingerprint(), "steps": fit_steps})


def init_flow_net_student(card: DatasetCard, net_cfg: FlowNetConfig, init: str, teacher, fit_steps: int,
                  seed: int = 0, progress: bool = False) -> FlowNet:
    """A student FlowNet, initialised from the teacher (or fitted to a GMM, or from scratch)."""
    torch.manual_seed(seed)
    if init == "teacher" and isinstance(teacher, GMMTeacher):
        guidance = card.solver.guidance
        return FlowNet(replace(net_cfg, base_gmm=teacher.spec.to_json_dict(),
                               base_guidance=float(guidance) if isinstance(guidance, (int, float)) else 1.0))
    student = FlowNet(net_cfg)
    if init == "scratch":
        return student
    if init == "fitted" and not isinstance(teacher, GMMTeacher):
        raise ValueError("--init fitted is for GMM teachers (a flow net fitted to the mixture); "
                         "this corpus's teacher has weights: use --init teacher")
    if isinstance(teacher, GMMTeacher):
        src = pretrained_gmm_net(teacher, net_cfg, fit_steps, seed=0, progress=progress)
    elif isinstance(teacher, FlowNetTeacher):
        src = teacher.net
        if replace(src.cfg, guidance_cond=False) != replace(net_cfg, guidance_cond=False):
            raise ValueError(f"the student architecture {net_cfg} must match the teacher's {src.cfg} to start from "
                             "its weights; use --init scratch or matching --student-* flags")
    else:
        raise ValueError(f"cannot initialise a student from {type(teacher).__name__}")
    missing, unexpected = student.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.startswith("cond.guidance") for k in missing):
        raise ValueError(f"teacher weights do not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student


class FlowNetStudent(StudentBase):
    """The ``Student`` of GMM and flow-net corpora: a ``FlowNet`` v(x, sigma, class, guidance).

    Samples (OTA student mode, the adversarial walk) with the EMA weights when an EMA is kept: the EMA
    tensors are the parameters of a shadow copy of the network, so no weights are swapped per step.
    Checkpoint keys and the export (``student/student.safetensors``) are the network's full state_dict.
    Keeps its teacher (``teacher``: the perflow sampler, evaluation against the teacher); shows no previews.
    """

    kind: ClassVar[str] = "flownet"
    display_name: ClassVar[str] = "flow-net students"
    teacher_kinds: ClassVar[tuple[str, ...]] = ("gmm", "flownet")
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"ota:fresh", "ota:student", "ota:perflow", "ota:online_only", "adversarial", "objective:unrolled"})
    #: flow nets are small: big batches, full precision
    DEFAULT_BUDGET: ClassVar[int] = 1500
    DEFAULT_BATCH_SIZE: ClassVar[int] = 128
    DEFAULT_MIXED_PRECISION_ON_BF16_GPU: ClassVar[str] = "no"
    #: the exported file under out/student/
    export_entry: ClassVar[str] = FLOWNET_STUDENT_FILE

    def __init__(self, card: DatasetCard, network: FlowNet, net_cfg: FlowNetConfig, teacher,
                 starts_from_teacher: bool | None = None):
        self.card, self.network, self.net_cfg, self.teacher = card, network, net_cfg, teacher
        if starts_from_teacher is None:  # the GMM solver student is the exact teacher at step 0
            starts_from_teacher = net_cfg.base_gmm is not None
        #: a student that starts as its teacher already has the teacher's windows; what it lacks is a few-step
        #: solve, so by default it trains that solve end to end (the GMM solver student: a few numbers per step
        #: that learn how the steps' errors cancel; window by window they make the composed solve worse). On
        #: the digits testbed this beat window training at 2 and 4 steps (docs/benchmarks.md). A fitted or
        #: scratch start first has to learn the teacher's field: windows.
        self.default_objective = "unrolled" if starts_from_teacher else "windows"
        self._shadow: FlowNet | None = None  # the EMA's network, made by ema_tensors()
        self.real_sampler = None
        # perflow: noised real samples, drawn from the exact mixture (GMM) or the real images (digits testbed)
        if isinstance(teacher, GMMTeacher) or callable(getattr(teacher, "sample", None)):
            def real_sampler(n, g, cls, _t=teacher):
                return _t.sample(n, g, cls)

            self.real_sampler = real_sampler

    @classmethod
    def build(cls, card: DatasetCard, cfg, *, device, main_process_first=None, progress: bool = False) -> FlowNetStudent:
        teacher = teacher_from_card(card, cfg.storage_options, root=cfg.data, allow=cfg.allow_teacher_locations)
        net_cfg = student_net_config(card, cfg.student_arch, cfg.student_width, cfg.student_depth)
        with (main_process_first or contextlib.nullcontext)():  # rank 0 fits (and caches) the GMM teacher's net first
            network = init_flow_net_student(card, net_cfg, cfg.init, teacher, cfg.teacher_fit_steps, seed=cfg.seed,
                                            progress=progress)
        return cls(card, network, network.cfg, teacher, starts_from_teacher=cfg.init == "teacher")

    # -- conditions --------------------------------------------------------------------------------
    def _cond(self, class_B, guidance_B) -> Condition:
        return (class_B if self.net_cfg.num_classes else None,
                guidance_B.float() if self.net_cfg.guidance_cond else None)

    def corpus_condition(self, batch) -> Condition:
        return self._cond(batch["class_id"], batch["guidance"])

    def online_condition(self, online) -> Condition:
        return self._cond(online.class_B, online.guidance_B)

    def discriminator_condition(self, cond: Condition) -> Condition:
        return (cond[0],)

    def sampler(self, autocast=None, device=None) -> Sampler:
        net = self._shadow if self._shadow is not None else self.network
        use_cls, use_guid = bool(self.net_cfg.num_classes), self.net_cfg.guidance_cond

        @torch.no_grad()
        def fn(x, sigma, cls=None, guid=None):
            return net(x, sigma, cls if use_cls else None, guid if use_guid else None)

        return fn

    @contextlib.contextmanager
    def ema_sampler(self, ema=None, autocast=None, device=None):
        yield self.sampler()  # the shadow network's parameters *are* the EMA tensors

    def build_discriminator(self, cfg) -> torch.nn.Module:
        return TrajectoryDiscriminator(self.net_cfg, cfg.disc_blocks).load_backbone(self.network)

    # -- weights -----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(tensors)

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        self._shadow = copy.deepcopy(self.network).requires_grad_(False)
        return self._shadow.state_dict()

    def net_config(self) -> dict[str, Any]:
        return self.network.cfg.to_dict()

    def export(self, weights: dict[str, torch.Tensor], folder: str, run: dict[str, Any]) -> list[str]:
        net = copy.deepcopy(self.network)
        net.load_state_dict(weights)
        save_flow_net(net, os.path.join(folder, FLOWNET_STUDENT_FILE), extra=flownet_student_metadata(self.card, run))
        return [FLOWNET_STUDENT_FILE]
