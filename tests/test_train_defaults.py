"""Memory-aware training defaults: batch size, mixed precision and budget by the student family (its ClassVars),
picked from the corpus's teacher kind."""

import pytest

from trainer.config import TrainConfig
from trainer.students import FlowNetStudent, SD3Student, UNetStudent, student_class_for


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
    family = student_class_for(kind)
    resolved = cfg.resolved(family, cuda=cuda, bf16_supported=bf16)
    assert (resolved.batch_size, resolved.mixed_precision) == (batch, mp)
    assert cfg.batch_size is None  # the caller's config is not mutated
    assert family.DEFAULT_BATCH_SIZE == batch


def test_family_defaults_keep_their_values():
    """The values the per-kind tables of trainer.config held (the demo's numbers depend on them)."""
    table = {(f.DEFAULT_BUDGET, f.DEFAULT_BATCH_SIZE, f.DEFAULT_MIXED_PRECISION_ON_BF16_GPU)
             for f in (FlowNetStudent, SD3Student, UNetStudent)}
    assert (FlowNetStudent.DEFAULT_BUDGET, FlowNetStudent.DEFAULT_BATCH_SIZE,
            FlowNetStudent.DEFAULT_MIXED_PRECISION_ON_BF16_GPU) == (1500, 128, "no")
    assert table == {(1500, 128, "no"), (20000, 4, "bf16")}
    assert student_class_for("gmm") is student_class_for("flownet") is FlowNetStudent


@pytest.mark.parametrize("family", ["gmm", "flux", None, object])
def test_an_unknown_family_is_an_error_not_flow_net_defaults(family):
    """A teacher kind string (the old argument) or anything that is not a student family is refused."""
    cfg = _cfg(stages=(4,))
    for call in (lambda: cfg.resolved(family, cuda=False, bf16_supported=False),
                 lambda: cfg.default_steps(family, 896), lambda: cfg.stage_steps(family, 896)):
        with pytest.raises(ValueError, match="not a student family"):
            call()
    with pytest.raises(ValueError, match="'flux' teacher corpus is not supported"):
        student_class_for("flux")


def test_explicit_settings_are_kept():
    cfg = _cfg(batch_size=16, mixed_precision="fp16")
    cfg = cfg.resolved(SD3Student, cuda=True, bf16_supported=True)
    assert (cfg.batch_size, cfg.mixed_precision) == (16, "fp16")


def test_validation_with_unresolved_batch_size():
    assert _cfg(ota_ratio=0.25).resolved(FlowNetStudent, cuda=False, bf16_supported=False).ota_samples == 32
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
        cfg.resolved(SD3Student, cuda=False, bf16_supported=False)
    assert cfg.resolved(FlowNetStudent, cuda=False, bf16_supported=False).ota_samples == round(ratio * 128)


def test_ota_split_with_an_explicit_batch_size_is_checked_at_once():
    with pytest.raises(ValueError, match="0 online samples"):
        _cfg(ota_ratio=0.1, batch_size=4)
    with pytest.raises(ValueError, match="leaves 0 corpus samples"):
        _cfg(ota_ratio=0.9, batch_size=4)
    assert _cfg(ota_ratio=1.0, batch_size=4).corpus_batch_size == 0  # online only is asked for explicitly


def test_default_budget_fits_the_corpus():
    from trainer.config import DEFAULT_MAX_EPOCHS, DEFAULT_MIN_STEPS

    fam = FlowNetStudent
    cfg = _cfg(stages=(4,)).resolved(fam, cuda=False, bf16_supported=False)
    assert cfg.default_steps(fam, 896) == -(-DEFAULT_MAX_EPOCHS * 896 // 128)  # 350 steps = 50 epochs
    assert cfg.default_steps(fam, 10**7) == fam.DEFAULT_BUDGET == 1500  # a big corpus: the family's budget
    assert cfg.default_steps(fam, 64) == DEFAULT_MIN_STEPS  # a tiny one: never below the floor
    assert cfg.default_steps(fam, 4096, world=2) == -(-DEFAULT_MAX_EPOCHS * 4096 // 256)  # the global batch
    assert _cfg(stages=(4,), max_steps=999).stage_steps(fam, 896) == (999,)  # explicit steps win
    assert _cfg(stages=(4, 2)).stage_steps(SD3Student, 10**7) == (10000, 10000)  # a diffusers student's 20000


def test_a_run_of_many_epochs_says_so_before_it_starts(tmp_path, capsys):
    from fixtures import make_gmm_corpus as make_corpus

    from trainer.loop import Trainer

    data = make_corpus(str(tmp_path / "corpus"), 128, 64)
    cfg = _cfg(stages=(4,), max_steps=2000, batch_size=32, init="scratch", student_width=16, student_depth=1,
               num_workers=0, progress=False)
    cfg.data, cfg.out = data, str(tmp_path / "run")
    t = Trainer(cfg).build()
    t.close()
    assert "500 epochs over 128 training trajectories" in capsys.readouterr().err
