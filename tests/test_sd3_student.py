"""SD3 students (trainer.students.diffusers) on a tiny SD3 pipeline: LoRA vs full, gradient checkpointing,
bf16 autocast, the prompt-embedding cache, checkpoint compatibility errors."""

from __future__ import annotations

import pytest
import torch

from models.diffusers.sd3 import DiffusersFlowTeacher
from trainer.students.diffusers import PromptEmbeddingCache
from trainer.students.sd3 import build_sd3_student


def _student(sd3_dir, **kw):
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    args = dict(lora_rank=None, lora_alpha=None, gradient_checkpointing=False, init="teacher", seed=0)
    args.update(kw)
    return teacher, build_sd3_student(teacher, **args)


def _inputs(teacher, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *teacher.sample_shape, generator=g)
    cond = teacher.encode_prompts(["a red cat", "two green birds"][:batch])
    return x, torch.tensor([0.9, 0.5][:batch]), cond


def test_lora_student_starts_as_the_teacher_and_trains_only_adapters(sd3_dir):
    teacher, student = _student(sd3_dir, lora_rank=4)
    ref = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False)
    x, sigma, cond = _inputs(teacher)
    trainable = student.trainable_state_dict()
    assert trainable and all("lora" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    n_all = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in trainable.values()) < n_all / 2
    with torch.no_grad():  # LoRA B starts at zero: the student is the teacher
        v = student(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds)
    torch.testing.assert_close(v, ref.velocity(x, sigma, cond, 1.0), rtol=0, atol=1e-6)
    student(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds).square().mean().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(sd3_dir):
    grads = []
    for gc in (False, True):
        teacher, student = _student(sd3_dir, gradient_checkpointing=gc)
        assert student.transformer.is_gradient_checkpointing == gc
        x, sigma, cond = _inputs(teacher)
        student(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert grads[0].numel() == sum(p.numel() for p in student.parameters())  # full fine-tune: every weight
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_float32_master_weights(sd3_dir):
    teacher, student = _student(sd3_dir, lora_rank=2)
    x, sigma, cond = _inputs(teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = student(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds)
    assert v.dtype == torch.bfloat16 and bool(torch.isfinite(v).all())
    v.float().square().mean().backward()
    grads = [p.grad for p in student.trainable_state_dict().values()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_prompt_cache_counts_and_evicts(sd3_dir):
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    cache = PromptEmbeddingCache(teacher.prompt_encoder, max_entries=2)
    a = cache(["x", "y", "x"])
    assert (cache.hits, cache.misses) == (1, 2)
    torch.testing.assert_close(a.prompt_embeds[0], a.prompt_embeds[2], rtol=0, atol=0)
    cache(["z"])  # evicts the least recently used ("y")
    cache(["x"])
    assert (cache.hits, cache.misses) == (2, 3)
    cache(["y"])
    assert cache.misses == 4


def test_checkpoint_of_another_rank_is_refused(sd3_dir):
    _, s4 = _student(sd3_dir, lora_rank=4)
    _, full = _student(sd3_dir)
    with pytest.raises(ValueError, match="another --lora-rank"):
        full.load_trainable_state_dict(s4.trainable_state_dict())
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False)
    with pytest.raises(ValueError, match="without text encoders"):
        build_sd3_student(teacher, lora_rank=4, lora_alpha=None, gradient_checkpointing=False, init="teacher", seed=0)
