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
    resolved = cfg.resolved(kind, cuda=cuda, bf16_supported=bf16)
    assert (resolved.batch_size, resolved.mixed_precision) == (batch, mp)
    assert cfg.batch_size is None  # the caller's config is not mutated
    assert DEFAULT_BATCH_SIZE[kind] == batch


def test_explicit_settings_are_kept():
    cfg = _cfg(batch_size=16, mixed_precision="fp16")
    cfg = cfg.resolved("diffusers", cuda=True, bf16_supported=True)
    assert (cfg.batch_size, cfg.mixed_precision) == (16, "fp16")


def test_validation_with_unresolved_batch_size():
    assert _cfg(ota_ratio=0.25).resolved("gmm", cuda=False, bf16_supported=False).ota_samples == 32
    with pytest.raises(ValueError, match="batch-size must be >= 1"):
        _cfg(batch_size=0)
    with pytest.raises(ValueError, match="mixed-precision"):
        _cfg(mixed_precision="fp8")


@pytest.mark.parametrize("ratio,msg", [
    (0.9, "leaves 0 corpus samples per step \\(4 online\\)"),  # the diffusers default batch of 4
    (0.1, "round\\(0.1 x 4\\) = 0 online samples"),
])
def test_ota_split_is_checked_after_the_batch_size_is_resolved(ratio, msg):
    """The split is validated with the batch size the run will use, not the flow-net default (issue 13)."""
    cfg = _cfg(ota_ratio=ratio)  # accepted: the batch size is not known yet
    with pytest.raises(ValueError, match=msg):
        cfg.resolved("diffusers", cuda=False, bf16_supported=False)
    assert cfg.resolved("gmm", cuda=False, bf16_supported=False).ota_samples == round(ratio * 128)


def test_ota_split_with_an_explicit_batch_size_is_checked_at_once():
    with pytest.raises(ValueError, match="0 online samples"):
        _cfg(ota_ratio=0.1, batch_size=4)
    with pytest.raises(ValueError, match="leaves 0 corpus samples"):
        _cfg(ota_ratio=0.9, batch_size=4)
    assert _cfg(ota_ratio=1.0, batch_size=4).corpus_batch_size == 0  # online only is asked for explicitly
