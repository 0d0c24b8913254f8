"""SD3 prompt encoding: a tiny SD3 pipeline folder built locally, its text encoders behind the teacher,
per-shard prompt caching in the generation worker, and resolution -> latent shape."""

from __future__ import annotations

import pytest
import torch
from fixtures import write_prompt_file

from models.diffusers.sd3 import DiffusersFlowTeacher
from models.registry import build_teacher

PROMPTS = ["a red cat", "a blue dog on grass", "sunset 42"]


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)


def test_encode_prompts_is_the_pipelines_encode_prompt(pipe, sd3_dir):
    teacher = build_teacher(f"diffusers:{sd3_dir}")
    assert isinstance(teacher, DiffusersFlowTeacher) and teacher.prompt_encoder is not None
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # a repeated prompt is encoded once and copied
    cond = teacher.encode_prompts(texts)
    with torch.no_grad():  # as in the pipeline's __call__ (autograd mode changes the low bits of SDPA)
        pe, npe, pp, npp = pipe.encode_prompt(texts[:2], None, None, do_classifier_free_guidance=True)
    rows = torch.tensor([0, 1, 0])
    torch.testing.assert_close(cond.prompt_embeds, pe[rows], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pp[rows], rtol=0, atol=0)
    assert cond.prompt_embeds.shape == (3, 77 + 256, 32) and not cond.has_negative
    # the null condition is the pipeline's default CFG negative (the empty prompt)
    torch.testing.assert_close(teacher.null_condition.prompt_embeds, npe[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.null_condition.pooled_prompt_embeds, npp[:1], rtol=0, atol=1e-6)
    # guidance works from prompts alone (negatives from the null condition)
    x = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    v1, v3 = teacher.velocity(x, 0.5, cond, 1.0), teacher.velocity(x, 0.5, cond, 3.0)
    assert v1.shape == x.shape and not torch.allclose(v1, v3)
    assert teacher.config()["source"]["text_encoders"] is True
    with pytest.raises(TypeError, match="list of prompt strings"):
        teacher.encode_prompts("a red cat")


def test_resolution_sets_the_latent_shape_with_clear_errors(sd3_dir):
    t = build_teacher(f"diffusers:{sd3_dir}", resolution=32)
    assert t.sample_shape == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_teacher(f"diffusers:{sd3_dir}", resolution=18)
    with pytest.raises(ValueError, match="at most 16"):
        build_teacher(f"diffusers:{sd3_dir}", resolution=128)
    with pytest.raises(ValueError, match="diffusers teachers only"):
        build_teacher("gmm:ring2d", resolution=32)


def test_worker_encodes_each_prompt_once_per_shard(sd3_dir, tmp_path):
    from pipeline.worker import GenerationWorker

    prompts = tmp_path / "p.jsonl"
    write_prompt_file(prompts, PROMPTS)
    cfg = dict(teacher=f"diffusers:{sd3_dir}", out=str(tmp_path / "c"), num_trajectories=8, shard_size=8,
               batch_size=3, num_steps=4, stages=(2,), shift=3.0, guidance=2.0, prompts=str(prompts), resolution=16)
    w = GenerationWorker(cfg, device="cpu")
    calls = []
    encode = w.teacher.encode_prompts
    w.teacher.encode_prompts = lambda texts: calls.append(list(texts)) or encode(texts)
    states, metas = w.solve_states(0)
    assert states.shape == (8, 3, 4, 8, 8)
    assert [m["prompt"] for m in metas] == [PROMPTS[i % 3] for i in range(8)]
    assert calls == [PROMPTS]  # first batch encodes the 3 prompts; later batches reuse them
    # the cached conditions give the same trajectories as encoding every batch afresh
    w2 = GenerationWorker(cfg, device="cpu")
    w2._prompt_cache = {}
    ref = []
    for start in range(0, 8, 3):
        batch = w2.plan.shard_samples(0)[start:start + 3]
        ref.append(w2.teacher.encode_prompts([s.prompt for s in batch]).prompt_embeds)
    cached = torch.cat([w._condition(w.plan.shard_samples(0)[s:s + 3]).prompt_embeds for s in range(0, 8, 3)])
    torch.testing.assert_close(cached, torch.cat(ref), rtol=0, atol=1e-6)
