"""Adversarial distillation for SD3 students: the transformer-block discriminator
(trainer.students.sd3_discriminator; a trunk that stops before the transformer's last block computes only
the image stream, so every parameter trains, and states saved before that load) and `trajflow train
--adv-weight` on a tiny SD3 corpus (metrics, exact resume of the discriminator, the exported LoRA in a stock
pipeline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from fixtures import PROMPTS
from safetensors.torch import load_file

from flowcore.adversarial import discriminator_hinge_loss
from models.diffusers.sd3 import DiffusersFlowTeacher
from trainer.students import sd3_discriminator
from trainer.students.sd3 import build_sd3_student
from trainer.students.sd3_discriminator import SD3TrajectoryDiscriminator


def _batch(teacher, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *teacher.sample_shape, generator=g)
    cond = teacher.encode_prompts((PROMPTS * B)[:B])
    return x, torch.rand(B, generator=g), cond


def test_discriminator_shapes_and_its_blocks_are_copies(sd3_dir):
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    tr = teacher.transformer
    d = SD3TrajectoryDiscriminator(tr, num_blocks=2, num_train_timesteps=teacher.num_train_timesteps)
    k = min(2, len(tr.transformer_blocks))
    assert len(d.blocks) == k
    own = {p.data_ptr() for p in tr.parameters()}
    assert not own & {p.data_ptr() for p in d.parameters()}  # no shared parameter or storage
    x, sigma, cond = _batch(teacher, B=3)
    logit, feats = d(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds)
    p = tr.config.patch_size
    n_tok = (x.shape[-2] // p) * (x.shape[-1] // p)
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    assert logit.shape == (3,) and len(feats) == k
    assert all(f.shape == (3, n_tok, dim) for f in feats)
    # sigma and the prompt condition D
    other = d(x, sigma.flip(0) * 0.5, cond.prompt_embeds, cond.pooled_prompt_embeds)[0]
    assert not torch.allclose(logit, other)
    # training the student (LoRA or full: the teacher's own transformer) does not change D
    before = {n: t.detach().clone() for n, t in d.state_dict().items()}
    student = build_sd3_student(teacher, lora_rank=None, lora_alpha=None, gradient_checkpointing=False,
                                init="teacher", seed=0)
    with torch.no_grad():
        for q in student.parameters():
            q.add_(1.0)
    assert all(torch.equal(before[n], t) for n, t in d.state_dict().items())
    torch.testing.assert_close(d(x, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds)[0], logit, rtol=0, atol=0)
    frozen = SD3TrajectoryDiscriminator(tr, num_blocks=1, freeze_trunk=True)
    assert {n.split(".")[0] for n, q in frozen.named_parameters() if q.requires_grad} == {"head", "proj"}


TEXT_OUTPUT = ("attn.to_add_out.", "ff_context.")  # a joint block's modules that feed only its text-stream output


def _d_step(d, opt, x, sigma, pe, pooled):
    logits, _ = d(torch.cat([x, x + 0.5]), torch.cat([sigma, sigma]), pe.repeat(2, 1, 1), pooled.repeat(2, 1))
    opt.zero_grad(set_to_none=True)
    discriminator_hinge_loss(logits[:2], logits[2:]).backward()
    opt.step()


def test_a_trunk_that_stops_before_the_last_block_trains_every_parameter_and_loads_old_states(sd3_dir,
                                                                                              monkeypatch):
    """--disc-blocks 1 of the 2-block tiny SD3: the trunk's last block is not the transformer's (context_pre_only)
    last block, so its text-stream output would feed nothing (DDP: "Expected to have finished reduction")."""
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False)
    tr, cfg = teacher.transformer, teacher.transformer.config
    assert len(tr.transformer_blocks) == 2 and not tr.transformer_blocks[0].context_pre_only
    torch.manual_seed(0)
    d = SD3TrajectoryDiscriminator(tr, num_blocks=1)
    teacher_block = {f"blocks.0.{k}": v for k, v in tr.transformer_blocks[0].state_dict().items()}
    # the block's weights minus the text-stream output's modules, under the teacher's names and shapes
    assert {k: v.shape for k, v in d.state_dict().items() if k.startswith("blocks.")} == {
        k: v.shape for k, v in teacher_block.items() if not k.startswith(tuple(f"blocks.0.{m}" for m in TEXT_OUTPUT))}
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, *teacher.sample_shape, generator=g), torch.rand(2, generator=g)
    pe = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    logit, feats = d(x, sigma, pe, pooled)
    # the image stream is exactly the full block's
    h, temb = d.pos_embed(x), d.time_text_embed(sigma * d.num_train_timesteps, pooled)
    _, ref = copy.deepcopy(tr.transformer_blocks[0]).float()(hidden_states=h, encoder_hidden_states=d.context_embedder(pe),
                                                              temb=temb)
    torch.testing.assert_close(feats[0], ref, rtol=0, atol=0)
    # every trainable parameter takes part in the logit: what DDP needs, and FSDP2 for a full optimizer state
    logit.sum().backward()
    assert [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None] == []

    # a discriminator as it was before the pruning (the full copied block), trained a step on one process, saved
    monkeypatch.setattr(sd3_discriminator, "prune_text_output", lambda block: block)
    torch.manual_seed(0)
    old = SD3TrajectoryDiscriminator(tr, num_blocks=1)
    monkeypatch.undo()
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-3, betas=(0.0, 0.99))
    _d_step(old, old_opt, x, sigma, pe, pooled)
    saved, saved_opt = copy.deepcopy(old.state_dict()), copy.deepcopy(old_opt.state_dict())
    assert any(k.startswith("blocks.0.ff_context.") for k in saved)
    # ... loads into today's (the dropped modules' weights are the teacher's: they never had a gradient)
    for k, v in saved.items():
        if k.startswith(tuple(f"blocks.0.{m}" for m in TEXT_OUTPUT)):
            torch.testing.assert_close(v, teacher_block[k].float(), rtol=0, atol=0)
    torch.manual_seed(0)
    new = SD3TrajectoryDiscriminator(tr, num_blocks=1)
    new.load_state_dict(saved)
    new_opt = torch.optim.AdamW(new.parameters(), lr=1e-3, betas=(0.0, 0.99))
    new_opt.load_state_dict(new.upgrade_optimizer_state_dict(saved_opt))
    # and both train on exactly alike
    _d_step(old, old_opt, x, sigma, pe, pooled)
    _d_step(new, new_opt, x, sigma, pe, pooled)
    want = old.state_dict()
    for k, v in new.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    # an optimizer state of today's layout is left as it is; any other unknown layout is for load_state_dict to judge
    assert new.upgrade_optimizer_state_dict(new_opt.state_dict())["state"].keys() == new_opt.state_dict()["state"].keys()
    # a trunk that ends with the transformer's own last block has nothing to drop
    full = SD3TrajectoryDiscriminator(tr, num_blocks=2)
    assert {k[len("blocks."):] for k in full.state_dict() if k.startswith("blocks.")} == {
        k[len("transformer_blocks."):] for k in tr.state_dict() if k.startswith("transformer_blocks.")}


def test_discriminator_loss_decreases_on_fixed_real_and_fake(sd3_dir):
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False)
    cfg = teacher.transformer.config
    torch.manual_seed(0)
    d = SD3TrajectoryDiscriminator(teacher.transformer, num_blocks=2)
    x, sigma = torch.randn(4, *teacher.sample_shape), torch.rand(4)
    real, fake = x, x + 0.5 * torch.randn_like(x)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    pe = torch.randn(4, 7, cfg.joint_attention_dim).repeat(2, 1, 1)
    pooled = torch.randn(4, cfg.pooled_projection_dim).repeat(2, 1)
    losses = []
    for _ in range(8):
        logits, _ = d(torch.cat([real, fake]), torch.cat([sigma, sigma]), pe, pooled)
        loss = discriminator_hinge_loss(logits[:4], logits[4:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.fixture(scope="module")
def corpus(prompt_corpus):
    return prompt_corpus("sd3", stages=4, shift=3.0)  # the same corpus as the end-to-end and OTA tests


def _train(corpus, out, max_steps, *extra):
    """--prompt-cache-size 0: every step encodes its own batch's prompts, so a resumed run embeds them exactly
    as the uninterrupted one (a cached row can differ in the last bit from one encoded in another batch)."""
    from trajflow.cli import main

    return main(["train", "--data", corpus, "--out", str(out), "--stages", "4", "--lora-rank", "2",
                 "--adv-weight", "0.1", "--max-steps", str(max_steps), "--batch-size", "4", "--log-every", "1",
                 "--checkpoint-every", "2", "--num-workers", "0", "--no-progress", "--prompt-cache-size", "0", *extra])


@pytest.mark.slow
def test_sd3_adversarial_training_metrics_resume_and_export(sd3_dir, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(corpus, a, 4) == 0
    rows = [json.loads(line) for line in (a / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:  # the flow-net path's metric names
        for key in ("adv_d_loss", "adv_g_loss", "adv_fm_loss", "adv_d_real", "adv_d_fake", "reflow_loss", "loss"):
            assert torch.isfinite(torch.tensor(r[key])), (key, r)
        assert r["loss"] != r["reflow_loss"]
    # "killed" after step 2, resumed to step 4: model, EMA, discriminator and its optimizer bit-exact
    assert _train(corpus, b, 2) == 0
    assert _train(corpus, b, 4) == 0
    ca, cb = a / "checkpoints" / "step-00000004", b / "checkpoints" / "step-00000004"
    names = sorted(p.name for p in ca.glob("*.safetensors"))
    assert "extra-disc.safetensors" in names and "model.safetensors" in names
    for name in names:
        ta, tb = load_file(ca / name), load_file(cb / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=f"{name}:{k}")
    oa, ob = (torch.load(c / "extra-disc-optimizer.pt", weights_only=True) for c in (ca, cb))
    assert oa["state"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            torch.testing.assert_close(v, ob["state"][i][k], rtol=0, atol=0, msg=f"disc optimizer {i}:{k}")
    disc = load_file(ca / "extra-disc.safetensors")
    assert any(k.startswith("blocks.") for k in disc) and not any("lora" in k for k in disc)
    # the exported LoRA student loads in the stock pipeline with flowcore's scheduler and samples
    from diffusers import StableDiffusion3Pipeline

    from models.diffusers.schedulers import CorrectedFlowMatchEulerScheduler

    student = Path(a, "student")
    sched = CorrectedFlowMatchEulerScheduler.from_pretrained(student / "scheduler")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, scheduler=sched, local_files_only=True)
    pipe.load_lora_weights(str(student))
    img = pipe("a red cat", num_inference_steps=4, guidance_scale=1.0, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape[0] == 1 and bool(torch.isfinite(img).all())
