"""Trainer with OTA rollouts from an in-process teacher and adversarial distillation (no Ray needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flowcore.rollout import LocalRollout
from models.gmm import GMMTeacher, load_preset
from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.teacher import teacher_from_card


@pytest.fixture(scope="module")
def corpus(gmm_corpus):
    return gmm_corpus(192, 64)


@pytest.fixture(scope="module")
def teacher(corpus):
    from trainer.data import open_corpus

    return teacher_from_card(open_corpus(corpus).card)


def _cfg(data, out, **kw):
    base = dict(data=data, out=str(out), stages=(4,), max_steps=20, batch_size=32, init="scratch", student_width=64,
                student_depth=2, progress=False, log_every=5, checkpoint_every=10, num_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg, rollout=None):
    t = Trainer(cfg, rollout).build()
    try:
        last = t.train()
    finally:
        t.close()
    return t, last


def test_adversarial_training_checkpoints_and_resumes_exactly(corpus, tmp_path):
    _, last = _run(_cfg(corpus, tmp_path / "a", adv_weight=0.5, fm_weight=1.0))
    assert {"adv_d_loss", "adv_g_loss", "adv_fm_loss"} <= set(last)
    _run(_cfg(corpus, tmp_path / "b", adv_weight=0.5, fm_weight=1.0, max_steps=10))  # "killed" at step 10
    t, _ = _run(_cfg(corpus, tmp_path / "b", adv_weight=0.5, fm_weight=1.0, max_steps=20))  # resumed
    assert t.step == 20
    for name in ("model.safetensors", "ema.safetensors", "extra-disc.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000020" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000020" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")
    # a checkpoint without a discriminator cannot silently continue as an adversarial run
    _run(_cfg(corpus, tmp_path / "c", max_steps=10))
    with pytest.raises(ValueError, match="no discriminator"):
        Trainer(_cfg(corpus, tmp_path / "c", adv_weight=0.5)).build()


def test_online_only_perflow_baseline_and_ota_mixing(corpus, teacher, tmp_path):
    client = LocalRollout(teacher)
    t, last = _run(_cfg(corpus, tmp_path / "perflow", ota_ratio=1.0, ota_mode="perflow"), client)
    assert t.step == 20 and last["ota_samples"] == 20 * 32 and last["ota_shortfall"] == 0
    assert t.stream.cursor == 0  # the corpus was not read
    for mode in ("fresh", "student"):
        t, last = _run(_cfg(corpus, tmp_path / mode, ota_ratio=0.25, ota_mode=mode), client)
        assert last["ota_samples"] > 0 and last["ota_samples"] + last["ota_shortfall"] + 8 * last["ota_stale"] >= 8 * 20
    client.close()


class _NaNTeacher(GMMTeacher):
    """A real GMM teacher whose velocity turns NaN: a broken pool replica's output."""

    def velocity(self, x, sigma, cond=None, guidance=1.0):
        return super().velocity(x, sigma, cond, guidance) * float("nan")

    def fingerprint(self):  # pretends to be the corpus's teacher, as a silently broken replica would
        return self._fp

    def with_fp(self, fp):
        self._fp = fp
        return self


def test_bad_rollouts_are_counted_and_training_goes_on(corpus, teacher, tmp_path):
    broken = LocalRollout(_NaNTeacher(teacher.spec).with_fp(teacher.fingerprint()))
    with pytest.warns(UserWarning, match="NaN"):
        t, last = _run(_cfg(corpus, tmp_path / "nan", ota_ratio=0.25), broken)
    assert t.step == 20 and last["ota_samples"] == 0 and last["ota_failures"] >= 1 and last["ota_shortfall"] > 0
    assert torch.isfinite(torch.tensor(last["loss"]))
    other = LocalRollout(GMMTeacher(load_preset("ring2d")))
    with pytest.raises(ValueError, match="different teacher"):
        Trainer(_cfg(corpus, tmp_path / "other", ota_ratio=0.25), other).build()
    with pytest.raises(ValueError, match="needs a teacher pool"):
        Trainer(_cfg(corpus, tmp_path / "none", ota_ratio=0.25))
    for bad in (dict(ota_ratio=1.5), dict(ota_ratio=0.01), dict(ota_mode="x"), dict(adv_weight=-1),
                dict(adv_step_probs=(0.0, 0.0))):
        with pytest.raises(ValueError):
            _cfg(corpus, tmp_path / "bad", **bad)
    with pytest.raises(ValueError, match="adversarial"):
        Trainer(_cfg(corpus, tmp_path / "advonline", ota_ratio=1.0, adv_weight=0.1), broken).build()


def test_resuming_a_run_with_another_student_is_a_clear_error(corpus, tmp_path):
    _run(_cfg(corpus, tmp_path / "w", max_steps=10))
    with pytest.raises(ValueError, match="student_width"):
        Trainer(_cfg(corpus, tmp_path / "w", student_width=32)).build()
