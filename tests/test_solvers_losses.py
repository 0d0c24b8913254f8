import pytest
import torch

from flowcore.losses import aligned_v_loss, cosine_per_sample, point_on_segment, velocity_mse, window_target
from flowcore.schedules import few_step_sigmas, shifted_sigmas
from flowcore.solvers import seeded_noise, solve


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_constant_velocity_is_integrated_exactly(method):
    c = torch.tensor([[0.5, -2.0], [1.0, 3.0]], dtype=torch.float64)
    x1 = torch.randn(2, 2, dtype=torch.float64)
    sigmas = shifted_sigmas(7, 3.0)
    traj = solve(lambda x, s: c.expand_as(x), x1, sigmas, method=method)
    assert traj.states_BKX.shape == (2, 8, 2)
    for k, s in enumerate(sigmas):
        torch.testing.assert_close(traj.states_BKX[:, k], x1 + (s - 1.0) * c)


def test_linear_field_heun_is_second_order():
    # dx/dsigma = x  ->  x(sigma) = x(1) * exp(sigma - 1)
    x1 = torch.ones(1, 1, dtype=torch.float64)
    exact = torch.exp(torch.tensor(-0.8, dtype=torch.float64))
    errs = {}
    for method in ("euler", "heun"):
        for n in (10, 20):
            sig = [1.0 - 0.8 * i / n for i in range(n + 1)]
            errs[method, n] = abs(float(solve(lambda x, s: x, x1, sig, method=method).final) - float(exact))
    assert errs["euler", 10] / errs["euler", 20] == pytest.approx(2.0, rel=0.15)
    assert errs["heun", 10] / errs["heun", 20] == pytest.approx(4.0, rel=0.15)


def test_capture_subset_and_errors():
    x1 = torch.zeros(3, 4)
    sig = shifted_sigmas(8, 3.0)
    cap = few_step_sigmas(4, 3.0)
    traj = solve(lambda x, s: torch.ones_like(x), x1, sig, capture_sigmas=cap)
    assert traj.states_BKX.shape == (3, 5, 4)
    assert traj.sigmas_K.tolist() == cap
    with pytest.raises(ValueError, match="not a point"):
        solve(lambda x, s: x, x1, sig, capture_sigmas=[1.0, 0.33])
    with pytest.raises(ValueError, match="decreasing"):
        solve(lambda x, s: x, x1, [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda x, s: x, x1, sig, method="rk4")


def test_seeded_noise_is_per_sample():
    a = seeded_noise([1, 2, 3], (4, 2, 2))
    b = seeded_noise([3, 1], (4, 2, 2))
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_window_target_and_losses():
    x_s, x_e = torch.randn(4, 3), torch.randn(4, 3)
    s0, s1 = torch.full((4,), 0.9), torch.full((4,), 0.5)
    v = window_target(x_s, x_e, s0, s1)
    torch.testing.assert_close(point_on_segment(x_s, v, s0, s1), x_e)
    torch.testing.assert_close(point_on_segment(x_s, v, s0, s0), x_s)
    assert float(aligned_v_loss(v, v, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(aligned_v_loss(2 * v, v, alpha=0.0)) == pytest.approx(float(velocity_mse(2 * v, v)))
    # a scaled prediction is aligned: the cos term adds nothing; an opposite one adds 2 alpha
    assert float(aligned_v_loss(2 * v, v, 0.5)) == pytest.approx(float(velocity_mse(2 * v, v)), rel=1e-5)
    assert float(aligned_v_loss(-v, v, 0.5)) == pytest.approx(float(velocity_mse(-v, v)) + 1.0, rel=1e-5)
    assert cosine_per_sample(v, -v).tolist() == pytest.approx([-1.0] * 4)
    with pytest.raises(ValueError):
        aligned_v_loss(v, v, alpha=-1)
    with pytest.raises(ValueError, match="zero width"):
        window_target(x_s, x_e, s0, s0)
