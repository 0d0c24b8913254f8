"""SD1.5 UNet prompt encoding: a tiny StableDiffusionPipeline folder built locally, its CLIP text
encoder behind DiffusersUNetTeacher (the stock pipeline's encode_prompt), and the whole
`trajflow generate --prompts` -> `trajflow audit --deep --replay` path on it."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixtures import PROMPTS, write_prompt_file

from models.diffusers.conditions import UNetCondition
from models.diffusers.unet import DiffusersUNetTeacher
from models.registry import build_teacher


@pytest.fixture(scope="module")
def pipe(sd15_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd15_dir, local_files_only=True)


def test_encode_prompts_is_the_pipelines_encode_prompt(pipe, sd15_dir):
    teacher = build_teacher(f"diffusers:{sd15_dir}", resolution=16)
    assert isinstance(teacher, DiffusersUNetTeacher) and teacher.prompt_encoder is not None
    assert teacher.sample_shape == (4, 8, 8)
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # a repeated prompt is encoded once and copied
    cond = teacher.encode_prompts(texts)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(texts[:2], "cpu", 1, True)
    rows = torch.tensor([0, 1, 0])
    assert isinstance(cond, UNetCondition) and cond.prompt_embeds.shape == (3, 77, 32) and not cond.has_negative
    torch.testing.assert_close(cond.prompt_embeds, pe[rows], rtol=0, atol=0)
    # the null condition is the stock pipeline's default CFG negative (the empty prompt)
    torch.testing.assert_close(teacher.null_condition.prompt_embeds, npe[:1], rtol=0, atol=1e-6)
    assert not torch.allclose(teacher.null_condition.prompt_embeds, pe[:1])
    # guidance works from prompts alone (negatives from the null condition) and equals explicit negatives
    x = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    v1, v3 = teacher.velocity(x, 0.5, cond, 1.0), teacher.velocity(x, 0.5, cond, 3.0)
    explicit = UNetCondition(cond.prompt_embeds, npe[:1].expand(3, -1, -1))
    assert v1.shape == x.shape and not torch.allclose(v1, v3)
    torch.testing.assert_close(v3, teacher.velocity(x, 0.5, explicit, 3.0), rtol=0, atol=1e-5)
    assert teacher.config()["source"]["text_encoders"] is True
    with pytest.raises(TypeError, match="list of prompt strings"):
        teacher.encode_prompts("a red cat")
    # the worker's per-shard cache concatenates cached rows
    both = UNetCondition.cat([cond.index(0), cond.index([1, 2])])
    torch.testing.assert_close(both.prompt_embeds, cond.prompt_embeds, rtol=0, atol=0)


def test_bad_inputs_give_clear_errors(sd15_dir, tmp_path):
    from pipeline.worker import GenerationWorker

    # a UNet pipeline folder without its tokenizer still loads (precomputed embeddings) ...
    notok = str(tmp_path / "no-tokenizer")
    shutil.copytree(sd15_dir, notok, ignore=shutil.ignore_patterns("tokenizer"))
    t = build_teacher(f"diffusers:{notok}")
    assert t.prompt_encoder is None
    cond = UNetCondition(torch.randn(2, 77, 32))
    assert t.velocity(torch.randn(2, 4, 8, 8), 0.5, cond).shape == (2, 4, 8, 8)
    # ... but generating from prompts with it names what is missing
    prompts = tmp_path / "p.jsonl"
    write_prompt_file(prompts)
    cfg = dict(teacher=f"diffusers:{notok}", out=str(tmp_path / "c"), num_trajectories=4, shard_size=4,
               batch_size=4, num_steps=4, stages=(2,), guidance=2.0, prompts=str(prompts), resolution=16)
    with pytest.raises(ValueError, match=r"no tokenizer/.*text_encoder/ and tokenizer/"):
        GenerationWorker(cfg, device="cpu").solve_states(0)
    with pytest.raises(FileNotFoundError, match="no tokenizer/"):
        DiffusersUNetTeacher.from_pretrained(notok, text_encoders=True)
    # an SDXL UNet built without its text encoders names the SDXL folder layout (tests/test_sdxl_prompts.py)
    from models.diffusers.unet import SD15_SCHEDULER_CONFIG
    from models.tiny import tiny_unet

    sdxl = DiffusersUNetTeacher(tiny_unet(seed=1, sdxl=True), SD15_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="SDXL pipeline folder"):
        sdxl.encode_prompts(["a red cat"])


