"""Diffusers students under real multi-process training (`accelerate launch`, 2 gloo processes on
CPU), and the teacher fingerprint that lets every process recognise the corpus's teacher.

The fingerprint used to hash the encoder-made null condition (the empty prompt's embeddings); its
float values depend on the machine's kernels (torchrun sets OMP_NUM_THREADS=1, a GPU differs from a
CPU), so the trainer processes refused the corpus as "not the corpus's teacher"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_prompt_file

from models.diffusers.conditions import PromptCondition
from models.diffusers.sd3 import DiffusersFlowTeacher

BIN = Path(sys.executable).parent


def test_fingerprint_ignores_kernel_noise_in_the_encoder_made_null_condition(sd3_dir):
    a = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    b = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():  # what another thread count / device does to the empty prompt's embeddings
        b.null_condition.prompt_embeds.add_(1e-7 * torch.randn_like(b.null_condition.prompt_embeds))
    assert b.fingerprint() == a.fingerprint()
    with torch.no_grad():  # the encoder's weights are still part of the identity
        next(b.prompt_encoder.encoders()["text_encoder"].parameters()).add_(1e-3)
    assert b.fingerprint() != a.fingerprint()
    # an explicitly given null condition is the caller's data: it stays in the fingerprint
    bare = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False)
    null = PromptCondition(torch.zeros(1, 8, 32), torch.zeros(1, 16))
    x = DiffusersFlowTeacher(bare.transformer, sample_shape=bare.sample_shape, null_condition=null)
    y = DiffusersFlowTeacher(bare.transformer, sample_shape=bare.sample_shape,
                             null_condition=PromptCondition(null.prompt_embeds + 1e-3, null.pooled_prompt_embeds))
    assert x.fingerprint() != y.fingerprint()


def _corpus(sd3_dir: str, out: str, prompts: Path) -> str:
    """A real prompt corpus written by the generation worker and committer, without Ray."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import build_card, finalize, prepare_corpus
    from pipeline.storage import ObjectStore
    from pipeline.worker import GenerationWorker
    from storage_schemas import ShardCommit

    cfg = GenerateConfig(teacher=f"diffusers:{sd3_dir}", out=out, num_trajectories=16, shard_size=8, batch_size=8,
                         num_steps=8, stages=(4,), guidance=2.0, prompts=str(prompts), resolution=16, progress=False)
    worker = GenerationWorker(cfg.to_dict(), device="cpu")
    card = build_card(cfg, worker.describe(), None)
    store = ObjectStore(out)
    prepare_corpus(store, card)
    commits = {}
    for k in range(cfg.num_shards):
        c = ShardCommit(**{kk: v for kk, v in worker.process_shard(k, card.fingerprint()).items()
                           if not kk.startswith("_")})
        commits[c.shard_id] = c
    finalize(store, card, commits)
    return out


@pytest.mark.slow
def test_two_process_lora_training_of_an_sd3_student(sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompt_file(prompts)
    corpus = _corpus(sd3_dir, str(tmp_path / "corpus"), prompts)
    log, run = tmp_path / "consumed", str(tmp_path / "run")
    # 2 ranks x 4 = 8 samples per step: 2 steps are one epoch of the 16 trajectories
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trajflow", "train", "--data", corpus,
           "--out", run, "--stages", "4", "--lora-rank", "2", "--max-steps", "2", "--batch-size", "4",
           "--num-workers", "0", "--no-progress", "--consumed-log", str(log)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for f in sorted(log.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]
    assert {row["rank"] for row in rows} == {0, 1}
    assert sorted(i for row in rows for i in row["indices"]) == list(range(16))  # each sample once, across ranks
    student = Path(run, "student")
    assert (student / "pytorch_lora_weights.safetensors").exists() and (student / "trajflow_student.json").exists()


@pytest.mark.slow
def test_two_process_ddp_adversarial_training_with_a_trunk_that_stops_before_the_last_block(sd3_dir, tmp_path):
    """--disc-blocks 1 of the 2-block tiny SD3 (as the default 2 of SD3-Medium's 24): the trunk's last block is not
    the transformer's context_pre_only last block. Its text-stream output used to feed nothing, and DDP stopped at
    the second step ("Expected to have finished reduction in the prior iteration")."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    write_prompt_file(prompts)
    corpus = _corpus(sd3_dir, str(tmp_path / "corpus"), prompts)
    run = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trajflow", "train", "--data", corpus,
           "--out", str(run), "--stages", "4", "--lora-rank", "2", "--max-steps", "3", "--batch-size", "4",
           "--adv-weight", "0.1", "--disc-blocks", "1", "--num-workers", "0", "--no-progress", "--log-every", "1",
           "--eval-every", "0", "--checkpoint-every", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["adv_d_loss"])) for row in rows)
    # the discriminator trained: every trunk weight moved away from the teacher block it was copied from
    disc = load_file(run / "checkpoints" / "step-00000003" / "extra-disc.safetensors")
    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir, text_encoders=False).transformer
    trunk = {k: v for k, v in teacher.named_parameters()
             if not k.startswith(("transformer_blocks.1.", "norm_out.", "proj_out."))}
    trunk = {k.replace("transformer_blocks.", "blocks.", 1): v for k, v in trunk.items()
             if not k.startswith(("transformer_blocks.0.attn.to_add_out.", "transformer_blocks.0.ff_context."))}
    assert set(trunk) <= set(disc)
    assert [k for k, v in trunk.items() if torch.equal(disc[k], v.detach().float())] == []
