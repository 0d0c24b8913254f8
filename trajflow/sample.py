"""`trajflow sample`: few-step images from an exported diffusers student in a stock diffusers pipeline.

The student folder (``trainer.students.folder``: written by ``trainer.students.sd3.export_sd3_student``
and ``trainer.students.unet.export_unet_student``) names its kind, pipeline class and base
pipeline; this loads the stock pipeline (``StableDiffusion3Pipeline``, ``StableDiffusionPipeline``
or ``StableDiffusionXLPipeline``) from the base with the student's network (full fine-tune:
``transformer/`` or ``unet/``) or its LoRA (``pipe.load_lora_weights``) and the kind's scheduler
(``models.diffusers.schedulers``: ``CorrectedFlowMatchEulerScheduler`` for SD3, ``FlowUNetScheduler``
for UNets) from the student's ``scheduler/`` config, then samples with ``guidance_scale=1`` (the
student was distilled from the teacher's guided velocity). Remote student URLs are copied to a local
cache first.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from trainer.students import folder_kind_of
from trainer.students.folder import (
    SCHEDULER_SUBFOLDER,
    STUDENT_GUIDANCE_SCALE,
    STUDENT_META,
    pipeline_class_of,
    read_student_meta,
)
from trajflow.args import one_line


def local_student_dir(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local folder holding the student: ``url`` itself, or a cached copy of a remote one. ``url``
    may be a run's --out (its student/ is used) or the student folder."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(f"{path}/{STUDENT_META}") and fs.exists(f"{path}/student/{STUDENT_META}"):
        path = f"{path}/student"
    if not fs.exists(f"{path}/{STUDENT_META}"):
        raise FileNotFoundError(f"no exported diffusers (SD3 or UNet) student at {url}: {STUDENT_META} missing (train one with "
                                "`trajflow train` on a diffusers corpus; its --out has student/)")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return path
    import hashlib

    from models.cache import cache_root

    cache = os.path.join(cache_root(), "students",
                         hashlib.sha256(url.encode()).hexdigest()[:16])
    fs.get(path + "/", cache + "/", recursive=True)
    return cache


def student_location_policy(student_dir: str, allow=()):
    """What a student file may name (base pipeline, prompt file): only under its own folder or an allowed prefix."""
    from storage_schemas.locations import LocationPolicy

    return LocationPolicy(student_dir, allow, root_what="the student's folder",
                          source=f"the student file ({STUDENT_META})")


def load_student_pipeline(student_dir: str, base: str | None = None, device: str | None = None,
                          torch_dtype=None, allow=()):
    """(the stock pipeline of the student's kind with the student and flowcore's scheduler, the student's
    metadata): StableDiffusion3Pipeline (kind "sd3", also students exported before kinds existed),
    StableDiffusionPipeline or StableDiffusionXLPipeline (kind "unet", by ``pipeline_class``).

    ``base`` (the user's --base) is opened as given; the base pipeline the student file records is opened
    only under the student's folder or an ``allow`` prefix (``--allow-teacher-location``,
    ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS``), else a one-line refusal."""
    import diffusers
    import torch

    from models.diffusers import schedulers as diffusers_scheduler

    meta = read_student_meta(student_dir)
    layout = folder_kind_of(meta)
    pipeline_class = pipeline_class_of(meta, layout)
    if not base and meta.get("base_pipeline"):
        policy = student_location_policy(student_dir, allow)
        policy.hint = "pass --base /path/to/the/base/pipeline if you trust it"
        base = policy.check(str(meta["base_pipeline"]), "the base pipeline")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"the student's base pipeline {base!r} is not a local folder; pass --base "
                                "/path/to/the/teacher/pipeline (the folder the corpus was generated from)")
    kwargs: dict[str, Any] = {"scheduler": getattr(diffusers_scheduler, layout.scheduler_class).from_pretrained(
        student_dir, subfolder=SCHEDULER_SUBFOLDER)}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if not meta.get("lora"):
        kwargs[layout.subfolder] = getattr(diffusers, layout.model_class).from_pretrained(
            student_dir, subfolder=layout.subfolder, local_files_only=True, torch_dtype=torch_dtype)
    pipe = getattr(diffusers, pipeline_class).from_pretrained(base, local_files_only=True, **kwargs)
    if meta.get("lora"):
        pipe.load_lora_weights(student_dir)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, meta


def run_sample(args) -> int:
    import torch

    from trajflow.args import UsageError

    if (args.steps is not None and args.steps < 1) or args.num_images < 1:
        raise UsageError("--steps and --num-images must be >= 1")
    try:
        student = local_student_dir(args.student, args.storage_options)
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        pipe, meta = load_student_pipeline(student, args.base, args.device, dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"trajflow sample: error: {one_line(e)}", file=sys.stderr)
        return 1
    trained = meta.get("num_inference_steps")
    if args.steps is None:  # default: the step count the student was distilled for
        args.steps = int(trained or 4)
    elif trained and args.steps != trained:
        print(f"note: the student was distilled for {trained} steps; sampling with {args.steps}", file=sys.stderr)
    res = args.resolution or int(meta["resolution"])
    os.makedirs(args.out, exist_ok=True)
    device = pipe._execution_device
    written = []
    for i in range(args.num_images):
        g = torch.Generator(device="cpu").manual_seed(args.seed + i)
        kw = {}
        if meta.get("max_sequence_length"):
            kw["max_sequence_length"] = int(meta["max_sequence_length"])
        image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=STUDENT_GUIDANCE_SCALE, height=res,
                     width=res, generator=g, **kw).images[0]
        path = os.path.join(args.out, f"sample-{args.seed + i:06d}.png")
        image.save(path)
        written.append(path)
    sig = [round(float(s), 6) for s in pipe.scheduler.sigmas]
    print(f"wrote {len(written)} PNG(s) to {args.out} ({res}x{res}, {args.steps} steps on sigmas {sig}, "
          f"{'LoRA' if meta.get('lora') else 'full'} student, device {device})")
    return 0


def teacher_pipeline_from(pipe, meta: dict[str, Any], base: str):
    """The teacher's reference pipeline next to a student pipeline ``pipe`` (from
    ``load_student_pipeline``): the same class and components with the base's stock scheduler
    (``base/scheduler``) and the base network. A LoRA student's network is shared: its LoRA is
    *disabled* here (``pipe.disable_lora()``); call ``pipe.enable_lora()`` before sampling the student
    again. A full fine-tune's base network is loaded from ``base``."""
    import inspect

    import diffusers

    with open(os.path.join(base, "scheduler", "scheduler_config.json")) as f:
        sched_class = json.load(f).get("_class_name", "")
    if not isinstance(getattr(diffusers, sched_class, None), type):
        raise ValueError(f"the base pipeline's scheduler class {sched_class!r} is not a diffusers scheduler")
    comps = dict(pipe.components, scheduler=getattr(diffusers, sched_class).from_pretrained(base, subfolder="scheduler"))
    if meta.get("lora"):
        pipe.disable_lora()
    else:
        layout = folder_kind_of(meta)
        subfolder = layout.subfolder
        comps[subfolder] = getattr(diffusers, layout.model_class).from_pretrained(
            base, subfolder=subfolder, local_files_only=True, torch_dtype=comps[subfolder].dtype).to(comps[subfolder].device)
    cls = type(pipe)
    # registered settings that are constructor arguments (e.g. requires_safety_checker, force_zeros_for_empty_prompt)
    settings = {k: pipe.config[k] for k in inspect.signature(cls.__init__).parameters
                if k in pipe.config and k not in comps}
    teacher = cls(**comps, **settings)
    teacher.set_progress_bar_config(disable=True)
    return teacher
