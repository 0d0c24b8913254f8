"""`trajflow generate`'s default --shift: the diffusers teacher's own scheduler shift."""

import json
from pathlib import Path

import pytest

from models.spec import scheduler_shift
from models.tiny import make_tiny_sd3_pipeline, make_tiny_sd15_pipeline
from pipeline.config import GenerateConfig


def _cfg(teacher, **kw):
    return GenerateConfig(teacher=teacher, out="memory://corpus", num_trajectories=4, **kw)


def test_sd3_folder_gives_its_scheduler_shift(tmp_path):
    folder = Path(make_tiny_sd3_pipeline(tmp_path / "sd3"))
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["shift"] == 3.0
    cfg = _cfg(f"diffusers:{folder}")
    assert cfg.shift == 3.0
    assert cfg.grid[:3] == pytest.approx([1.0, 3 * (31 / 32) / (1 + 2 * 31 / 32), 3 * (30 / 32) / (1 + 2 * 30 / 32)])
    assert _cfg(f"diffusers:{folder}", shift=1.5).shift == 1.5  # an explicit flag wins


def test_unet_and_builtin_teachers_default_to_no_shift(tmp_path):
    assert _cfg(f"diffusers:{make_tiny_sd15_pipeline(tmp_path / 'sd15')}").shift == 1.0
    assert _cfg("gmm:ring2d").shift == 1.0
    bare = tmp_path / "bare"  # a transformer folder without scheduler/: no shift to read
    (bare / "transformer").mkdir(parents=True)
    assert _cfg(f"diffusers:{bare}").shift == 1.0


def test_dynamic_shifting_and_bad_configs_ask_for_an_explicit_shift(tmp_path):
    with pytest.raises(ValueError, match="dynamic shifting.*--shift"):
        scheduler_shift({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="invalid shift"):
        scheduler_shift({"shift": -2})
    folder = tmp_path / "broken"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "transformer").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler config.*--shift"):
        _cfg(f"diffusers:{folder}")
    assert _cfg(f"diffusers:{folder}", shift=3.0).shift == 3.0  # an explicit shift needs no config
    with pytest.raises(ValueError, match="shift must be a positive number"):
        _cfg("gmm:ring2d", shift=0.0)


def test_shift_read_from_a_pipeline_on_s3(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/models/sd3/scheduler/scheduler_config.json",
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).encode())
    assert _cfg(f"diffusers:s3://{s3_bucket}/models/sd3").shift == 3.0
