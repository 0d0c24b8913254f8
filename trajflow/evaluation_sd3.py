"""`trajflow eval` for exported diffusers students (SD3, SD1.5/SDXL UNet): CLIP score, PickScore, HPSv2, FD-CLIP
and Inception FID.

The student samples in its stock pipeline (``trajflow.sample``: ``StableDiffusion3Pipeline``,
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, the folder of ``trainer.students.folder``) at
each step count, with guidance scale 1 (``STUDENT_GUIDANCE_SCALE``: the teacher's guidance is distilled into it);
the teacher (the base pipeline, its own scheduler, ``--teacher-steps`` steps, the corpus's guidance)
samples the same prompts and seeds as the reference. Scores come from evaluation models the user
supplies by local path (``evaluation.image_metrics``, ``evaluation.fid_inception``); nothing is downloaded.
FID to the teacher compares each student's images with the teacher's for the same prompts and seeds
(a distillation-fidelity proxy); ``--fid-reference DIR`` adds FID to a folder of real images.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from trajflow.args import one_line


def _prompts(args, meta) -> list[str]:
    from pipeline.prompts import load_prompts

    url = args.prompts or ((meta.get("card") or {}).get("run", {}).get("prompts") or {}).get("url")
    if not url:
        raise ValueError("no prompts: pass --prompts FILE (.jsonl/.parquet with prompt_id, prompt)")
    if not args.prompts:  # named by the student file: opened only under its folder or an allowed prefix
        from trajflow.sample import student_location_policy

        policy = student_location_policy(meta["_student_dir"], getattr(args, "allow_teacher_locations", None) or ())
        policy.hint = "pass --prompts FILE if you trust it"
        policy.check(str(url), "the prompt file")
    pairs, _ = load_prompts(url, args.storage_options)
    return [pairs[i % len(pairs)][1] for i in range(args.num_images)]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _reference_files(folder) -> list[str]:
    """The image files (PNG/JPEG/WebP/BMP) of a LOCAL folder, sorted; at least 2."""
    import os

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--fid-reference {folder!r} is not a local folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(_IMAGE_SUFFIXES))
    if len(files) < 2:
        raise ValueError(f"--fid-reference {folder!r} holds {len(files)} image(s) "
                         f"({', '.join(_IMAGE_SUFFIXES)}); FID needs at least 2 (thousands to be reliable)")
    return files


def _open_images(files):
    from PIL import Image

    for f in files:
        with Image.open(f) as im:
            yield im.convert("RGB")


def _images(pipe, prompts, steps, guidance, res, seed, extra) -> list:
    import torch

    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        out.append(pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res, generator=g,
                        **extra).images[0])
    return out


def sd3_report(args) -> dict[str, Any]:
    from evaluation.fid_inception import InceptionFID
    from evaluation.image_metrics import CLIPScorer, frechet_distance
    from trainer.students.folder import STUDENT_GUIDANCE_SCALE
    from trajflow.sample import load_student_pipeline, local_student_dir, teacher_pipeline_from

    hpsv2, fid_path, fid_ref = (getattr(args, k, None) for k in ("hpsv2", "fid_inception", "fid_reference"))
    if not (args.clip or args.pickscore or hpsv2 or fid_path):
        raise ValueError("SD3 evaluation needs evaluation weights by local path: --clip DIR (CLIP score, FD-CLIP), "
                         "--pickscore DIR (PickScore), --hpsv2 DIR (HPSv2) and/or --fid-inception FILE (FID); "
                         "nothing is downloaded")
    if fid_ref and not fid_path:
        raise ValueError("--fid-reference DIR needs --fid-inception FILE (pytorch-fid's Inception weights)")
    device = args.device or "cpu"
    # evaluation models (and the real-image reference) first: a missing path fails before any sampling
    clip = CLIPScorer(args.clip, device, "CLIP") if args.clip else None
    pick = CLIPScorer(args.pickscore, device, "PickScore") if args.pickscore else None
    hps = CLIPScorer(hpsv2, device, "HPSv2") if hpsv2 else None
    inception = InceptionFID(fid_path, device) if fid_path else None
    real_feats = inception.image_features(_open_images(_reference_files(fid_ref))) if fid_ref else None
    student_dir = local_student_dir(args.student, args.storage_options)
    allow = getattr(args, "allow_teacher_locations", None) or ()
    pipe, meta = load_student_pipeline(student_dir, args.base, device, allow=allow)
    meta = {**meta, "_student_dir": student_dir}
    if not args.steps:  # default: the step count the student was distilled for
        args.steps = (int(meta.get("num_inference_steps") or 4),)
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
        if hps is not None:
            row["hpsv2"] = hps.hps_score(images, prompts)
        return row

    def distances(images, teacher_feats) -> dict[str, float]:
        row: dict[str, float] = {}
        if clip is not None and teacher_feats.get("clip") is not None:
            row["fd_clip_to_teacher"] = frechet_distance(clip.image_features(images), teacher_feats["clip"])
        if inception is not None:
            feats = inception.image_features(images)
            if teacher_feats.get("inception") is not None:
                row["fid_to_teacher"] = frechet_distance(feats, teacher_feats["inception"])
            if real_feats is not None:
                row["fid_to_reference"] = frechet_distance(feats, real_feats)
        return row

    # the teacher: the base pipeline's transformer / UNet (LoRA disabled, or the base weights), its stock scheduler
    teacher_pipe = teacher_pipeline_from(pipe, meta, args.base or meta["base_pipeline"])
    teacher_imgs = _images(teacher_pipe, prompts, args.teacher_steps, guidance, res, args.seed, extra)
    if meta.get("lora"):
        pipe.enable_lora()
    teacher_feats = {"clip": clip.image_features(teacher_imgs) if clip is not None else None,
                     "inception": inception.image_features(teacher_imgs) if inception is not None else None}
    teacher_row = scores(teacher_imgs)
    if real_feats is not None:
        teacher_row["fid_to_reference"] = frechet_distance(teacher_feats["inception"], real_feats)
    report: dict[str, Any] = {
        "student_url": args.student, "num_images": len(prompts), "resolution": res,
        "evaluators": {"clip": args.clip, "pickscore": args.pickscore, "hpsv2": hpsv2, "fid_inception": fid_path,
                       "fid_reference": fid_ref, "num_reference_images": None if real_feats is None
                       else int(real_feats.shape[0])},
        "teacher": {"steps": args.teacher_steps, "guidance": guidance, **teacher_row},
        "student": {},
    }
    report["teacher_at_student_steps"] = {}
    for n in args.steps:
        imgs = _images(pipe, prompts, n, STUDENT_GUIDANCE_SCALE, res, args.seed, extra)
        report["student"][f"{n}_steps"] = {**scores(imgs), **distances(imgs, teacher_feats)}
    if meta.get("lora"):
        pipe.disable_lora()
    for n in args.steps:  # the teacher's own few steps (its stock scheduler, CFG) at each count the student has
        imgs = _images(teacher_pipe, prompts, n, guidance, res, args.seed, extra)
        report["teacher_at_student_steps"][f"{n}_steps"] = {**scores(imgs), **distances(imgs, teacher_feats)}
    if meta.get("lora"):
        pipe.enable_lora()
    return report


def run_eval_sd3(args) -> int:
    from evaluation.image_metrics import MetricWeightsMissing

    try:
        report = sd3_report(args)
    except (MetricWeightsMissing, FileNotFoundError, ValueError) as e:
        print(f"trajflow eval: error: {one_line(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [(f"teacher {report['teacher']['steps']} steps", report["teacher"])]
    rows += [(f"student {k.replace('_', ' ')}", v) for k, v in report["student"].items()]
    # (key, header, decimals): a column is printed when some row has its metric
    cols = [(k, h, p) for k, h, p in (("clip_score", "CLIP score", 2), ("pickscore", "PickScore", 3),
                                      ("hpsv2", "HPSv2", 2), ("fd_clip_to_teacher", "FD-CLIP", 4),
                                      ("fid_to_teacher", "FID teacher", 3), ("fid_to_reference", "FID real", 3))
            if any(k in row for _, row in rows)]

    def fmt(row, k, w, p):
        return f"{row[k]:{w}.{p}f}" if k in row else f"{'-':>{w}s}"

    print(f"{'sampler':24s} " + " ".join(f"{h:>11s}" for _, h, _ in cols))
    for name, row in rows:
        print(f"{name:24s} " + " ".join(fmt(row, k, 11, p) for k, _, p in cols))
    return 0
