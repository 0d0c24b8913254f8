"""SDXL UNet prompt encoding: a tiny StableDiffusionXLPipeline folder built locally, its two CLIP text
encoders behind DiffusersUNetTeacher (the stock pipeline's encode_prompt + add_time_ids), the stock
pipeline's own sampling loop as the reference, and `trajflow generate --prompts` -> `trajflow audit
--deep --replay` on it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from fixtures import PROMPTS, write_prompt_file

from flowcore.solvers import solve_teacher
from models.diffusers.conditions import UNetCondition
from models.diffusers.unet import DiffusersUNetTeacher
from models.registry import build_teacher

# the stock pipeline (float32) vs trajflow's Euler in rectified-flow sigma (float32): the same
# arithmetic up to rounding, as in tests/test_diffusers_unet.py (1e-5 of the latent's magnitude)
RTOL_OF_MAX = 1e-5


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def teacher(sdxl_dir):
    return build_teacher(f"diffusers:{sdxl_dir}", resolution=16)


def stock_time_ids(pipe, size, dtype=torch.float32):
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


def test_tiny_sdxl_pipeline_has_sdxl_base_scheduler_and_zero_negatives(pipe, sdxl_dir):
    assert sorted(d for d in os.listdir(sdxl_dir) if os.path.isdir(os.path.join(sdxl_dir, d))) == [
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]
    assert pipe.config.force_zeros_for_empty_prompt is True and pipe.vae_scale_factor == 2
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.prediction_type, sc.timestep_spacing, sc.steps_offset) \
        == ("scaled_linear", 0.00085, 0.012, "epsilon", "leading", 1)
    out = pipe("a red cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3)


def test_encode_prompts_is_the_pipelines_encode_prompt(pipe, sdxl_dir, teacher):
    from models.diffusers.text_encoders import SDXLPromptEncoder

    assert isinstance(teacher.prompt_encoder, SDXLPromptEncoder) and teacher.sample_shape == (4, 8, 8)
    texts = [PROMPTS[0], "", PROMPTS[1], PROMPTS[0]]  # incl. the empty prompt; a repeat is encoded once
    cond = teacher.encode_prompts(texts)
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(texts[:3], device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True)
    rows = torch.tensor([0, 1, 2, 0])
    assert isinstance(cond, UNetCondition) and not cond.has_negative
    assert cond.prompt_embeds.shape == (4, 77, 12 + 20) and cond.pooled_prompt_embeds.shape == (4, 16)
    torch.testing.assert_close(cond.prompt_embeds, pe[rows], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pp[rows], rtol=0, atol=0)
    # time ids: the stock _get_add_time_ids at the generation resolution (16 px = 8 latents x VAE scale 2)
    torch.testing.assert_close(cond.time_ids, stock_time_ids(pipe, (16, 16), pe.dtype), rtol=0, atol=0)
    # the null condition is the stock default negative: zeros (force_zeros_for_empty_prompt), not the "" encoding
    null = teacher.null_condition
    torch.testing.assert_close(null.prompt_embeds, npe[:1], rtol=0, atol=0)
    torch.testing.assert_close(null.pooled_prompt_embeds, npp[:1], rtol=0, atol=0)
    assert float(npe.abs().max()) == 0.0 and float(cond.prompt_embeds[1].abs().max()) > 0
    # another resolution: time ids follow the teacher's sample shape (32 px = 16x16 latents)
    t32 = build_teacher(f"diffusers:{sdxl_dir}", resolution=32)
    assert t32.sample_shape == (4, 16, 16)
    torch.testing.assert_close(t32.encode_prompts(["a"]).time_ids, stock_time_ids(pipe, (32, 32)), rtol=0, atol=0)
    assert t32.prompt_encoder.config()["time_ids"]["target_size"] == [32, 32]
    # without force_zeros_for_empty_prompt the negative is the empty prompt's encoding, as in the stock pipeline
    enc = SDXLPromptEncoder(pipe, image_size=(16, 16))
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        with torch.no_grad():
            _, npe2, _, npp2 = pipe.encode_prompt(["a red cat"], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True)
        nc = enc.null_condition()
        torch.testing.assert_close(nc.prompt_embeds, npe2, rtol=0, atol=0)
        torch.testing.assert_close(nc.pooled_prompt_embeds, npp2, rtol=0, atol=0)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    with pytest.raises(TypeError, match="list of prompt strings"):
        teacher.encode_prompts("a red cat")
    both = UNetCondition.cat([cond.index(0), cond.index([1, 2, 3])])  # the worker's per-shard cache
    torch.testing.assert_close(both.pooled_prompt_embeds, cond.pooled_prompt_embeds, rtol=0, atol=0)
    assert both.time_ids.shape == (4, 6)


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_guided_solve_reproduces_the_stock_sdxl_pipeline(pipe, teacher, scheduler):
    """The stock StableDiffusionXLPipeline (its own prompt encoding, zero negatives, time ids, CFG and
    scheduler loop; output_type="latent") vs trajflow's Euler solve over the same sigmas from prompts."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    steps, w, texts = 4, 5.0, PROMPTS[:2]
    if scheduler == "euler":  # the tiny pipeline's (SDXL base's) own scheduler
        sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    stock = type(pipe)(**{**pipe.components, "scheduler": sched})
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = stock(prompt=texts, num_inference_steps=steps, guidance_scale=w, latents=noise, output_type="latent",
                height=16, width=16).images
    final = getattr(sched, "final_alpha_cumprod", 1.0)  # Euler ends at sigma 0
    grid = teacher.sigmas_for_timesteps(sched.timesteps, final)
    assert len(grid) == steps + 1 and grid[0] < 1.0
    x = solve_teacher(teacher, noise * teacher.x_scale(grid[0]), grid, cond=teacher.encode_prompts(texts),
                      guidance=w).final
    ours = x / teacher.x_scale(grid[-1])
    tol = RTOL_OF_MAX * ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"{scheduler}: max|diff|={diff:.3g} max|z|={ref.abs().max().item():.3g}")
    assert diff <= tol
    # negative control: the empty-prompt encoding as negative (not the stock zeros) is far off
    cond = teacher.encode_prompts(texts)
    empty = teacher.encode_prompts([""])
    wrong = UNetCondition(cond.prompt_embeds, empty.prompt_embeds, cond.pooled_prompt_embeds,
                          empty.pooled_prompt_embeds, cond.time_ids)
    x_wrong = solve_teacher(teacher, noise * teacher.x_scale(grid[0]), grid, cond=wrong, guidance=w).final
    assert (x_wrong / teacher.x_scale(grid[-1]) - ref).abs().max().item() > 100 * tol


def test_sdxl_fingerprint_covers_resolution_and_the_null_condition_policy(sdxl_dir, teacher):
    b = build_teacher(f"diffusers:{sdxl_dir}", resolution=16)
    assert b.fingerprint() == teacher.fingerprint()
    with torch.no_grad():
        next(b.prompt_encoder.pipe.text_encoder_2.parameters()).add_(1e-3)
    assert b.fingerprint() != teacher.fingerprint()
    bare = DiffusersUNetTeacher.from_pretrained(sdxl_dir, text_encoders=False)
    assert bare.prompt_encoder is None and bare.fingerprint() != teacher.fingerprint()
    assert build_teacher(f"diffusers:{sdxl_dir}", resolution=32).fingerprint() != teacher.fingerprint()
    cfg = teacher.config()
    assert cfg["source"]["text_encoders"] is True
    assert cfg["text_encoders"]["force_zeros_for_empty_prompt"] is True
    assert cfg["text_encoders"]["vae_scale_factor"] == 2
    again = DiffusersUNetTeacher.from_config(cfg)  # the card rebuilds the same teacher, encoders included
    assert again.prompt_encoder is not None and again.fingerprint() == teacher.fingerprint()


def test_missing_text_encoder_2_is_named(sdxl_dir, tmp_path):
    from models.diffusers.text_encoders import SD15PromptEncoder
    from pipeline.worker import GenerationWorker

    partial = str(tmp_path / "no-te2")
    shutil.copytree(sdxl_dir, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    t = build_teacher(f"diffusers:{partial}")  # still loads: precomputed embeddings work
    assert t.prompt_encoder is None and t.is_sdxl
    with pytest.raises(ValueError, match=r"has no text_encoder_2/\).*SDXL pipeline folder"):
        t.encode_prompts(["a red cat"])
    with pytest.raises(FileNotFoundError, match="no text_encoder_2/"):
        DiffusersUNetTeacher.from_pretrained(partial, text_encoders=True)
    prompts = tmp_path / "p.jsonl"
    write_prompt_file(prompts)
    cfg = dict(teacher=f"diffusers:{partial}", out=str(tmp_path / "c"), num_trajectories=4, shard_size=4,
               batch_size=4, num_steps=4, stages=(2,), guidance=2.0, prompts=str(prompts), resolution=16)
    with pytest.raises(ValueError, match=r"cannot encode them: .*no text_encoder_2/"):
        GenerationWorker(cfg, device="cpu")  # refused at start-up, before any shard
    # an SD1.5 encoder on an SDXL UNet is refused up front, not at the first UNet call
    sd15_like = SD15PromptEncoder.__new__(SD15PromptEncoder)
    with pytest.raises(ValueError, match="SDXL UNet needs an SDXLPromptEncoder"):
        DiffusersUNetTeacher(t.unet, t.schedule, prompt_encoder=sd15_like)


