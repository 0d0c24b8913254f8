"""Acceptance: on latent10, a 4-step student trained for a few CPU minutes beats the teacher's own
4-step sampling in coupling error and sliced Wasserstein distance (exact GMM ground truth)."""

from __future__ import annotations

import json

import pytest
from fixtures import make_gmm_corpus as make_corpus

pytestmark = pytest.mark.slow


def test_four_step_student_beats_four_step_teacher_on_latent10(tmp_path):
    from evaluation.gmm import evaluate_gmm
    from models.flownet import FlowNet
    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    data = make_corpus(str(tmp_path / "latent10"), 16384, 1024, guidance=2.0, stages=(8, 4), num_steps=32)
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), stages=(8, 4), steps_per_stage=(600, 1400),
                      batch_size=256, cache_dir=str(tmp_path / "cache"), progress=False, checkpoint_every=10**6)
    trainer = Trainer(cfg).build()
    try:
        trainer.train()
        student = FlowNet(trainer.student.net_cfg)
        student.load_state_dict(trainer.ema.state_dict())  # the EMA weights
        report = evaluate_gmm(student, trainer.teacher, shift=1.0, guidance=2.0, steps=(1, 2, 4), num_samples=1000)
    finally:
        trainer.close()
    teacher4, student4 = report["teacher"]["4_steps"], report["student"]["4_steps"]
    print(json.dumps({"teacher_4_steps": teacher4, "teacher_32_steps": report["teacher"]["32_steps"],
                      "student": report["student"]}, indent=1))
    assert student4["coupling_error"] < teacher4["coupling_error"], (student4, teacher4)
    assert student4["swd"] < teacher4["swd"], (student4, teacher4)
    assert student4["class_accuracy"] > 0.98
