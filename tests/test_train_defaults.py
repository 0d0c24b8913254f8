"""Memory-aware training defaults: batch size and mixed precision by the corpus's teacher kind."""

import pytest

from trainer.config import DEFAULT_BATCH_SIZE, TrainConfig


def _cfg(**kw):
    return TrainConfig(data="memory://c", out="memory://o", **kw)


@pytest.mark.parametrize("kind,cuda,bf16,batch,mp", [
    ("gmm", False, False, 128, "no"),
    ("flownet", True, True, 128, "no"),  # flow nets are small: full precision
    ("diffusers", True, True, 4, "bf16"),
    ("diffusers_unet", True, True, 4, "bf16"),
    ("diffusers", True, False, 4, "no"),  # a GPU without bf16 (e.g. V100): no autocast by default
    ("diffusers_unet", False, False, 4, "no"),  # CPU
])
def test_defaults_follow_the_teacher_and_the_machine(kind, cuda, bf16, batch, mp):
    cfg = _cfg()
    assert cfg.batch_size is None and cfg.mixed_precision is None
    cfg.resolve_defaults(kind, cuda=cuda, bf16_supported=bf16)
    assert (cfg.batch_size, cfg.mixed_precision) == (batch, mp)
    assert DEFAULT_BATCH_SIZE[kind] == batch


def test_explicit_settings_are_kept():
    cfg = _cfg(batch_size=16, mixed_precision="fp16")
    cfg.resolve_defaults("diffusers", cuda=True, bf16_supported=True)
    assert (cfg.batch_size, cfg.mixed_precision) == (16, "fp16")


def test_validation_with_unresolved_batch_size():
    assert _cfg(ota_ratio=0.25).ota_samples == 32  # online mixing is for flow nets: their default 128
    with pytest.raises(ValueError, match="batch-size must be >= 1"):
        _cfg(batch_size=0)
    with pytest.raises(ValueError, match="mixed-precision"):
        _cfg(mixed_precision="fp8")
