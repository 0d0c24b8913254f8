"""The exported student folder (``<out>/student/``): the on-storage contract between the families that write it
(``trainer.students.{flownet,sd3,unet}``) and the readers (``trajflow.sample``, ``trajflow.evaluation_sd3``,
``trajflow eval``). Stock diffusers pipelines load the diffusers folders, so the layout is fixed:

flow nets (``FlowNetStudent``)::

    student/student.safetensors                   the FlowNet's weights + config; metadata "trajflow_extra"
                                                  (``flownet_student_metadata``: card, data, steps, stages, ...)

diffusers students (``FolderKind`` per kind: SD3 ``SD3_FOLDER``, SD1.5/SD2/SDXL UNet ``UNET_FOLDER``)::

    student/trajflow_student.json                 ``STUDENT_META`` (``write_student_meta``): format, kind,
                                                  pipeline class, base pipeline, LoRA or full, shift,
                                                  resolution, the distilled guidance, the card, the run
    student/scheduler/scheduler_config.json       the kind's scheduler (``models.diffusers.schedulers``)
    student/pytorch_lora_weights.safetensors      LoRA: ``pipe.load_lora_weights(student_dir)``
    student/<subfolder>/                          full fine-tune: ``<model_class>.from_pretrained``

A folder's ``kind`` picks its ``FolderKind`` through the family registry
(``trainer.students.folder_kind_of``): each family names its folder kind (``Student.folder_kind``). Folders
written before kinds existed are SD3 folders (``DEFAULT_KIND``). Plain Python (no torch), so readers
stay light.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

#: the diffusers students' metadata file (what ``trajflow sample`` / ``eval`` need)
STUDENT_META = "trajflow_student.json"
#: the flow-net student's one file (``Student.export_entry`` of flow nets)
FLOWNET_STUDENT_FILE = "student.safetensors"
#: the scheduler's subfolder of a diffusers student folder (``<scheduler_class>.from_pretrained(dir, subfolder=)``)
SCHEDULER_SUBFOLDER = "scheduler"
#: the LoRA weights a diffusers ``save_lora_weights`` writes (its default name; ``load_lora_weights`` reads it)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: the kind of a folder whose metadata names none (SD3 students exported before kinds existed)
DEFAULT_KIND = "sd3"
#: the pipeline class of a folder whose metadata names none
DEFAULT_PIPELINE_CLASS = "StableDiffusion3Pipeline"
#: the guidance scale a diffusers student samples with: it was distilled from the teacher's guided velocity
#: (``guidance_distilled`` in the metadata), so the pipeline must not apply CFG again
STUDENT_GUIDANCE_SCALE = 1.0


@dataclass(frozen=True)
class FolderKind:
    """One kind of diffusers student folder: what its metadata says and where its parts are."""

    #: ``kind`` in the metadata (and the student's checkpoint net_config)
    kind: str
    #: ``format`` in the metadata
    format: str
    #: the subfolder of a full fine-tune's network
    subfolder: str
    #: its diffusers model class (``diffusers.<model_class>.from_pretrained(dir, subfolder=subfolder)``)
    model_class: str
    #: the scheduler class in ``models.diffusers.schedulers`` saved under ``SCHEDULER_SUBFOLDER``
    scheduler_class: str
    #: the stock pipeline classes a folder of this kind may name (``pipeline_class`` in the metadata)
    pipeline_classes: tuple[str, ...]


SD3_FOLDER = FolderKind("sd3", "trajflow-sd3-student/1", "transformer", "SD3Transformer2DModel",
                        "CorrectedFlowMatchEulerScheduler", ("StableDiffusion3Pipeline",))
UNET_FOLDER = FolderKind("unet", "trajflow-unet-student/1", "unet", "UNet2DConditionModel", "FlowUNetScheduler",
                         ("StableDiffusionPipeline", "StableDiffusionXLPipeline"))


def pipeline_class_of(meta: dict[str, Any], folder: FolderKind | None = None) -> str:
    """The stock pipeline class a folder's metadata names (``DEFAULT_PIPELINE_CLASS`` when it names none);
    ValueError for one that ``folder`` (default: any known kind) does not load."""
    name = meta.get("pipeline_class") or DEFAULT_PIPELINE_CLASS
    known = folder.pipeline_classes if folder is not None else (*SD3_FOLDER.pipeline_classes,
                                                               *UNET_FOLDER.pipeline_classes)
    if name not in known:
        raise ValueError(f"unsupported pipeline class {name!r} in {STUDENT_META}")
    return name


def read_student_meta(student_dir: str) -> dict[str, Any]:
    """The metadata of the LOCAL diffusers student folder ``student_dir``."""
    with open(os.path.join(student_dir, STUDENT_META)) as f:
        return json.load(f)


def folder_files(folder: str) -> list[str]:
    """Every file under the LOCAL ``folder``, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, files in os.walk(folder) for n in files)


def run_metadata(run: dict[str, Any]) -> dict[str, Any]:
    """What a diffusers student folder records of its training run (``Student.export``'s ``run``)."""
    return {"data": run["data"], "train_steps": run["steps"], "stages": list(run["stages"]),
            "num_inference_steps": run["stages"][-1], "alpha": run["alpha"],
            "window_points": run["window_points"], "ema": run["ema"],
            **{k: run[k] for k in ("selected", "best_step", "validation") if k in run}}


def base_pipeline_of(card) -> str:
    """The teacher's pipeline folder as the card records it (``teacher.config.source.path``; "" if none)."""
    return str((card.teacher.config.get("source") or {}).get("path", ""))


def write_student_meta(folder: str, card, folder_kind: FolderKind, *, pipeline_class: str, lora_rank: int | None,
                       shift: float, extra: dict[str, Any]) -> list[str]:
    """Write ``STUDENT_META`` (what ``trajflow sample`` / ``eval`` need: kind, pipeline class, base pipeline
    path, LoRA or full, shift, resolution, the distilled guidance, the card; then ``extra``) into the LOCAL
    ``folder``; returns every file under ``folder`` relative to it."""
    from models.diffusers.common import vae_scale_factor_of

    source = card.teacher.config.get("source") or {}
    base = base_pipeline_of(card)
    shape = list(card.sample_shape)
    try:  # an unreadable VAE config must not fail the export at the end of a run: SD's scale, 8
        vae_scale = vae_scale_factor_of(base) or 8
    except (OSError, ValueError):
        vae_scale = 8
    meta = {
        "format": folder_kind.format,
        "kind": folder_kind.kind,
        "pipeline_class": pipeline_class,
        "base_pipeline": base,
        "lora": bool(lora_rank),
        "lora_rank": lora_rank,
        "shift": float(shift),
        "sample_shape": shape,
        "resolution": int(shape[-1]) * vae_scale,
        "guidance_distilled": card.solver.guidance,
        "max_sequence_length": source.get("max_sequence_length"),
        "teacher_fingerprint": card.teacher.fingerprint,
        "card": json.loads(card.to_json()),
        **extra,
    }
    with open(os.path.join(folder, STUDENT_META), "w") as f:
        json.dump(meta, f, indent=2)
    return folder_files(folder)


def flownet_student_metadata(card, run: dict[str, Any]) -> dict[str, Any]:
    """The "trajflow_extra" metadata of ``FLOWNET_STUDENT_FILE`` (``models.flownet.save_flow_net``): the card
    and the training run (``Student.export``'s ``run``); ``trajflow eval`` reads it."""
    return {"card": json.loads(card.to_json()), "data": run["data"], "steps": run["steps"],
            "stages": list(run["stages"]), "final_stage": run["stages"][-1],
            "shift": float(card.run.get("shift", 1.0)), "alpha": run["alpha"],
            "window_points": run["window_points"], "num_inference_steps": run["stages"][-1],
            **{k: run[k] for k in ("objective", "selected", "best_step", "validation") if k in run}}
