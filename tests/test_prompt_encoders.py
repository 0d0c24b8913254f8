"""What every prompt-conditioned diffusers teacher kind shares (SD3 transformer, SD1.5 and SDXL UNets),
parametrised over the kind: the tiny pipeline is a stock pipeline, the text encoders' weights are part of
the teacher's fingerprint, and `trajflow generate --prompts` -> `trajflow audit --deep --replay` is clean.
Kind-specific behaviour (each pipeline's own encode_prompt, SDXL time ids, zero negatives) stays in
tests/test_sd3_prompts.py, test_sd15_prompts.py and test_sdxl_prompts.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures import TINY_KINDS

from models.diffusers.sd3 import DiffusersFlowTeacher
from models.diffusers.unet import DiffusersUNetTeacher
from models.registry import build_teacher
from trajflow.cli import main

#: kind -> (teacher class, card teacher.kind, pipeline subfolders, a text encoder to perturb, error without encoders)
KINDS = {
    "sd3": (DiffusersFlowTeacher, "diffusers",
            ["scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
             "transformer", "vae"], "text_encoder_3", "no text encoders"),
    "sd15": (DiffusersUNetTeacher, "diffusers_unet", ["scheduler", "text_encoder", "tokenizer", "unet", "vae"],
             "text_encoder", "no text encoder"),
    "sdxl": (DiffusersUNetTeacher, "diffusers_unet",
             ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"],
             "text_encoder_2", "text_encoder"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tiny_pipeline_is_a_stock_pipeline(kind, tiny_pipeline_dir, tmp_path):
    import diffusers
    from fixtures import make_tiny_pipeline
    from safetensors.torch import load_file

    folder = tiny_pipeline_dir(kind)
    assert sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) == KINDS[kind][2]
    pipe = getattr(diffusers, TINY_KINDS[kind]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3)
    # a deterministic builder: the same seed writes the same weights
    other = make_tiny_pipeline(kind, tmp_path / "again")
    enc = KINDS[kind][3]
    a, b = (load_file(f"{d}/{enc}/model.safetensors") for d in (folder, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_text_encoder_weights_are_in_the_fingerprint(kind, tiny_pipeline_dir):
    teacher_cls, _, _, encoder, no_encoder_error = KINDS[kind]
    folder = tiny_pipeline_dir(kind)
    a = build_teacher(f"diffusers:{folder}", resolution=16)
    b = build_teacher(f"diffusers:{folder}", resolution=16)
    assert isinstance(a, teacher_cls) and a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(getattr(b.prompt_encoder.pipe, encoder).parameters()).add_(1e-3)
    assert a.fingerprint() != b.fingerprint()
    bare = teacher_cls.from_pretrained(folder, text_encoders=False)
    assert bare.prompt_encoder is None and bare.fingerprint() != a.fingerprint()
    with pytest.raises(ValueError, match=no_encoder_error):
        bare.encode_prompts(["a red cat"])
    assert a.config()["source"]["text_encoders"] is True
    # rebuilt from the card's config: the same teacher, encoders included
    again = teacher_cls.from_config(a.config())
    assert again.prompt_encoder is not None and again.fingerprint() == a.fingerprint()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_from_prompts_then_audit_replay_is_clean(kind, tiny_pipeline_dir, prompt_corpus, capsys):
    from storage_schemas import DatasetCard

    out = prompt_corpus(kind, guidance=7.5, stages=4)
    card = DatasetCard.from_json(open(os.path.join(out, "dataset.json")).read())
    assert card.conditioning.kind == "prompt" and list(card.sample_shape) == [4, 8, 8]
    assert card.teacher.kind == KINDS[kind][1] and card.teacher.config["source"]["text_encoders"] is True
    teacher = build_teacher(f"diffusers:{tiny_pipeline_dir(kind)}", resolution=16)
    assert card.teacher.fingerprint == teacher.fingerprint()
    capsys.readouterr()
    assert main(["audit", out, "--deep", "--replay", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    replay = report["stats"]["replay"]
    assert report["ok"] and replay["replayed"] == 2 and replay["authentic"]
    assert replay["max_deviation"] <= replay["tolerance"]
