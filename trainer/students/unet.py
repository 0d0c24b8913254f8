"""Students for UNet corpora (SD1.5 / SD2 / SDXL teachers): the teacher's UNet, full or LoRA.

A corpus generated from ``models.diffusers.unet.DiffusersUNetTeacher`` holds trajectories of the
UNet's probability-flow ODE written in trajflow's rectified-flow sigma. The student is the
teacher's own ``UNet2DConditionModel`` (no second copy), trained as every diffusers student is
(``trainer.students.diffusers.DiffusersStudentNet``: peft LoRA on the attention projections
``to_q/k/v``, ``to_out.0`` as diffusers' SD LoRA recipes, or a float32 full fine-tune), and its
forward returns the rectified-flow velocity ``v(x_sigma, sigma, cond)`` through exactly the
conversion the teacher uses (``flowcore.vp_flow.VPFlowConversion``: ``z = x / c(sigma)``, fractional
timestep ``t(sigma)``, epsilon / v output -> ``eps_hat - x0_hat`` with the range-end formulas), so
an untrained LoRA student *is* the teacher's conditional velocity.

Export (``export_unet_student``) writes a folder a stock ``StableDiffusionPipeline`` (SDXL:
``StableDiffusionXLPipeline``) consumes with ``models.diffusers.schedulers.FlowUNetScheduler``
(``trainer.students.folder``, kind ``UNET_FOLDER``):

    student/trajflow_student.json              kind "unet", pipeline class, base pipeline, LoRA or full, shift, card
    student/scheduler/scheduler_config.json    FlowUNetScheduler: the teacher's noise schedule + the corpus's shift
    student/pytorch_lora_weights.safetensors   (LoRA: pipe.load_lora_weights(student_dir))
    student/unet/                              (full fine-tune: UNet2DConditionModel.from_pretrained)
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from flowcore.vp_flow import VPFlowConversion
from models.diffusers.conditions import UNetCondition
from models.diffusers.unet import DiffusersUNetTeacher
from trainer.students.diffusers import DiffusersStudent, DiffusersStudentNet, student_network
from trainer.students.folder import SCHEDULER_SUBFOLDER, UNET_FOLDER, FolderKind, write_student_meta

#: attention projections LoRA adapts (diffusers' SD / SDXL LoRA training recipes)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class UNetStudentNet(DiffusersStudentNet):
    """v_theta(x, sigma, prompt embeddings [, pooled, time ids]) of a ``UNet2DConditionModel`` (full or
    LoRA), through the teacher's VP -> rectified-flow conversion ``conversion``."""

    def __init__(self, unet: torch.nn.Module, conversion: VPFlowConversion, *, lora_rank: int | None = None,
                 lora_alpha: float | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.conversion = conversion
        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        self.unet = self._prepare(unet, lora_rank, lora_alpha, UNET_LORA_TARGETS, gradient_checkpointing)

    @staticmethod
    def condition_tensors(cond: UNetCondition) -> tuple:
        cond = cond.expand(cond.batch_size)
        return cond.prompt_embeds, cond.pooled_prompt_embeds, cond.time_ids

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity [B, C, H, W] in float32 (the conversion runs in float32 under any autocast)."""
        dt = next(self.unet.parameters()).dtype
        z, t_B = self.conversion.model_input(x, sigma_B)
        kwargs: dict[str, Any] = {}
        if self.is_sdxl:
            if pooled_prompt_embeds is None or time_ids is None:
                raise ValueError("an SDXL UNet student needs pooled prompt embeddings and time ids")
            B = x.shape[0]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled_prompt_embeds.to(dt),
                                           "time_ids": time_ids.to(dt).expand(B, -1)}
        out = self.unet(z.to(dt), t_B, encoder_hidden_states=prompt_embeds.to(dt), return_dict=False, **kwargs)[0]
        return self.conversion.velocity(out, x, sigma_B)

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The UNet's down, mid and up blocks: each is one FSDP2 unit."""
        u = self.unet
        return [*u.down_blocks, *([u.mid_block] if u.mid_block is not None else []), *u.up_blocks]

    def config(self) -> dict[str, Any]:
        return {"kind": "unet", "lora_rank": self.lora_rank, "lora_targets": self.lora_targets,
                "sdxl": self.is_sdxl, "prediction_type": self.conversion.prediction_type}


def build_unet_student(teacher: DiffusersUNetTeacher, *, lora_rank: int | None, lora_alpha: float | None,
                       gradient_checkpointing: bool, init: str, seed: int) -> UNetStudentNet:
    """The student around the teacher's UNet (``init="teacher"``), or a re-initialised copy."""
    unet = student_network(teacher, teacher.unet, init=init, seed=seed, what="UNet")
    return UNetStudentNet(unet, teacher.conversion, lora_rank=lora_rank, lora_alpha=lora_alpha,
                       gradient_checkpointing=gradient_checkpointing)


def export_unet_student(student: UNetStudentNet, trainable: dict[str, torch.Tensor], card, folder: str,
                        extra: dict[str, Any]) -> list[str]:
    """Write the student folder (module docstring) into the LOCAL ``folder`` with the weights
    ``trainable`` (e.g. the EMA) swapped in; returns the written files relative to ``folder``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from models.diffusers.schedulers import FlowUNetScheduler

    pipeline_cls = StableDiffusionXLPipeline if student.is_sdxl else StableDiffusionPipeline
    with student.swapped_in(trainable):
        unet = student.unet
        if student.lora_rank:
            from peft.utils import get_peft_model_state_dict

            pipeline_cls.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                           unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        else:
            unet.save_pretrained(os.path.join(folder, UNET_FOLDER.subfolder))
    # the student was trained on the corpus's windows: few_step_sigmas(N, corpus shift) in the teacher's schedule
    shift = float(card.run.get("shift", 1.0))
    FlowUNetScheduler(**student.conversion.schedule, shift=shift).save_pretrained(
        os.path.join(folder, SCHEDULER_SUBFOLDER))
    return write_student_meta(folder, card, UNET_FOLDER, pipeline_class=pipeline_cls.__name__,
                              lora_rank=student.lora_rank, shift=shift, extra=extra)


class UNetStudent(DiffusersStudent):
    """The ``Student`` of SD1.5/SD2/SDXL corpora: the teacher's UNet (full or LoRA) through its VP -> flow
    conversion; fresh-mode OTA (no adversarial distillation for UNets yet)."""

    kind: ClassVar[str] = UNET_FOLDER.kind
    display_name: ClassVar[str] = "diffusers students with a UNet (SD1.5/SDXL)"
    teacher_kinds: ClassVar[tuple[str, ...]] = ("diffusers_unet",)
    capabilities: ClassVar[frozenset[str]] = frozenset({"ota:fresh", "fsdp2"})
    folder_kind: ClassVar[FolderKind] = UNET_FOLDER
    model_classes: ClassVar[tuple[str, ...]] = (UNET_FOLDER.model_class,)

    @classmethod
    def _network(cls, teacher, **kwargs) -> UNetStudentNet:
        return build_unet_student(teacher, **kwargs)

    _export = staticmethod(export_unet_student)
