"""OTA for prompt-conditioned corpora and diffusers students: rollouts carry prompt texts, the teacher
(in-process or a Ray Serve pool replica) encodes them with its own text encoders; the trainer mixes the
online windows, with their prompts embedded, into an SD3 / UNet student's batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import PROMPTS

from flowcore.rollout import LocalRollout, teacher_rollout

STEPS, SHIFT, GUIDANCE = 4, 3.0, 2.0


@pytest.fixture(scope="module")
def sd3_corpus(prompt_corpus):
    return prompt_corpus("sd3", stages=STEPS, shift=SHIFT, guidance=GUIDANCE)  # shared with the e2e/adversarial tests


def _cfg(data, out, **kw):
    from trainer.config import TrainConfig

    base = dict(data=data, out=str(out), stages=(STEPS,), max_steps=6, batch_size=4, lora_rank=2, lr=1e-3,
                warmup_steps=1, ema_decay=0.5, progress=False, log_every=1, checkpoint_every=1000, num_workers=0,
                ota_ratio=0.5, ota_timeout=60)
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg, rollout):
    from trainer.loop import Trainer

    t = Trainer(cfg, rollout_teacher=rollout).build()
    try:
        last = t.train()
    finally:
        t.close()
    return t, last


def _corpus_teacher(corpus: str):
    """The corpus's teacher as the trainer rebuilds it (its text encoders, the corpus's resolution)."""
    from trainer.data import open_corpus
    from trainer.teacher import teacher_from_card

    return teacher_from_card(open_corpus(corpus).card)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "logs", "metrics.jsonl"))]


def test_local_rollout_with_prompt_texts_equals_solve_teacher(sd3_dir):
    from flowcore.schedules import few_step_sigmas
    from flowcore.solvers import solve_teacher
    from models.diffusers.sd3 import DiffusersFlowTeacher

    teacher = DiffusersFlowTeacher.from_pretrained(sd3_dir)
    texts = ["a red cat", "sunset 42", "a red cat"]  # a repeated prompt is encoded once
    x = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    grid = few_step_sigmas(6, SHIFT)
    ref = solve_teacher(teacher, x, grid, cond=teacher.encode_prompts(texts), guidance=GUIDANCE).states_BKX
    client = LocalRollout(teacher)
    try:
        got = client.submit(x, torch.tensor(grid).expand(3, -1), list(range(7)), list(texts), GUIDANCE).result(60)
    finally:
        client.close()
    # the texts' encoding is exact (each distinct text encoded once, rows repeated) ...
    embedded = teacher_rollout(teacher, x, torch.tensor(grid).expand(3, -1), list(range(7)),
                               cond=teacher.encode_prompts(texts), guidance=GUIDANCE)
    torch.testing.assert_close(got, embedded, rtol=0, atol=0)
    # ... and the rollout is the corpus solver's (float32 step arithmetic differs in the last bit, as for GMMs)
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-6)
    # the texts really condition the rollout, and mismatched counts are refused
    other = teacher_rollout(teacher, x, torch.tensor(grid).expand(3, -1), [6], cond=["x", "y", "z"], guidance=GUIDANCE)
    assert not torch.equal(other[:, 0], got[:, -1])
    with pytest.raises(ValueError, match="2 prompt texts"):
        teacher_rollout(teacher, x, torch.tensor(grid).expand(3, -1), [6], cond=["x", "y"], guidance=GUIDANCE)


def test_pool_replica_encodes_the_prompt_texts_of_merged_requests(sd3_corpus):
    """The Serve replica's plain class: requests carry texts; a merged solve encodes each distinct text once."""
    import numpy as np

    from pipeline.pool import PoolReplica
    from storage_schemas import DatasetCard

    card = DatasetCard.from_json(open(os.path.join(sd3_corpus, "dataset.json")).read())
    rep = PoolReplica(card.run["teacher_spec"], device="cpu", resolution=card.run["resolution"],
                      teacher_dtype=card.run["teacher_dtype"])
    assert rep.describe()["fingerprint"] == card.teacher.fingerprint  # the corpus's teacher, at its resolution
    x = torch.randn(4, *card.sample_shape, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor(card.solver.sigmas, dtype=torch.float64).expand(4, -1)
    texts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    reqs = [{"x": x[i:i + 2].numpy(), "sigmas": grid[i:i + 2].numpy(), "save": [0, grid.shape[1] - 1],
             "cond": None, "prompts": texts[i:i + 2], "guidance": np.float32(GUIDANCE), "method": "euler"}
            for i in (0, 2)]
    calls = []
    encode = rep.teacher.encode_prompts
    rep.teacher.encode_prompts = lambda t: calls.append(list(t)) or encode(t)
    out = rep.rollout_many(reqs)
    assert calls == [[PROMPTS[0], PROMPTS[2], PROMPTS[1]]]  # one encoder call for the merged batch
    ref = teacher_rollout(rep.teacher, x, grid, [0, grid.shape[1] - 1], cond=encode(texts), guidance=GUIDANCE)
    torch.testing.assert_close(torch.from_numpy(np.concatenate(out)), ref.float(), rtol=0, atol=0)


def test_load_card_prompts_checks_the_sha256(sd3_corpus, tmp_path):
    from storage_schemas import DatasetCard
    from trainer.ota import load_card_prompts

    card = DatasetCard.from_json(open(os.path.join(sd3_corpus, "dataset.json")).read())
    assert load_card_prompts(card) == PROMPTS
    card.run["prompts"] = {**card.run["prompts"], "sha256": "0" * 64}
    with pytest.raises(ValueError, match="changed since the corpus was generated"):
        load_card_prompts(card)


@pytest.mark.slow
def test_sd3_lora_student_with_ota_from_a_local_rollout(sd3_dir, sd3_corpus, tmp_path):
    client = LocalRollout(_corpus_teacher(sd3_corpus))
    try:
        t, last = _train(_cfg(sd3_corpus, tmp_path / "run"), client)
    finally:
        client.close()
    rows = _metrics(tmp_path / "run")
    assert t.step == 6 and len(rows) == 6
    assert last["ota_samples"] > 0 and last["ota_samples"] + last["ota_shortfall"] == 6 * 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(r["online_in_step"] == 2 for r in rows)


def test_diffusers_ota_refusals(sd3_corpus, tmp_path):
    from trainer.loop import Trainer

    for kw, msg in (({"ota_mode": "student"}, "--ota-mode student is not supported for diffusers students"),
                    ({"ota_ratio": 1.0}, "online rollouts only")):
        with pytest.raises(ValueError, match=msg):
            Trainer(_cfg(sd3_corpus, tmp_path / "x", **kw), rollout_teacher=object()).build()


@pytest.mark.slow
def test_cli_train_sd3_with_an_embedded_ray_serve_pool(sd3_corpus, tmp_path):
    """No --address: `trajflow train --ota-ratio 0.5` starts a Ray Serve pool for the corpus's diffusers teacher
    (its text encoders, the corpus's resolution), whose replica encodes the prompt texts of each request."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "trajflow", "train", "--data", sd3_corpus, "--out", str(out),
                        "--stages", str(STEPS), "--batch-size", "4", "--lora-rank", "2", "--max-steps", "6",
                        "--num-workers", "0", "--log-every", "1", "--ota-ratio", "0.5", "--no-progress"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "online samples" in r.stdout
    rows = _metrics(out)
    assert rows[-1]["ota_samples"] > 0 and all(torch.isfinite(torch.tensor(m["loss"])) for m in rows)
    assert (out / "student" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_sd15_unet_student_with_fresh_ota(tmp_path, prompt_corpus):
    corpus = prompt_corpus("sd15", num_trajectories=4, stages=STEPS, shift=SHIFT, guidance=GUIDANCE)
    client = LocalRollout(_corpus_teacher(corpus))
    try:
        t, last = _train(_cfg(corpus, tmp_path / "run", max_steps=4), client)
    finally:
        client.close()
    assert last["ota_samples"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in _metrics(tmp_path / "run"))
