"""UNet students (SD1.5; SDXL-shaped) and their export to a stock diffusers pipeline.

- FlowUNetScheduler in a stock StableDiffusionPipeline with the *teacher's* UNet equals trajflow's
  Euler solve of DiffusersUNetTeacher on few_step_sigmas(N, shift) (epsilon and v-prediction, CFG,
  grids that reach above sigma_max);
- the UNet student is the teacher's velocity through the same conversion, trains LoRA adapters only
  (or every weight), gradient checkpointing gives the same gradients;
- end to end on a tiny SD1.5 pipeline: generate (prompts) -> audit -> train --lora-rank -> export ->
  stock StableDiffusionPipeline + load_lora_weights -> 4-step PNGs via `trajflow sample`, the loaded
  student closer to the corpus's window targets than the teacher; a full fine-tune, resume, and
  clear errors for OTA / adversarial flags.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures import PROMPTS

from flowcore.schedules import few_step_sigmas
from flowcore.solvers import solve_teacher
from models.diffusers.conditions import UNetCondition
from models.diffusers.schedulers import FlowUNetScheduler
from models.diffusers.unet import DiffusersUNetTeacher
from models.tiny import random_unet_condition, tiny_unet
from trajflow.cli import main

STEPS = 4
SHIFT = 3.0
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def pipe(sd15_dir):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(sd15_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------------------------------------- the scheduler
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stock_pipeline_with_flow_unet_scheduler_is_the_teachers_euler_solve(pipe, prediction_type, tmp_path):
    schedule = {**dict(pipe.scheduler.config), "prediction_type": prediction_type}
    teacher = DiffusersUNetTeacher(pipe.unet, schedule)
    sched = FlowUNetScheduler.from_config(schedule, shift=SHIFT)
    # the config round-trips (shift included) and a stock pipeline takes the scheduler as it is
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = FlowUNetScheduler.from_pretrained(tmp_path / "scheduler")
    assert dict(loaded.config) == dict(sched.config) and loaded.config.shift == SHIFT
    pipe.scheduler = loaded
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True)
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cases = [(STEPS, SHIFT, 1.0), (8, 10.0, GUIDANCE)] if prediction_type == "epsilon" else [(STEPS, SHIFT, GUIDANCE)]
    for steps, shift, guidance in cases:
        loaded.register_to_config(shift=shift)
        latents = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=steps,
                       guidance_scale=guidance, latents=noise.clone(), output_type="latent").images
        grid = few_step_sigmas(steps, shift)
        assert loaded.init_noise_sigma == 1.0 and loaded.grid == grid
        # the UNet's timesteps are the teacher's fractional t(sigma), clamped to T - 1 above sigma_max
        torch.testing.assert_close(loaded.timesteps, torch.tensor(teacher.timestep_of_sigma(grid[:-1]),
                                                                  dtype=torch.float32), rtol=0, atol=0)
        if shift == 10.0:
            assert grid[1] > teacher.sigma_max and float(loaded.timesteps[1]) == 999.0
        ref = solve_teacher(teacher, noise, grid, cond=UNetCondition(pe, npe), guidance=guidance).final
        assert ref.abs().max() > 1.0
        torch.testing.assert_close(latents, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="eta must be 0"):
        pipe(prompt_embeds=pe, num_inference_steps=2, guidance_scale=1.0, eta=0.5, output_type="latent")
    with pytest.raises(ValueError, match="not timesteps"):
        loaded.set_timesteps(timesteps=[999, 500])


# ---------------------------------------------------------------------------------------------- the student
def _unet_student(sdxl=False, **kw):
    from models.diffusers.unet import SD15_SCHEDULER_CONFIG
    from trainer.students.unet import UNetStudentNet

    teacher = DiffusersUNetTeacher(tiny_unet(seed=3, sdxl=sdxl), SD15_SCHEDULER_CONFIG)
    student_unet = tiny_unet(seed=3, sdxl=sdxl)
    args = dict(lora_rank=None, lora_alpha=None, gradient_checkpointing=False)
    args.update(kw)
    torch.manual_seed(0)
    return teacher, UNetStudentNet(student_unet, teacher.conversion, **args)


@pytest.mark.parametrize("sdxl", [False, True])
def test_lora_unet_student_starts_as_the_teacher_and_trains_only_adapters(sdxl):
    teacher, student = _unet_student(sdxl=sdxl, lora_rank=4)
    cond = random_unet_condition(teacher.unet, 3)
    x = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0, 0.6, 0.01])  # above sigma_max, inside, below sigma_min
    assert sigma[0] > teacher.sigma_max and sigma[2] < teacher.sigma_min
    trainable = student.trainable_state_dict()
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        v = student(x, sigma, *student.condition_tensors(cond))
    torch.testing.assert_close(v, teacher.velocity(x, sigma, cond, 1.0), rtol=0, atol=1e-6)
    student(x, sigma, *student.condition_tensors(cond)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trainable)
    assert student.config()["sdxl"] == sdxl


def test_full_unet_student_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for gc in (False, True):
        teacher, student = _unet_student(gradient_checkpointing=gc)
        assert student.unet.is_gradient_checkpointing == gc
        cond = random_unet_condition(teacher.unet, 2)
        x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
        student(x, torch.tensor([0.9, 0.3]), *student.condition_tensors(cond)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert grads[0].numel() == sum(p.numel() for p in student.parameters())  # full fine-tune: every weight
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def corpus(prompt_corpus):
    return prompt_corpus("sd15", stages=STEPS, shift=SHIFT, guidance=GUIDANCE)


def _window_start_error(unet, conversion, corpus, pipe) -> float:
    """Mean squared error of the UNet's velocity (through the conversion) against the corpus's window
    targets at every window start of every trajectory (the points a 4-step sampler queries)."""
    from trainer.data import CorpusStream, StreamConfig

    stream = CorpusStream(StreamConfig(url=corpus, batch_size=8, cache_dir=os.path.join(corpus, "..", "cache")),
                          0, 1, batched=True)
    try:
        batch = next(iter(stream))
    finally:
        stream.close()
    states, sig = batch["states"].float(), batch["sigmas"][0].double()
    with torch.no_grad():
        pe, _ = pipe.encode_prompt(list(batch["prompt"]), "cpu", 1, False)
        errs = []
        for k in range(states.shape[1] - 1):
            target = (states[:, k + 1] - states[:, k]) / float(sig[k + 1] - sig[k])
            x = states[:, k]
            z, t = conversion.model_input(x, float(sig[k]))
            v = conversion.velocity(unet(z, t, encoder_hidden_states=pe, return_dict=False)[0], x, float(sig[k]))
            errs.append(float((v - target).square().mean()))
    return sum(errs) / len(errs)


def _train(corpus, run, *extra):
    return main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--batch-size", "8",
                 "--num-workers", "0", "--warmup-steps", "1", "--log-every", "1", "--no-progress", *extra])


@pytest.mark.slow
def test_prompts_to_lora_unet_student_to_stock_sd_pipeline(sd15_dir, corpus, pipe, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from storage_schemas import DatasetCard
    from trainer.students.unet import build_unet_student

    card = DatasetCard.from_json(open(os.path.join(corpus, "dataset.json")).read())
    assert card.teacher.kind == "diffusers_unet" and card.conditioning.kind == "prompt"
    assert list(card.sample_shape) == [4, 8, 8] and card.solver.guidance == GUIDANCE
    capsys.readouterr()
    assert main(["audit", corpus, "--deep", "--replay", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["replay"]["authentic"]

    run = str(tmp_path / "run")
    assert _train(corpus, run, "--max-steps", "24", "--lora-rank", "4", "--lr", "3e-2", "--ema-decay", "0.5",
                  "--checkpoint-every", "12") == 0
    student_dir = os.path.join(run, "student")
    assert sorted(os.listdir(student_dir)) == ["pytorch_lora_weights.safetensors", "scheduler",
                                               "trajflow_student.json"]
    meta = json.load(open(os.path.join(student_dir, "trajflow_student.json")))
    assert (meta["kind"], meta["pipeline_class"], meta["lora"]) == ("unet", "StableDiffusionPipeline", True)
    assert meta["resolution"] == 16 and meta["shift"] == SHIFT and meta["guidance_distilled"] == GUIDANCE

    # a stock pipeline: base folder + our scheduler class from the student's config + load_lora_weights
    sched = FlowUNetScheduler.from_pretrained(student_dir, subfolder="scheduler")
    stock = StableDiffusionPipeline.from_pretrained(sd15_dir, scheduler=sched, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    conv = sched.conversion
    err_teacher = _window_start_error(stock.unet, conv, corpus, stock)
    stock.load_lora_weights(student_dir)
    err_student = _window_start_error(stock.unet, conv, corpus, stock)
    # the teacher's conditional velocity misses the guided (w = 4) window targets; the student learned them
    # (measured: 0.61x the teacher's error after these 24 steps)
    assert err_student < 0.8 * err_teacher, (err_student, err_teacher)

    # the loaded LoRA is the trained student (EMA weights) and 4 stock steps are its Euler solve
    teacher = DiffusersUNetTeacher.from_pretrained(sd15_dir)
    ours = build_unet_student(teacher, lora_rank=4, lora_alpha=None, gradient_checkpointing=False, init="teacher",
                              seed=0)
    ours.load_trainable_state_dict(load_file(os.path.join(run, "checkpoints", "step-00000024", "ema.safetensors")))
    ours.eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pe, _ = stock.encode_prompt(PROMPTS[0], "cpu", 1, False)
        latents = stock(prompt_embeds=pe, num_inference_steps=STEPS, guidance_scale=1.0, latents=x.clone(),
                        output_type="latent").images
        ref = x.clone()
        grid = few_step_sigmas(STEPS, SHIFT)
        for s0, s1 in zip(grid[:-1], grid[1:]):
            ref = ref + (s1 - s0) * ours(ref, torch.tensor([s0]), *ours.condition_tensors(UNetCondition(pe)))
    assert sched.grid == grid
    torch.testing.assert_close(latents, ref, rtol=1e-4, atol=1e-4)

    # trajflow sample: PNGs through the same stock pipeline
    out = tmp_path / "samples"
    capsys.readouterr()
    assert main(["sample", "--student", run, "--prompt", PROMPTS[1], "--steps", str(STEPS), "--out", str(out),
                 "--num-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA student" in printed and "[1.0, 0.9, 0.75, 0.5, 0.0]" in printed
    from PIL import Image

    imgs = [Image.open(p) for p in sorted(out.glob("*.png"))]
    assert len(imgs) == 2 and all(im.size == (16, 16) for im in imgs) and imgs[0].tobytes() != imgs[1].tobytes()


@pytest.mark.slow
def test_full_fine_tune_unet_student_resumes_exports_a_unet_and_samples(sd15_dir, corpus, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    run = str(tmp_path / "full")
    assert _train(corpus, run, "--max-steps", "2", "--ema-decay", "0", "--lr", "1e-3") == 0
    # resume: the same run continued to 3 steps starts from the step-2 checkpoint
    capsys.readouterr()
    assert _train(corpus, run, "--max-steps", "3", "--ema-decay", "0", "--lr", "1e-3") == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "logs", "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    student_dir = os.path.join(run, "student")
    assert sorted(os.listdir(student_dir)) == ["scheduler", "trajflow_student.json", "unet"]
    trained = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet", local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(sd15_dir, subfolder="unet", local_files_only=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0
    out = tmp_path / "png"
    capsys.readouterr()
    assert main(["sample", "--student", student_dir, "--prompt", "a red cat", "--out", str(out)]) == 0
    assert "full student" in capsys.readouterr().out and len(list(out.glob("*.png"))) == 1


def test_unet_student_refuses_ota_and_adversarial_flags(corpus, tmp_path, capsys):
    capsys.readouterr()
    for flags in (["--adv-weight", "0.1"], ["--ota-ratio", "0.5", "--ota-mode", "student"]):
        assert _train(corpus, str(tmp_path / flags[0][2:]), "--max-steps", "1", *flags) == 1
        assert "not supported for diffusers students" in capsys.readouterr().err


@pytest.mark.slow
def test_sdxl_lora_unet_student_to_stock_sdxl_pipeline(tmp_path, sdxl_dir, prompt_corpus, capsys):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from trainer.students.unet import build_unet_student

    corpus = prompt_corpus("sdxl", num_trajectories=4, num_steps=4, stages=STEPS, shift=SHIFT, guidance=GUIDANCE)
    run = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", run, "--stages", str(STEPS), "--batch-size", "4", "--max-steps",
                 "3", "--lora-rank", "4", "--lr", "1e-2", "--ema-decay", "0", "--num-workers", "0",
                 "--no-progress"]) == 0
    student_dir = os.path.join(run, "student")
    meta = json.load(open(os.path.join(student_dir, "trajflow_student.json")))
    assert (meta["kind"], meta["pipeline_class"], meta["lora"]) == ("unet", "StableDiffusionXLPipeline", True)

    # stock SDXL pipeline + FlowUNetScheduler + load_lora_weights: 4 steps = our student's Euler solve, with the
    # pooled embeddings and time ids the trainer conditioned on
    stock = StableDiffusionXLPipeline.from_pretrained(
        sdxl_dir, scheduler=FlowUNetScheduler.from_pretrained(student_dir, subfolder="scheduler"),
        local_files_only=True)
    stock.load_lora_weights(student_dir)
    stock.set_progress_bar_config(disable=True)
    teacher = DiffusersUNetTeacher.from_pretrained(sdxl_dir)
    ours = build_unet_student(teacher, lora_rank=4, lora_alpha=None, gradient_checkpointing=False, init="teacher",
                              seed=0)
    ours.load_trainable_state_dict(load_file(os.path.join(run, "checkpoints", "step-00000003", "model.safetensors")))
    ours.eval()
    cond = teacher.encode_prompts([PROMPTS[0]])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        latents = stock(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=1.0, height=16, width=16,
                        latents=x.clone(), output_type="latent").images
        ref = x.clone()
        grid = few_step_sigmas(STEPS, SHIFT)
        for s0, s1 in zip(grid[:-1], grid[1:]):
            ref = ref + (s1 - s0) * ours(ref, torch.tensor([s0]), *ours.condition_tensors(cond))
        stock.disable_lora()
        base = stock(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=1.0, height=16, width=16,
                     latents=x.clone(), output_type="latent").images
    torch.testing.assert_close(latents, ref, rtol=1e-4, atol=1e-4)
    assert (base - latents).abs().max() > 1e-3  # the LoRA changed the sampler's output

    out = tmp_path / "png"
    capsys.readouterr()
    assert main(["sample", "--student", run, "--prompt", PROMPTS[2], "--steps", str(STEPS), "--out", str(out)]) == 0
    assert "LoRA student" in capsys.readouterr().out and len(list(out.glob("*.png"))) == 1
