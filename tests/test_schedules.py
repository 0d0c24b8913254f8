import pytest
import torch

from flowcore.schedules import (
    StageSchedule,
    few_step_sigmas,
    linear_sigmas,
    parse_stages,
    shift_sigma,
    shifted_sigmas,
    solver_sigmas,
    window_boundaries,
    window_index,
)


def test_few_step_sigmas_contract():
    assert few_step_sigmas(4, 3.0) == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert few_step_sigmas(1, 3.0) == [1.0, 0.0]
    assert few_step_sigmas(2, 1.0) == [1.0, 0.5, 0.0]


def test_contract_command_prints_grid():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from flowcore.schedules import few_step_sigmas; print(few_step_sigmas(4, 3.0))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == "[1.0, 0.9, 0.75, 0.5, 0.0]"


def test_linear_and_shift():
    assert linear_sigmas(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert shifted_sigmas(4, 1.0) == linear_sigmas(4)
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    y = shift_sigma(s, 3.0)
    assert torch.all(y[1:] > y[:-1]) and y[0] == 0 and y[-1] == 1
    with pytest.raises(ValueError):
        shift_sigma(0.5, 0.0)
    with pytest.raises(ValueError):
        linear_sigmas(0)


def test_stage_windows_merge_adjacent():
    sched = StageSchedule((8, 4, 2), shift=3.0)
    saved = sched.saved_sigmas()
    assert len(saved) == 9 and saved[0] == 1.0 and saved[-1] == 0.0
    assert sched.boundary_indices(4) == [0, 2, 4, 6, 8]
    assert sched.boundaries(2) == window_boundaries(2, 3.0)
    assert sched.boundaries(4) == window_boundaries(4, 3.0)  # exact float equality
    with pytest.raises(ValueError, match="divide"):
        StageSchedule((8, 3))
    with pytest.raises(ValueError, match="divide"):
        StageSchedule((2, 4))
    with pytest.raises(ValueError):
        StageSchedule(())
    assert parse_stages("8,4,2") == (8, 4, 2)
    with pytest.raises(ValueError, match="comma"):
        parse_stages("8;4")


def test_solver_grid_contains_every_boundary_exactly():
    for shift in (1.0, 3.0, 2.5):
        grid = solver_sigmas(48, shift, 8)
        for k in (8, 4, 2):
            assert set(window_boundaries(k, shift)) <= set(grid)
    with pytest.raises(ValueError, match="multiple"):
        solver_sigmas(30, 3.0, 8)


def test_window_index_half_open_owns_start():
    b = window_boundaries(4, 3.0)  # [1, .9, .75, .5, 0]
    s = torch.tensor([1.0, 0.95, 0.9, 0.8, 0.75, 0.5, 0.1])
    assert window_index(s, b).tolist() == [0, 0, 1, 1, 2, 3, 3]
    with pytest.raises(ValueError):
        window_index(torch.tensor([0.0]), b)
