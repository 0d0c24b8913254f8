"""evaluation.image_metrics: the Fréchet distance against closed forms, CLIP scorers from local stand-in
weights, and the error when evaluation weights are absent (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.image_metrics import CLIPScorer, MetricWeightsMissing, frechet_distance
from models.tiny import make_tiny_clip


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # shifting the mean by m adds ||m||^2 exactly (same covariance)
    m = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a + m) == pytest.approx(float(m.square().sum()), rel=1e-9)
    # scaling by s: the empirical covariances are S and s^2 S, so d = tr(S) (1 - s)^2 (+ 0 mean term)
    s = 3.0
    tr = float(torch.trace(torch.cov(a.T)))
    assert frechet_distance(a, a * s) == pytest.approx(tr * (1 - s) ** 2 + float((a.mean(0) * (1 - s)).square().sum()),
                                                       rel=1e-6)
    assert frechet_distance(a, a * s) == pytest.approx(frechet_distance(a * s, a), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(a, a[:, :2])


def test_clip_scorer_from_a_local_stand_in(tmp_path):
    folder = make_tiny_clip(tmp_path / "clip")
    scorer = CLIPScorer(folder)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")) for _ in range(3)]
    prompts = ["a red cat", "two green birds", "sunset"]
    f = scorer.image_features(imgs)
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    cos = (f * scorer.text_features(prompts)).sum(-1)
    assert scorer.clip_score(imgs, prompts) == pytest.approx(float((100 * cos.clamp_min(0)).mean()), rel=1e-5)
    scale = float(scorer.model.logit_scale.detach().exp())
    assert scorer.preference_score(imgs, prompts) == pytest.approx(float((scale * cos).mean()), rel=1e-5)
    # HPSv2: 100 * cos, not clamped (hpsv2's benchmark scale; hpsv2.score returns the bare cosine)
    assert scorer.hps_score(imgs, prompts) == pytest.approx(float((100 * cos).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.clip_score(imgs, prompts[:2])


def test_missing_evaluation_weights_fail_clearly(tmp_path):
    with pytest.raises(MetricWeightsMissing, match="never downloaded"):
        CLIPScorer(tmp_path / "no-such-clip")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(MetricWeightsMissing, match="preprocessor_config.json"):
        CLIPScorer(tmp_path / "half", what="PickScore")
