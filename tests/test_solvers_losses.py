import pytest
import torch

from flowcore.losses import aligned_v_loss, cosine_per_sample, point_on_segment, velocity_mse, window_target
from flowcore.schedules import few_step_sigmas, shifted_sigmas
from flowcore.solvers import euler_walk, seeded_noise, solve
from flowcore.tensors import expand_like


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


def _field(w: torch.Tensor):
    """A nonlinear velocity field with a trainable weight; records the sigma batches it is called with."""
    seen = []

    def v(x, sigma_B):
        seen.append(sigma_B)
        s = sigma_B.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.sin(x * w) * (1 + s) - 0.3 * x * s**2

    return v, seen


def _hand_walk(v, x, sigmas, steps):
    """The walk as it was written inline (ota, adversarial, the unrolled loss): every state it visits."""
    out = [x]
    for k in range(steps):
        s0, s1 = float(sigmas[k]), float(sigmas[k + 1])
        x = x + (s1 - s0) * v(x, torch.full((x.shape[0],), s0, device=x.device, dtype=x.dtype))
        out.append(x)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euler_walk_is_the_hand_written_walk_bit_for_bit(dtype):
    sigmas = few_step_sigmas(4, 3.0)
    x0 = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    w = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    v, seen = _field(w)
    steps = []
    got = euler_walk(v, x0, sigmas, on_step=lambda k, x: steps.append((k, x)))
    hand = _hand_walk(v, x0, sigmas, 4)
    assert torch.equal(got, hand[-1])
    assert [k for k, _ in steps] == [0, 1, 2, 3] and all(torch.equal(x, hand[k + 1]) for k, x in steps)
    # each step saw a [B] sigma in x's dtype and device, with the grid's value
    assert [(tuple(s.shape), s.dtype, float(s[0])) for s in seen[:4]] == [((6,), dtype, float(torch.tensor(
        sig, dtype=dtype))) for sig in sigmas[:4]]
    # gradients flow through every step, as through the hand-written walk
    (g_walk,) = torch.autograd.grad(got.sum(), w)
    (g_hand,) = torch.autograd.grad(hand[-1].sum(), w)
    assert torch.equal(g_walk, g_hand) and float(g_walk) != 0.0
    # sigma_dtype: the sigma batch's own dtype (validation builds float32 sigmas)
    v2, seen2 = _field(torch.tensor(1.7, dtype=dtype))
    euler_walk(v2, x0, sigmas, sigma_dtype=torch.float32)
    assert {s.dtype for s in seen2} == {torch.float32}


def test_euler_walk_stops_each_row_at_its_own_step():
    sigmas = few_step_sigmas(4, 3.0)
    x0 = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    v, seen = _field(torch.tensor(0.9))
    stop = torch.tensor([0, 1, 2, 3, 4, 2, 0])
    got = euler_walk(v, x0, sigmas, stop_B=stop)
    hand = _hand_walk(v, x0, sigmas, 4)
    for b, n in enumerate(stop.tolist()):
        assert torch.equal(got[b], hand[n][b])
    assert got.data_ptr() != x0.data_ptr()  # rows that take no step get a copy
    seen.clear()
    short = torch.tensor([2, 1, 0, 0, 0, 0, 0])
    got = euler_walk(v, x0, sigmas, stop_B=short)
    assert len(seen) == 2  # the walk takes max(stop_B) steps only
    assert all(torch.equal(got[b], hand[n][b]) for b, n in enumerate(short.tolist()))
    assert euler_walk(v, x0[:0], sigmas, stop_B=torch.zeros(0, dtype=torch.long)).shape == (0, 5)
    for bad in ([5, 0, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0, 0]):
        with pytest.raises(ValueError, match="stop steps must lie in 0..4"):
            euler_walk(v, x0, sigmas, stop_B=torch.tensor(bad))


def test_solve_euler_is_euler_walk():
    sigmas = shifted_sigmas(8, 3.0)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    v, _ = _field(torch.tensor(1.3))
    traj = solve(v, x0, sigmas)
    hand = _hand_walk(v, x0, sigmas, 8)
    assert all(torch.equal(traj.states_BKX[:, k], hand[k]) for k in range(9))


def test_expand_like_broadcasts_a_batch_vector_against_any_rank():
    t = torch.tensor([1.0, 2.0, 3.0])
    for shape in [(3,), (3, 2), (3, 2, 4), (3, 1, 2, 2)]:
        x = torch.ones(shape, dtype=torch.float64)
        e = expand_like(t, x)
        assert e.shape == (3,) + (1,) * (len(shape) - 1) and e.dtype == t.dtype
        assert e.data_ptr() == t.data_ptr()  # a view: no copy, no cast
        assert torch.equal(e * x, torch.stack([x[b] * t[b] for b in range(3)]))
