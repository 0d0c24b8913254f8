"""`trajflow eval` for exported SD3 students: CLIP score, PickScore-style preference and FD-CLIP.

The student samples in a stock ``StableDiffusion3Pipeline`` (``trajflow.sample``) at each step count;
the teacher (the base pipeline, its own scheduler, ``--teacher-steps`` steps, the corpus's guidance)
samples the same prompts and seeds as the reference. Scores come from evaluation models the user
supplies by local path (``flowcore.image_metrics``); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _prompts(args, meta) -> list[str]:
    from pipeline.prompts import load_prompts

    url = args.prompts or ((meta.get("card") or {}).get("run", {}).get("prompts") or {}).get("url")
    if not url:
        raise ValueError("no prompts: pass --prompts FILE (.jsonl/.parquet with prompt_id, prompt)")
    pairs, _ = load_prompts(url, args.storage_options)
    return [pairs[i % len(pairs)][1] for i in range(args.num_images)]


def _images(pipe, prompts, steps, guidance, res, seed, extra) -> list:
    import torch

    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        out.append(pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res, generator=g,
                        **extra).images[0])
    return out


def sd3_report(args) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from flowcore.image_metrics import CLIPScorer, frechet_distance
    from trajflow.sample import load_student_pipeline, local_student_dir

    if not args.clip and not args.pickscore:
        raise ValueError("SD3 evaluation needs evaluation weights by local path: --clip DIR (CLIP score, FD-CLIP) "
                         "and/or --pickscore DIR (PickScore); nothing is downloaded")
    device = args.device or "cpu"
    # evaluation models first: a missing path fails before any sampling
    clip = CLIPScorer(args.clip, device, "CLIP") if args.clip else None
    pick = CLIPScorer(args.pickscore, device, "PickScore") if args.pickscore else None
    student_dir = local_student_dir(args.student, args.storage_options)
    pipe, meta = load_student_pipeline(student_dir, args.base, device)
    prompts = _prompts(args, meta)
    res = int(meta["resolution"])
    extra = {"max_sequence_length": int(meta["max_sequence_length"])} if meta.get("max_sequence_length") else {}
    guidance = meta.get("guidance_distilled")
    guidance = float(guidance) if isinstance(guidance, (int, float)) else 1.0

    def scores(images) -> dict[str, float]:
        row: dict[str, float] = {}
        if clip is not None:
            row["clip_score"] = clip.clip_score(images, prompts)
        if pick is not None:
            row["pickscore"] = pick.preference_score(images, prompts)
        return row

    # the teacher: the base pipeline's transformer (LoRA disabled, or the base weights) and its stock scheduler
    base = args.base or meta["base_pipeline"]
    teacher_sched = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    comps = dict(pipe.components, scheduler=teacher_sched)
    if meta.get("lora"):
        pipe.disable_lora()
    else:
        comps["transformer"] = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer",
                                                                     local_files_only=True).to(device)
    teacher_pipe = StableDiffusion3Pipeline(**comps)
    teacher_pipe.set_progress_bar_config(disable=True)
    teacher_imgs = _images(teacher_pipe, prompts, args.teacher_steps, guidance, res, args.seed, extra)
    if meta.get("lora"):
        pipe.enable_lora()
    ref_feats = clip.image_features(teacher_imgs) if clip is not None else None
    report: dict[str, Any] = {
        "student_url": args.student, "num_images": len(prompts), "resolution": res,
        "evaluators": {"clip": args.clip, "pickscore": args.pickscore},
        "teacher": {"steps": args.teacher_steps, "guidance": guidance, **scores(teacher_imgs)},
        "student": {},
    }
    for n in args.steps:
        imgs = _images(pipe, prompts, n, 1.0, res, args.seed, extra)
        row = scores(imgs)
        if clip is not None:
            row["fd_clip_to_teacher"] = frechet_distance(clip.image_features(imgs), ref_feats)
        report["student"][f"{n}_steps"] = row
    return report


def run_eval_sd3(args) -> int:
    from flowcore.image_metrics import MetricWeightsMissing

    try:
        report = sd3_report(args)
    except (MetricWeightsMissing, FileNotFoundError, ValueError) as e:
        print(f"trajflow eval: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'sampler':24s} {'CLIP score':>10s} {'PickScore':>10s} {'FD-CLIP':>9s}")

    def fmt(row, k, w, p):
        return f"{row[k]:{w}.{p}f}" if k in row else f"{'-':>{w}s}"

    rows = [(f"teacher {report['teacher']['steps']} steps", report["teacher"])]
    rows += [(f"student {k.replace('_', ' ')}", v) for k, v in report["student"].items()]
    for name, row in rows:
        print(f"{name:24s} {fmt(row, 'clip_score', 10, 2)} {fmt(row, 'pickscore', 10, 3)} "
              f"{fmt(row, 'fd_clip_to_teacher', 9, 4)}")
    return 0
