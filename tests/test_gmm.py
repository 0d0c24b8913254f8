import json
import math

import pytest
import torch

from flowcore.schedules import shifted_sigmas
from flowcore.solvers import seeded_noise, solve_teacher
from flowcore.teacher import Teacher
from models.gmm import GMMSpec, GMMTeacher, load_preset, ring2d_spec


def _mc_velocity(teacher, x, sigma, n=400_000, cls=None, seed=0):
    """Self-normalised importance-sampling estimate of E[eps - x0 | x_sigma = x] (prior proposal)."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = teacher.sample(n, g, None if cls is None else torch.full((n,), cls))
    x0 = x0.double().reshape(n, -1)
    xf = x.double().reshape(1, -1)
    eps = (xf - (1 - sigma) * x0) / sigma
    logw = -0.5 * (eps**2).sum(1)
    w = torch.softmax(logw, 0)
    return (w[:, None] * (eps - x0)).sum(0).reshape(x.shape)


def _small_diag_spec():
    return GMMSpec(
        sample_shape=(3,),
        means_MD=torch.tensor([[1.0, 0.0, -1.0], [-1.5, 1.0, 0.5], [0.0, -1.0, 1.0]]),
        stds_MD=torch.tensor([[0.3, 0.5, 0.4], [0.6, 0.3, 0.3], [0.4, 0.4, 0.7]]),
        weights_M=torch.tensor([0.5, 0.3, 0.2]),
        classes_M=torch.tensor([0, 1, 1]),
    )


def test_is_a_teacher():
    assert isinstance(GMMTeacher(load_preset("ring2d")), Teacher)


@pytest.mark.parametrize("sigma", [0.3, 0.6, 0.9])
def test_velocity_matches_monte_carlo(sigma):
    t = GMMTeacher(_small_diag_spec())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(1, 3, generator=g, dtype=torch.float64)
        exact = t.velocity(x, sigma)[0]
        mc = _mc_velocity(t, x[0], sigma)
        torch.testing.assert_close(exact, mc, atol=0.03, rtol=0.03)
        # class-conditional velocity against MC on that class's components only
        exact_c = t.velocity(x, sigma, torch.tensor([1]))[0]
        mc_c = _mc_velocity(t, x[0], sigma, cls=1)
        torch.testing.assert_close(exact_c, mc_c, atol=0.03, rtol=0.03)


def test_velocity_finite_at_both_ends():
    t = GMMTeacher(load_preset("latent10"))
    x = torch.randn(4, 4, 8, 8)
    for s in (0.0, 1.0):
        v = t.velocity(x, s, torch.arange(4), 4.0)
        assert torch.isfinite(v).all()
    # sigma = 1: E[eps - x0 | x = eps] = x - E[x0]
    t2 = GMMTeacher(_small_diag_spec())
    x = torch.randn(5, 3, dtype=torch.float64)
    mean = (t2.spec.weights_M[:, None] * t2.spec.means_MD).sum(0)
    torch.testing.assert_close(t2.velocity(x, 1.0), x - mean)


def test_cfg_exact():
    t = GMMTeacher(load_preset("latent10"))
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    cls = torch.tensor([0, 1, 2, 3, 4, -1])
    s = torch.full((6,), 0.7, dtype=torch.float64)
    v1 = t.velocity(x, s, cls, 1.0)
    vc = t._velocity(x.reshape(6, -1), s, cls).reshape(x.shape)
    vu = t.velocity(x, s, None)
    torch.testing.assert_close(v1[:5], vc[:5])  # w=1 is the conditional velocity
    torch.testing.assert_close(v1[5], vu[5])  # class -1 is unconditional
    torch.testing.assert_close(t.velocity(x, s, cls, 0.0), vu)
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.5, 7.0], dtype=torch.float64)
    vw = t.velocity(x, s, cls, w)
    expect = vu + w.reshape(-1, 1, 1, 1) * (vc - vu)
    torch.testing.assert_close(vw[:5], expect[:5])


@pytest.mark.parametrize("preset", ["ring2d", "latent10"])
def test_256_step_solve_lands_on_the_gmm(preset):
    t = GMMTeacher(load_preset(preset))
    n_per = 1500 if preset == "ring2d" else 600
    sig = shifted_sigmas(256, 1.0)
    for k in (0, 3, t.num_classes - 1):
        seeds = list(range(k * 10_000, k * 10_000 + n_per))
        noise = seeded_noise(seeds, t.sample_shape, torch.float64)
        out = solve_teacher(t, noise, sig, cond=torch.full((n_per,), k), capture_sigmas=[0.0]).final
        out = out.reshape(n_per, -1)
        comps = (t.spec.classes_M == k).nonzero().flatten()
        w = t.spec.weights_M[comps] / t.spec.weights_M[comps].sum()
        mu = (w[:, None] * t.spec.means_MD[comps]).sum(0)
        second = (w[:, None, None] * (torch.diag_embed(t.spec.stds_MD[comps] ** 2)
                                      + t.spec.means_MD[comps][:, :, None] * t.spec.means_MD[comps][:, None, :])).sum(0)
        cov = second - mu[:, None] * mu[None, :]
        emp_mu = out.mean(0)
        emp_cov = torch.cov(out.T)
        se = (torch.diagonal(cov) / n_per).sqrt()
        assert torch.all((emp_mu - mu).abs() < 5 * se + 0.02), f"class {k} mean off"
        if preset == "ring2d":
            torch.testing.assert_close(emp_cov, cov, atol=0.004, rtol=0.15)
        else:  # per-dimension variances, averaged (a 256x256 covariance needs far more samples)
            ratio = torch.diagonal(emp_cov) / torch.diagonal(cov)
            assert abs(float(ratio.mean()) - 1.0) < 0.06
        # the samples are classified as their class by the Bayes classifier
        acc = (t.classify(out.reshape(n_per, *t.sample_shape)) == k).float().mean()
        assert acc > 0.98


def test_log_prob_matches_torch_distributions():
    spec = _small_diag_spec()
    t = GMMTeacher(spec)
    x = torch.randn(7, 3, dtype=torch.float64)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(spec.weights_M),
        torch.distributions.Independent(torch.distributions.Normal(spec.means_MD, spec.stds_MD), 1),
    )
    torch.testing.assert_close(t.log_prob(x), mix.log_prob(x))
    # class 0 has a single component
    single = torch.distributions.Independent(torch.distributions.Normal(spec.means_MD[0], spec.stds_MD[0]), 1)
    torch.testing.assert_close(t.log_prob(x, torch.zeros(7, dtype=torch.long)), single.log_prob(x))


def test_json_spec_round_trip_and_errors(tmp_path):
    spec = ring2d_spec()
    p = tmp_path / "ring.json"
    p.write_text(json.dumps(spec.to_json_dict()))
    loaded = GMMSpec.load(p)
    assert GMMTeacher(loaded).fingerprint() == GMMTeacher(spec).fingerprint()
    # minimal spec: scalar stds per component, no classes -> unconditional
    p2 = tmp_path / "mini.json"
    p2.write_text(json.dumps({"sample_shape": [2], "means": [[0, 0], [3, 3]], "stds": [0.5, 0.2]}))
    t = GMMTeacher(GMMSpec.load(p2))
    assert t.num_classes is None and t.spec.name == "mini"
    with pytest.raises(ValueError, match="unconditional"):
        t.velocity(torch.zeros(1, 2), 0.5, torch.tensor([0]))
    bad = [
        ({"sample_shape": [2], "means": [[0, 0]]}, "stds"),
        ({"sample_shape": [2], "means": [[0, 0]], "stds": [0.0]}, "> 0"),
        ({"sample_shape": [2], "means": [[0, 0]], "stds": [1.0], "weights": [-1]}, "weights"),
        ({"sample_shape": [2], "means": [[0, 0]], "stds": [1.0], "colour": 1}, "unknown"),
        ({"sample_shape": [2], "means": [[0, 0], [1, 1]], "stds": [1.0, 1.0], "classes": [0, 2]}, "no component"),
        ({"sample_shape": [2], "means": [[math.nan, 0]], "stds": [1.0]}, "finite"),
    ]
    for d, msg in bad:
        p3 = tmp_path / "bad.json"
        p3.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=msg):
            GMMSpec.load(p3)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GMMSpec.load(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError):
        GMMSpec.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown GMM preset"):
        load_preset("ring3d")


def test_isotropic_fast_path_equals_general_path():
    t_fast = GMMTeacher(load_preset("latent10"))
    t_gen = GMMTeacher(load_preset("latent10"))
    t_gen._iso_var = None  # force the [B, M, D] path
    assert t_fast._iso_var is not None
    x = torch.randn(8, 4, 8, 8, dtype=torch.float64)
    s = torch.linspace(0.0, 1.0, 8, dtype=torch.float64)
    cls = torch.tensor([0, 1, 2, -1, 4, 5, 6, 9])
    for w in (1.0, 3.0):
        torch.testing.assert_close(t_fast.velocity(x, s, cls, w), t_gen.velocity(x, s, cls, w))
