"""Pure OTA and adversarial parts: per-sample rollouts, window grids, student starts, losses."""

from __future__ import annotations

import pytest
import torch

from flowcore.adversarial import (
    discriminator_hinge_loss,
    feature_matching_loss,
    step_probabilities,
    student_last_step_inputs,
)
from flowcore.ota import interpolated_starts, stage_solver_bounds, student_window_starts, window_grids
from flowcore.rollout import LocalRollout, teacher_rollout
from flowcore.schedules import solver_sigmas
from flowcore.solvers import solve_teacher
from models.flownet import FlowNet, FlowNetConfig
from models.gmm import GMMTeacher, load_preset
from trainer.students.flownet_discriminator import TrajectoryDiscriminator


@pytest.fixture(scope="module")
def teacher():
    return GMMTeacher(load_preset("latent10"))


def test_rollout_on_a_shared_grid_equals_the_corpus_solver(teacher):
    grid = solver_sigmas(16, 3.0, 8)
    x = torch.randn(6, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cls = torch.arange(6) % 10
    for method in ("euler", "heun"):
        ref = solve_teacher(teacher, x, grid, cond=cls, guidance=2.0, method=method).states_BKX
        got = teacher_rollout(teacher, x, torch.tensor(grid).expand(6, -1), list(range(17)), cond=cls, guidance=2.0,
                              method=method)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_rollout_on_per_sample_grids_equals_solving_each_row(teacher):
    grid = solver_sigmas(16, 3.0, 8)
    bounds = stage_solver_bounds(grid, [grid[i] for i in range(0, 17, 2)], 4)
    assert bounds == [0, 4, 8, 12, 16]
    w = torch.tensor([0, 3, 1, 2])
    g = window_grids(grid, bounds, w)
    assert g.shape == (4, 5)
    for b in range(4):
        assert g[b].tolist() == grid[bounds[int(w[b])]:bounds[int(w[b]) + 1] + 1]
    x = torch.randn(4, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    cls = torch.tensor([1, 2, 3, 4])
    got = teacher_rollout(teacher, x, g, [0, 4], cond=cls, guidance=torch.tensor([1.0, 2.0, 3.0, 1.5]))
    for b in range(4):
        ref = solve_teacher(teacher, x[b:b + 1], g[b].tolist(), cond=cls[b:b + 1], guidance=float([1, 2, 3, 1.5][b]))
        torch.testing.assert_close(got[b, -1], ref.final[0], rtol=0, atol=1e-5)


def test_bad_rollout_requests_are_clear_errors(teacher):
    x = torch.randn(2, *teacher.sample_shape)
    good = torch.tensor([[1.0, 0.5, 0.0]] * 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        teacher_rollout(teacher, x, torch.tensor([[1.0, 0.5, 0.5]] * 2), [0, 2])
    with pytest.raises(ValueError, match="shape"):
        teacher_rollout(teacher, x, good[:1], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        teacher_rollout(teacher, x * float("nan"), good, [0, 2])
    with pytest.raises(ValueError, match="save"):
        teacher_rollout(teacher, x, good, [2, 0])
    with pytest.raises(ValueError, match="solver"):
        teacher_rollout(teacher, x, good, [0, 2], method="rk45")


def test_local_rollout_is_asynchronous_and_matches(teacher):
    client = LocalRollout(teacher)
    x = torch.randn(3, *teacher.sample_shape)
    grid = torch.tensor([[1.0, 0.75, 0.5]] * 3, dtype=torch.float64)
    fut = client.submit(x, grid, [0, 2], torch.tensor([0, 1, 2]), 1.0)
    torch.testing.assert_close(fut.result(30), teacher_rollout(teacher, x, grid, [0, 2], cond=torch.tensor([0, 1, 2])))
    assert client.fingerprint() == teacher.fingerprint()
    client.close()


def test_student_window_starts_follow_euler_steps():
    const = torch.tensor([1.0, -2.0])

    def v(x, s):  # a constant field: after w Euler steps x = eps + (s_w - 1) * c
        return const.expand_as(x)

    noise = torch.randn(4, 2)
    boundary = [1.0, 0.9, 0.75, 0.5, 0.0]
    w = torch.tensor([0, 1, 2, 3])
    x = student_window_starts(v, noise, boundary, w)
    for b in range(4):
        torch.testing.assert_close(x[b], noise[b] + (boundary[int(w[b])] - 1.0) * const)
    s = torch.tensor([0.25, 0.5, 0.75, 1.0])
    x0 = torch.randn(4, 2)
    torch.testing.assert_close(interpolated_starts(x0, noise, s), (1 - s[:, None]) * x0 + s[:, None] * noise)


def test_student_last_step_inputs_and_step_probabilities():
    boundary = [1.0, 0.9, 0.75, 0.5, 0.0]
    noise = torch.randn(4, 2)
    start, s_from, s_to = student_last_step_inputs(lambda x, s: torch.ones_like(x), noise, boundary,
                                                   torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(s_from, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    torch.testing.assert_close(s_to, torch.tensor([0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(start, noise + (s_from[:, None] - 1.0))
    with pytest.raises(ValueError, match="steps"):
        student_last_step_inputs(lambda x, s: x, noise, boundary, torch.tensor([0, 1, 1, 1]))
    torch.testing.assert_close(step_probabilities(4), torch.tensor([0.2, 0.2, 0.2, 0.4]))
    torch.testing.assert_close(step_probabilities(2), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(step_probabilities(2, [1, 3]), torch.tensor([0.25, 0.75]))
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError):
            step_probabilities(2, bad)


def test_discriminator_losses_and_backbone():
    assert float(discriminator_hinge_loss(torch.full((3,), 2.0), torch.full((3,), -2.0))) == 0.0
    assert float(discriminator_hinge_loss(torch.zeros(3), torch.zeros(3))) == 2.0
    f = [torch.randn(3, 5), torch.randn(3, 5)]
    assert float(feature_matching_loss(f, f)) == 0.0
    for arch, shape in (("mlp", (2,)), ("conv", (4, 8, 8))):
        cfg = FlowNetConfig(arch, shape, num_classes=3, width=16, depth=3)
        net = FlowNet(cfg)
        d = TrajectoryDiscriminator(cfg, num_blocks=2).load_backbone(net)
        torch.testing.assert_close(d.blocks[1].film.weight, net.blocks[1].film.weight)
        logit, feats = d(torch.randn(5, *shape), torch.rand(5), torch.randint(0, 3, (5,)))
        assert logit.shape == (5,) and len(feats) == 2
