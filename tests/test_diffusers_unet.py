"""DiffusersUNetTeacher: epsilon / v-prediction UNets as rectified-flow teachers.

The reference is diffusers' own DDIMScheduler sampling loop (eta = 0) on a tiny random
UNet2DConditionModel: trajflow's Euler solve of the converted teacher over the matching sigma grid
must land on the same latent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from flowcore.solvers import solve_teacher
from flowcore.teacher import Teacher
from flowcore.vp_flow import sigma_of_alpha_cumprod
from models.diffusers.conditions import UNetCondition
from models.diffusers.unet import SD15_SCHEDULER_CONFIG, DiffusersUNetTeacher
from models.registry import build_teacher
from models.tiny import random_unet_condition, tiny_unet

SHAPE = (4, 8, 8)
STEPS = 10
# DDIM (float32) vs Euler in sigma (float32): the same arithmetic up to rounding. Measured max abs
# differences are 2e-6..3e-5 on latents of max magnitude 4..37 (random-weight epsilon UNets give
# large x0 estimates), i.e. <= 1e-6 relative: float32 rounding (eps 6e-8) amplified by 1/sqrt(abar)
# (up to ~8 at the first step) over 10 steps. The bound below is 1e-5 relative to the latent's
# magnitude: 10x headroom, while a wrong conversion (e.g. one timestep off, see the negative
# control) is off by ~1e-1 relative.
RTOL_OF_MAX = 1e-5


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def sdxl_unet():
    return tiny_unet(seed=1, sdxl=True)


def ddim_scheduler(prediction_type: str, set_alpha_to_one: bool = True) -> DDIMScheduler:
    # SD1.5's scheduler settings (clip_sample off, leading spacing with steps_offset 1)
    sched = DDIMScheduler(**SD15_SCHEDULER_CONFIG | {"prediction_type": prediction_type}, clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(STEPS)
    return sched


def added_kwargs(cond: UNetCondition, negative_first: bool):
    if cond.pooled_prompt_embeds is None:
        return {}
    pooled = (torch.cat([cond.negative_pooled_prompt_embeds, cond.pooled_prompt_embeds]) if negative_first
              else cond.pooled_prompt_embeds)
    n = pooled.shape[0]
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": cond.time_ids.expand(n, -1)}}


@torch.no_grad()
def diffusers_ddim(unet, sched: DDIMScheduler, noise, cond: UNetCondition, w: float, timestep_offset: int = 0):
    """The StableDiffusion(XL)Pipeline denoising loop: CFG on the UNet output, negative half first."""
    z = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        if w == 1.0:
            out = unet(z, t + timestep_offset, encoder_hidden_states=cond.prompt_embeds,
                       **added_kwargs(cond, False)).sample
        else:
            out = unet(torch.cat([z, z]), t + timestep_offset,
                       encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
                       **added_kwargs(cond, True)).sample
            u, c = out.chunk(2)
            out = u + w * (c - u)
        z = sched.step(out, t, z, eta=0.0).prev_sample
    return z


def trajflow_euler(teacher: DiffusersUNetTeacher, sched: DDIMScheduler, noise, cond, w: float):
    grid = teacher.sigmas_for_timesteps(sched.timesteps, sched.final_alpha_cumprod)
    x = solve_teacher(teacher, noise * teacher.x_scale(grid[0]), grid, cond=cond, guidance=w).final
    return x / teacher.x_scale(grid[-1]), grid


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("w", [1.0, 5.0])
def test_euler_in_sigma_equals_diffusers_ddim(unet, sdxl_unet, model, prediction_type, w):
    net = unet if model == "sd15" else sdxl_unet
    sched = ddim_scheduler(prediction_type)
    teacher = DiffusersUNetTeacher(net, sched.config)
    cond = random_unet_condition(net, 2, seed=1, negative=True)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    ref = diffusers_ddim(net, sched, noise, cond, w)
    ours, grid = trajflow_euler(teacher, sched, noise, cond, w)
    assert grid[0] < 1.0 and grid[-1] == 0.0 and len(grid) == STEPS + 1
    tol = RTOL_OF_MAX * ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"{model} {prediction_type} w={w}: max|diff|={diff:.3g} max|z|={ref.abs().max().item():.3g}")
    assert diff <= tol
    # negative control: the UNet queried one timestep off is far outside that tolerance
    off = diffusers_ddim(net, sched, noise, cond, w, timestep_offset=1)
    assert (off - ref).abs().max().item() > 100 * tol


def test_ddim_without_final_alpha_one_ends_at_sigma_min(unet):
    # SD1.5 ships set_alpha_to_one=False: DDIM's last step goes to abar_0, i.e. sigma_min, not 0
    sched = ddim_scheduler("epsilon", set_alpha_to_one=False)
    teacher = DiffusersUNetTeacher(unet, sched.config)
    cond = random_unet_condition(unet, 2, seed=3, negative=True)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    ref = diffusers_ddim(unet, sched, noise, cond, 3.0)
    ours, grid = trajflow_euler(teacher, sched, noise, cond, 3.0)
    assert grid[-1] == pytest.approx(teacher.sigma_min, rel=1e-12)
    assert (ours - ref).abs().max().item() <= RTOL_OF_MAX * ref.abs().max().item()


def test_sigma_timestep_round_trips():
    teacher = DiffusersUNetTeacher(tiny_unet(seed=0), SD15_SCHEDULER_CONFIG)
    T = teacher.num_train_timesteps
    ks = np.arange(T, dtype=np.float64)
    sig = teacher.sigma_of_timestep(ks)
    # integer timesteps: sigma is the closed form of alphas_cumprod, and maps back to the same t
    np.testing.assert_allclose(sig, sigma_of_alpha_cumprod(teacher.alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(teacher.timestep_of_sigma(sig), ks, rtol=0, atol=1e-9)
    assert np.all(np.diff(sig) > 0)
    assert sig[0] == pytest.approx(teacher.sigma_min) and sig[-1] == pytest.approx(teacher.sigma_max)
    assert 0.0 < teacher.sigma_min < 0.05 and 0.9 < teacher.sigma_max < 1.0  # SD1.5: ~0.029 and ~0.936
    # fractional timesteps and sigmas inside the range round-trip both ways
    tf = np.linspace(0, T - 1, 777)
    np.testing.assert_allclose(teacher.timestep_of_sigma(teacher.sigma_of_timestep(tf)), tf, atol=1e-8)
    s = np.linspace(teacher.sigma_min, teacher.sigma_max, 501)
    np.testing.assert_allclose(teacher.sigma_of_timestep(teacher.timestep_of_sigma(s)), s, rtol=1e-12)
    # abar at fractional t is the sigmoid of the interpolated log-SNR: consistent with sigma
    np.testing.assert_allclose(sigma_of_alpha_cumprod(teacher.alpha_cumprod_of_timestep(tf)),
                               teacher.sigma_of_timestep(tf), rtol=1e-12)
    # outside the schedule the timestep clamps (sigma = 1 is pure noise, beyond abar_{T-1} > 0)
    np.testing.assert_array_equal(teacher.timestep_of_sigma([0.0, teacher.sigma_min / 2, 0.99, 1.0]),
                                  [0.0, 0.0, T - 1, T - 1])
    with pytest.raises(ValueError, match="timesteps"):
        teacher.sigma_of_timestep(T)
    # the closed form at the ends of [0, 1]
    np.testing.assert_array_equal(sigma_of_alpha_cumprod([1.0, 0.0]), [0.0, 1.0])
    assert sigma_of_alpha_cumprod(0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_velocity_is_finite_and_continuous_on_the_whole_interval(unet, prediction_type):
    teacher = DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG | {"prediction_type": prediction_type})
    cond = random_unet_condition(unet, 1, seed=5, negative=True)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(6))

    def v(s):
        return teacher.velocity(x, s, cond, 2.0)

    for s in (1.0, 0.999, 0.5, 0.01, 0.0):
        assert torch.isfinite(v(s)).all()
    # the clamped branches meet the exact one at the ends of the schedule
    for end in (teacher.sigma_max, teacher.sigma_min):
        inside, outside = v(end), v(end + (1e-6 if end == teacher.sigma_max else -1e-6))
        assert (inside - outside).abs().max() <= 1e-3 * inside.abs().max()
    # sigma = 1: x is pure noise (z = x), the UNet is asked at t = T - 1 and v = x - x0_hat: the
    # Euler step to s' lands on (1 - s') x0_hat + s' x, a DDIM step from abar = 0 reusing the noise
    T, abar = teacher.num_train_timesteps, teacher.alphas_cumprod[-1]
    with torch.no_grad():
        out = unet(x, torch.tensor([T - 1.0]), encoder_hidden_states=cond.prompt_embeds).sample
    a, b = abar**0.5, (1 - abar) ** 0.5
    x0_hat = (x - b * out) / a if prediction_type == "epsilon" else a * x - b * out
    torch.testing.assert_close(teacher.velocity(x, 1.0, cond, 1.0), x - x0_hat, rtol=1e-5, atol=1e-4)


def test_zero_terminal_snr_schedule(unet):
    # rescale_betas_zero_snr gives abar_{T-1} = 0 (sigma = 1, log-SNR -inf): stored as 2**-24 like
    # diffusers' Euler schedulers, so the table stays finite and sigma_max = 1 - 2.4e-4
    teacher = DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG | {"rescale_betas_zero_snr": True,
                                                                  "prediction_type": "v_prediction"})
    assert teacher.alphas_cumprod[-1] == 2.0**-24
    assert 1 - 3e-4 < teacher.sigma_max < 1.0
    assert teacher.timestep_of_sigma(teacher.sigma_max) == pytest.approx(999, abs=1e-9)
    x, cond = torch.randn(1, *SHAPE), random_unet_condition(unet, 1)
    assert torch.isfinite(teacher.velocity(x, torch.tensor([1.0]), cond)).all()


def test_protocol_config_fingerprint_and_pretrained_round_trip(tmp_path, unet):
    sched = ddim_scheduler("v_prediction")
    teacher = DiffusersUNetTeacher(unet, sched)
    assert isinstance(teacher, Teacher)
    assert teacher.sample_shape == SHAPE and teacher.num_classes is None
    cfg = teacher.config()
    json.dumps(cfg)
    assert cfg["kind"] == "diffusers_unet" and cfg["model_class"] == "UNet2DConditionModel"
    assert cfg["schedule"]["prediction_type"] == "v_prediction"
    assert "clip_sample" not in cfg["schedule"]  # sampler settings are not part of the ODE
    fp = teacher.fingerprint()
    # a different schedule or prediction type is a different teacher
    assert DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG).fingerprint() != fp

    pipe = tmp_path / "sd15"
    unet.save_pretrained(pipe / "unet")
    sched.save_pretrained(pipe / "scheduler")
    loaded = DiffusersUNetTeacher.from_pretrained(pipe)
    assert loaded.fingerprint() == fp and loaded.sample_shape == SHAPE
    assert loaded.config()["source"] == {"path": str(pipe), "subfolder": "unet", "torch_dtype": None}
    assert DiffusersUNetTeacher.from_config(loaded.config()).fingerprint() == fp
    x, cond = torch.randn(2, *SHAPE), random_unet_condition(unet, 2, seed=2)
    torch.testing.assert_close(loaded.velocity(x, 0.4, cond), teacher.velocity(x, 0.4, cond), rtol=1e-5, atol=1e-5)

    # teacher SPEC routing: unet/ -> this adapter; bf16 through build_teacher's dtype
    built = build_teacher(f"diffusers:{pipe}")
    assert isinstance(built, DiffusersUNetTeacher) and built.fingerprint() == fp
    assert isinstance(build_teacher(f"diffusers:{pipe}:unet"), DiffusersUNetTeacher)
    assert build_teacher(f"diffusers:{pipe}", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_spec_routes_transformer_folders_to_the_flow_adapter(tmp_path):
    from models.diffusers.sd3 import DiffusersFlowTeacher
    from models.tiny import tiny_sd3_transformer

    tiny_sd3_transformer(seed=0).save_pretrained(tmp_path / "sd3" / "transformer")
    assert isinstance(build_teacher(f"diffusers:{tmp_path / 'sd3'}"), DiffusersFlowTeacher)
    (tmp_path / "neither").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a unet/"):
        build_teacher(f"diffusers:{tmp_path / 'neither'}")


def test_clear_errors(tmp_path, unet):
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG | {"prediction_type": "sample"})
    with pytest.raises(ValueError, match="flow_prediction"):
        DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG | {"prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="scheduler config"):
        DiffusersUNetTeacher(unet, None)
    # a pipeline folder without scheduler/scheduler_config.json
    unet.save_pretrained(tmp_path / "nosched" / "unet")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DiffusersUNetTeacher.from_pretrained(tmp_path / "nosched")
    # ... and the UNet folder itself needs scheduler_config=, which then works
    with pytest.raises(FileNotFoundError, match="scheduler_config="):
        DiffusersUNetTeacher.from_pretrained(tmp_path / "nosched" / "unet", subfolder=None)
    ok = DiffusersUNetTeacher.from_pretrained(tmp_path / "nosched" / "unet", subfolder=None,
                                              scheduler_config=SD15_SCHEDULER_CONFIG)
    assert ok.prediction_type == "epsilon"
    # hub ids and URLs are not loaded (no downloads)
    for remote in ("runwayml/stable-diffusion-v1-5", "s3://bucket/sd15", str(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError, match="not a local folder"):
            DiffusersUNetTeacher.from_pretrained(remote)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        DiffusersUNetTeacher.from_pretrained(tmp_path / "empty")
    teacher = DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG)
    x = torch.randn(1, *SHAPE)
    cond = random_unet_condition(unet, 1)
    with pytest.raises(ValueError, match="unconditional"):
        teacher.velocity(x, 0.5, cond, 3.0)
    with pytest.raises(ValueError, match="sigma must lie"):
        teacher.velocity(x, 1.5, cond)
    with pytest.raises(TypeError, match="UNetCondition"):
        teacher.velocity(x, 0.5, cond.prompt_embeds)


def test_null_condition_cfg_and_per_row_guidance(unet):
    cond = random_unet_condition(unet, 2, seed=7)
    null = random_unet_condition(unet, 1, seed=8)
    teacher = DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG, null_condition=null)
    x, s = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9)), torch.tensor([0.8, 0.3])
    v_c = teacher.velocity(x, s, cond, 1.0)
    v_u = teacher.velocity(x, s, None, 1.0)
    assert (v_c - v_u).abs().max() > 1e-3  # the condition matters
    # CFG on the UNet output == CFG on the velocity (the conversion is affine in the output)
    torch.testing.assert_close(teacher.velocity(x, s, cond, 4.0), v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)
    g = teacher.velocity(x, s, cond, torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(g[0], v_c[0], rtol=1e-5, atol=1e-5)
    # a teacher with a null condition changes CFG, so it changes the fingerprint
    assert teacher.fingerprint() != DiffusersUNetTeacher(unet, SD15_SCHEDULER_CONFIG).fingerprint()


def test_sdxl_needs_pooled_embeddings_and_time_ids(sdxl_unet):
    teacher = DiffusersUNetTeacher(sdxl_unet, SD15_SCHEDULER_CONFIG)
    assert teacher.is_sdxl
    cond = random_unet_condition(sdxl_unet, 1, seed=1)
    with pytest.raises(ValueError, match="time_ids"):
        teacher.velocity(torch.randn(1, *SHAPE), 0.5, UNetCondition(cond.prompt_embeds))
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds"):
        UNetCondition(cond.prompt_embeds, cond.prompt_embeds, cond.pooled_prompt_embeds, None, cond.time_ids)
