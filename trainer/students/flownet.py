"""The flow-net student: its architecture from the card, initialised from the teacher's weights.

For the analytic GMM teacher, which has no weights, the "pretrained" net is a flow net fitted to
the same GMM by plain flow matching (``models.flownet.fit_flow_net``), cached on local disk by
(GMM fingerprint, architecture, fit budget) so every run and every rank reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, replace

import torch

from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher, fit_flow_net, load_flow_net, save_flow_net
from models.gmm import GMMTeacher
from storage_schemas import DatasetCard
from trainer.teacher import CACHE_ROOT


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
    key = hashlib.sha256(json.dumps({"gmm": teacher.fingerprint(), "net": asdict(base_cfg), "steps": fit_steps,
                                     "seed": seed}, sort_keys=True).encode()).hexdigest()[:20]
    path = CACHE_ROOT / "pretrained" / f"gmm-{key}.safetensors"
    if path.exists():
        net, _ = load_flow_net(path)
        return net
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".part{os.getpid()}")
    save_flow_net(net, tmp, extra={"fitted_to": teacher.fingerprint(), "steps": fit_steps})
    os.replace(tmp, path)
    return net


def build_student(card: DatasetCard, net_cfg: FlowNetConfig, init: str, teacher, fit_steps: int,
                  seed: int = 0, progress: bool = False) -> FlowNet:
    """A student FlowNet, initialised from the teacher's weights (or from scratch)."""
    torch.manual_seed(seed)
    student = FlowNet(net_cfg)
    if init == "scratch":
        return student
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
