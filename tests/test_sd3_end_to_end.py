"""The whole SD3 path on CPU with tiny random models built locally:

make-tiny-sd3 -> generate (prompts, Ray) -> audit (deep + replay) -> train a LoRA student -> export ->
load in a stock StableDiffusion3Pipeline with flowcore's scheduler -> 4-step sample (PNG), and a full
fine-tune student through the same export and `trajflow sample`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixtures import PROMPTS

from trajflow.cli import main

STEPS = 4
SHIFT = 3.0


@pytest.fixture(scope="module")
def corpus(prompt_corpus):
    return prompt_corpus("sd3", stages=STEPS, shift=SHIFT)  # shared with the OTA and adversarial tests


def _student_velocity_fn(sd3_dir, ema_file, lora_rank):
    """Our own student (trainer.students.diffusers) with the trained EMA weights, as v(x, sigma, cond)."""
    from safetensors.torch import load_file

    from models.diffusers.sd3 import DiffusersFlowTeacher
    from trainer.students.sd3 import build_sd3_student

    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    student = build_sd3_student(teacher, lora_rank=lora_rank, lora_alpha=None, gradient_checkpointing=False,
                                init="teacher", seed=0)
    student.load_trainable_state_dict(load_file(ema_file))
    student.eval()
    return teacher, student


@pytest.mark.slow
def test_prompts_to_lora_student_to_stock_pipeline_4_step_samples(sd3_dir, corpus, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from flowcore.schedules import few_step_sigmas
    from models.diffusers.schedulers import CorrectedFlowMatchEulerScheduler
    from storage_schemas import DatasetCard

    card = DatasetCard.from_json(open(os.path.join(corpus, "dataset.json")).read())
    assert card.conditioning.kind == "prompt" and list(card.sample_shape) == [4, 8, 8]
    assert card.teacher.config["source"]["text_encoders"] is True and card.run["resolution"] == 16

    # audit: manifest, sha256, deep decode and a replay of the teacher with its text encoders
    capsys.readouterr()
    assert main(["audit", corpus, "--deep", "--replay", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    replay = report["stats"]["replay"]
    assert report["ok"] and replay["replayed"] == 2 and replay["max_deviation"] == 0 and replay["authentic"]

    run = str(tmp_path / "run")
    rc = main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--max-steps", "8", "--batch-size",
               "4", "--lora-rank", "4", "--lr", "3e-3", "--warmup-steps", "1", "--ema-decay", "0.5", "--num-workers",
               "0", "--log-every", "1", "--checkpoint-every", "8", "--no-progress"])
    assert rc == 0
    student_dir = os.path.join(run, "student")
    files = sorted(os.listdir(student_dir))
    assert files == ["pytorch_lora_weights.safetensors", "scheduler", "trajflow_student.json"]
    meta = json.load(open(os.path.join(student_dir, "trajflow_student.json")))
    assert meta["lora"] and meta["num_inference_steps"] == STEPS and meta["resolution"] == 16
    metrics = [json.loads(line) for line in open(os.path.join(run, "logs", "metrics.jsonl"))]
    assert len(metrics) == 8 and all(m["prompt_cache_misses"] == len(PROMPTS) for m in metrics[-1:])

    # a stock pipeline: base folder + our scheduler class from the student's config + load_lora_weights
    scheduler = CorrectedFlowMatchEulerScheduler.from_pretrained(student_dir, subfolder="scheduler")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, scheduler=scheduler, local_files_only=True)
    base_out = pipe.transformer  # before the LoRA: the teacher
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(PROMPTS[0], None, None, do_classifier_free_guidance=False)
        t = torch.tensor([500.0])
        v_teacher = base_out(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=t,
                             return_dict=False)[0].clone()
    pipe.load_lora_weights(student_dir)
    pipe.set_progress_bar_config(disable=True)

    # the LoRA the pipeline loaded is the student we trained (EMA weights), not the teacher
    teacher, ours = _student_velocity_fn(sd3_dir, os.path.join(run, "checkpoints", "step-00000008", "ema.safetensors"),
                                         lora_rank=4)
    with torch.no_grad():
        v_pipe = pipe.transformer(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=t,
                                  return_dict=False)[0]
        v_ours = ours(x, torch.tensor([0.5]), pe, pp)
    torch.testing.assert_close(v_pipe, v_ours, rtol=1e-4, atol=1e-5)
    assert (v_pipe - v_teacher).abs().max() > 1e-4

    # 4-step sampling in the stock pipeline runs on the corrected grid and equals our own Euler solve
    latents = pipe(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=1.0, height=16, width=16, latents=x,
                   output_type="latent").images
    assert [round(float(s), 6) for s in pipe.scheduler.sigmas] == [round(s, 6) for s in few_step_sigmas(STEPS, SHIFT)]
    ref = x.clone()
    grid = few_step_sigmas(STEPS, SHIFT)
    with torch.no_grad():
        for s0, s1 in zip(grid[:-1], grid[1:]):
            ref = ref + (s1 - s0) * ours(ref, torch.tensor([s0]), pe, pp)
    torch.testing.assert_close(latents, ref, rtol=1e-4, atol=1e-4)

    # trajflow sample: PNGs through the same stock pipeline
    out = tmp_path / "samples"
    capsys.readouterr()
    assert main(["sample", "--student", run, "--prompt", PROMPTS[1], "--steps", str(STEPS), "--out", str(out),
                 "--num-images", "2"]) == 0
    assert "LoRA student" in capsys.readouterr().out
    from PIL import Image

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    imgs = [Image.open(p) for p in pngs]
    assert all(im.size == (16, 16) for im in imgs) and imgs[0].tobytes() != imgs[1].tobytes()


@pytest.mark.slow
def test_full_fine_tune_student_exports_a_transformer_and_samples(sd3_dir, corpus, tmp_path, capsys):
    from diffusers import SD3Transformer2DModel

    run = str(tmp_path / "full")
    assert main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--max-steps", "2",
                 "--batch-size", "4", "--ema-decay", "0", "--num-workers", "0", "--no-progress"]) == 0
    student_dir = os.path.join(run, "student")
    assert sorted(os.listdir(student_dir)) == ["scheduler", "trajflow_student.json", "transformer"]
    trained = SD3Transformer2DModel.from_pretrained(student_dir, subfolder="transformer", local_files_only=True)
    base = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer", local_files_only=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0  # every weight was trainable, and they moved
    # resuming a finished run is a no-op that re-exports the same weights
    assert main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--max-steps", "2",
                 "--batch-size", "4", "--ema-decay", "0", "--num-workers", "0", "--no-progress"]) == 0
    again = SD3Transformer2DModel.from_pretrained(student_dir, subfolder="transformer", local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), again.parameters()))
    out = tmp_path / "png"
    assert main(["sample", "--student", student_dir, "--prompt", "a red cat", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_sd3_student_errors(sd3_dir, corpus, tmp_path, capsys):
    # bad training flags fail with a message, before any step (--adv-weight: tests/test_adversarial_diffusers.py)
    capsys.readouterr()
    assert main(["train", "--data", corpus, "--out", str(tmp_path / "b"), "--lora-rank", "0"]) == 2
    assert "lora-rank must be a positive integer" in capsys.readouterr().err
    # sampling something that is not an exported student
    assert main(["sample", "--student", str(tmp_path / "nothing"), "--prompt", "x", "--out", str(tmp_path)]) == 1
    assert "no exported diffusers (SD3 or UNet) student" in capsys.readouterr().err
    # make-tiny-sd3 refuses to write into a non-empty folder
    assert main(["make-tiny-sd3", sd3_dir]) == 2


@pytest.mark.slow
def test_eval_sd3_student_with_stand_in_evaluators(sd3_dir, corpus, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from evaluation.fid_inception import save_random_fid_inception
    from models.tiny import make_tiny_clip

    run = str(tmp_path / "run")
    # no --batch-size / --mixed-precision: the memory-aware defaults of a diffusers student (4; no bf16 on a CPU)
    assert main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--max-steps", "2",
                 "--lora-rank", "2", "--num-workers", "0", "--no-progress"]) == 0
    state = json.loads(next(Path(run, "checkpoints").glob("*/state.json")).read_text())
    assert state["train_config"]["batch_size"] == 4 and state["train_config"]["mixed_precision"] == "no"
    clip = make_tiny_clip(tmp_path / "clip")
    pick = make_tiny_clip(tmp_path / "pick", seed=1)
    hps = make_tiny_clip(tmp_path / "hps", seed=2)
    fid = save_random_fid_inception(tmp_path / "fid.safetensors")
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(real / f"{i}.png")
    # absent evaluation weights: a clear error before any sampling, exit 1
    capsys.readouterr()
    assert main(["eval", "--student", run, "--clip", str(tmp_path / "missing"), "--num-images", "2"]) == 1
    assert "never downloaded" in capsys.readouterr().err
    for flag in ("--hpsv2", "--fid-inception"):
        assert main(["eval", "--student", run, flag, str(tmp_path / "missing"), "--num-images", "2"]) == 1
        assert "never downloaded" in capsys.readouterr().err
    assert main(["eval", "--student", run, "--clip", clip, "--fid-reference", str(real), "--num-images", "2"]) == 1
    assert "needs --fid-inception" in capsys.readouterr().err
    assert main(["eval", "--student", run, "--num-images", "2"]) == 1
    assert "--clip DIR" in capsys.readouterr().err
    assert main(["eval", "--student", run, "--clip", clip, "--pickscore", pick, "--hpsv2", hps, "--fid-inception", fid,
                 "--fid-reference", str(real), "--steps", "1,4", "--num-images", "4", "--teacher-steps", "8",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 4 and report["teacher"]["steps"] == 8 and report["teacher"]["guidance"] == 2.0
    for key in ("1_steps", "4_steps"):
        row = report["student"][key]
        assert set(row) == {"clip_score", "pickscore", "hpsv2", "fd_clip_to_teacher", "fid_to_teacher",
                            "fid_to_reference"}
        assert 0 <= row["clip_score"] <= 100 and row["fd_clip_to_teacher"] >= 0 and -100 <= row["hpsv2"] <= 100
        assert all(np.isfinite(v) for v in row.values()) and row["fid_to_teacher"] > 0
    assert {"hpsv2", "fid_to_reference"} <= set(report["teacher"]) and "fid_to_teacher" not in report["teacher"]
    assert report["evaluators"]["num_reference_images"] == 3
    # random tiny models rank nothing; but 1 and 4 steps give different images, hence different scores
    assert report["student"]["1_steps"] != report["student"]["4_steps"]
