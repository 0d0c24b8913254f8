"""The SD3 student: the teacher's ``SD3Transformer2DModel``, fully fine-tuned or with LoRA, and its export.

Export (``export_sd3_student``) writes a folder a stock ``StableDiffusion3Pipeline`` consumes
(``trainer.students.folder``, kind ``SD3_FOLDER``):

    student/trajflow_student.json           base pipeline path, LoRA or full, steps, shift, resolution, card
    student/scheduler/scheduler_config.json CorrectedFlowMatchEulerScheduler (models.diffusers.schedulers) on
                                            the corpus's shift
    student/pytorch_lora_weights.safetensors   (LoRA: loads with pipe.load_lora_weights(student_dir))
    student/transformer/                       (full fine-tune: SD3Transformer2DModel.from_pretrained)
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch

from models.diffusers.conditions import PromptCondition
from models.diffusers.sd3 import DiffusersFlowTeacher
from trainer.students.diffusers import DiffusersStudent, DiffusersStudentNet, student_network
from trainer.students.folder import (
    SCHEDULER_SUBFOLDER,
    SD3_FOLDER,
    FolderKind,
    base_pipeline_of,
    write_student_meta,
)
from trainer.students.sd3_discriminator import SD3TrajectoryDiscriminator

#: attention projections of SD3's joint transformer blocks that LoRA adapts (as diffusers' SD3 LoRA recipes)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3StudentNet(DiffusersStudentNet):
    """v_theta(x, sigma, prompt embeddings) of an ``SD3Transformer2DModel`` (full or LoRA)."""

    def __init__(self, transformer: torch.nn.Module, *, num_train_timesteps: int = 1000,
                 lora_rank: int | None = None, lora_alpha: float | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.num_train_timesteps = int(num_train_timesteps)
        self.transformer = self._prepare(transformer, lora_rank, lora_alpha, LORA_TARGETS, gradient_checkpointing)

    @staticmethod
    def condition_tensors(cond: PromptCondition) -> tuple[torch.Tensor, torch.Tensor]:
        return cond.prompt_embeds, cond.pooled_prompt_embeds

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor) -> torch.Tensor:
        dt = next(self.transformer.parameters()).dtype
        return self.transformer(
            hidden_states=x.to(dt), encoder_hidden_states=prompt_embeds.to(dt),
            pooled_projections=pooled_prompt_embeds.to(dt),
            timestep=sigma_B.float() * self.num_train_timesteps, return_dict=False)[0]

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The joint transformer blocks: each is one FSDP2 unit (all-gathered just before it runs)."""
        tr = self.transformer
        return [*tr.transformer_blocks, *getattr(tr, "single_transformer_blocks", [])]

    def config(self) -> dict[str, Any]:
        return {"kind": "sd3", "lora_rank": self.lora_rank, "num_train_timesteps": self.num_train_timesteps,
                "lora_targets": self.lora_targets}


def build_sd3_student(teacher: DiffusersFlowTeacher, *, lora_rank: int | None, lora_alpha: float | None,
                      gradient_checkpointing: bool, init: str, seed: int) -> SD3StudentNet:
    """The student around the teacher's transformer (``init="teacher"``), or a re-initialised copy."""
    transformer = student_network(teacher, teacher.transformer, init=init, seed=seed, what="SD3")
    return SD3StudentNet(transformer, num_train_timesteps=teacher.num_train_timesteps, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, gradient_checkpointing=gradient_checkpointing)


def export_sd3_student(student: SD3StudentNet, trainable: dict[str, torch.Tensor], card, folder: str,
                       extra: dict[str, Any]) -> list[str]:
    """Write the student folder (module docstring) into the LOCAL ``folder`` with the weights
    ``trainable`` (e.g. the EMA) swapped in; returns the written files relative to ``folder``."""
    from diffusers import StableDiffusion3Pipeline

    from models.diffusers.schedulers import CorrectedFlowMatchEulerScheduler

    base = base_pipeline_of(card)
    with student.swapped_in(trainable):
        tr = student.transformer
        if student.lora_rank:
            from peft.utils import get_peft_model_state_dict

            StableDiffusion3Pipeline.save_lora_weights(
                folder, transformer_lora_layers=get_peft_model_state_dict(tr),
                transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict())
        else:
            tr.save_pretrained(os.path.join(folder, SD3_FOLDER.subfolder))
    shift = float(card.run.get("shift", 1.0))
    sched_cfg = {}
    sched_file = os.path.join(base, "scheduler", "scheduler_config.json")  # the base pipeline's scheduler
    if os.path.isfile(sched_file):
        with open(sched_file) as f:
            sched_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    # the student was trained on the corpus's windows: few_step_sigmas(N, corpus shift), no dynamic shifting
    sched_cfg.update(shift=shift, use_dynamic_shifting=False,
                     num_train_timesteps=student.num_train_timesteps)
    for k in CorrectedFlowMatchEulerScheduler._INCOMPATIBLE:
        sched_cfg.pop(k, None)
    CorrectedFlowMatchEulerScheduler.from_config(sched_cfg).save_pretrained(os.path.join(folder, SCHEDULER_SUBFOLDER))
    return write_student_meta(folder, card, SD3_FOLDER, pipeline_class=StableDiffusion3Pipeline.__name__,
                              lora_rank=student.lora_rank, shift=shift, extra=extra)


class SD3Student(DiffusersStudent):
    """The ``Student`` of SD3-class corpora: the teacher's transformer (full or LoRA); fresh-mode OTA and
    adversarial distillation (``SD3TrajectoryDiscriminator`` on copies of the teacher's first blocks)."""

    kind: ClassVar[str] = SD3_FOLDER.kind
    teacher_kinds: ClassVar[tuple[str, ...]] = ("diffusers",)
    capabilities: ClassVar[frozenset[str]] = frozenset({"ota:fresh", "adversarial", "fsdp2"})
    folder_kind: ClassVar[FolderKind] = SD3_FOLDER
    model_classes: ClassVar[tuple[str, ...]] = (SD3_FOLDER.model_class,)

    @classmethod
    def _network(cls, teacher, **kwargs) -> SD3StudentNet:
        return build_sd3_student(teacher, **kwargs)

    @classmethod
    def _discriminator(cls, teacher, cfg) -> torch.nn.Module:
        return SD3TrajectoryDiscriminator(teacher.transformer, cfg.disc_blocks,
                                          num_train_timesteps=teacher.num_train_timesteps)

    _export = staticmethod(export_sd3_student)
