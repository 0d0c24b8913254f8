"""The objective protocol (``trainer.objectives``): every registered objective keeps its contract, and a new
method is one module: an objective defined here, in the test suite, trains, logs, checkpoints and resumes
through the unchanged Trainer."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from flowcore.rollout import LocalRollout
from trainer import objectives
from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.objectives import OBJECTIVES, AuxState, MicroBatch, Objective, Rows
from trainer.students import FlowNetStudent, SD3Student
from trainer.teacher import teacher_from_card


@pytest.fixture(scope="module")
def corpus(gmm_corpus):
    return gmm_corpus(128, 64, stages=(4,))


def _cfg(data, out, **kw):
    base = dict(data=data, out=str(out), stages=(4,), max_steps=6, batch_size=32, init="scratch", student_width=64,
                student_depth=2, progress=False, log_every=1, checkpoint_every=3, num_workers=0, eval_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


class OneStepObjective(Objective):
    """A test method: the student's one-step jump from the stored noise onto the stored endpoint (Luhman &
    Luhman's knowledge distillation), weighted by a learned positive scale that has its own optimizer, so the
    objective owns an auxiliary network the checkpointer must keep."""

    name: ClassVar[str] = "one-step-test"
    auxiliary: ClassVar[bool] = True

    @classmethod
    def active(cls, cfg, default_objective):
        return True

    def build(self):
        torch.manual_seed(0)
        self.scale = torch.nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.scale.parameters(), lr=0.01)
        self._batch = None

    def stateful(self):
        return {"onestep": AuxState(self.scale, self.opt, missing="no one-step scale under {out}")}

    def prepare(self, mb: MicroBatch):
        if mb.batch is None:
            return None
        self._batch = mb.batch
        x = mb.batch["states"][:, 0]
        return Rows(x, torch.ones(x.shape[0]), mb.cond)

    def loss(self, mb, v_BX):
        end = self._batch["states"][:, -1].to(v_BX.device)
        err = ((self._batch["states"][:, 0].to(v_BX.device) - v_BX.float() - end) ** 2).mean()
        w = torch.nn.functional.softplus(self.scale(torch.ones(1, 1))).squeeze()
        return 0.1 * w.detach() * err, {"one_step_error": float(err.detach())}

    def after_backward(self, mb, scale):
        # the scale learns to shrink the weight (its own backward: a toy auxiliary update)
        w = torch.nn.functional.softplus(self.scale(torch.ones(1, 1))).squeeze()
        (w * scale).backward()
        return {"one_step_weight": float(w.detach())}

    def optimizer_step(self):
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {}


@pytest.fixture
def registered():
    saved = list(OBJECTIVES)
    objectives.register(OneStepObjective)
    yield
    OBJECTIVES[:] = saved


def test_an_objective_defined_in_the_tests_trains_checkpoints_and_resumes_through_the_unchanged_trainer(
        corpus, tmp_path, registered):
    t = Trainer(_cfg(corpus, tmp_path / "a")).build()
    try:
        assert [o.name for o in t.objectives] == ["windows", "one-step-test"]
        last = t.train()
    finally:
        t.close()
    rows = [r for r in _metrics(tmp_path / "a") if "one_step_error" in r]
    assert len(rows) == 6 and all(r["one_step_weight"] > 0 for r in rows)
    assert rows[-1]["one_step_weight"] < rows[0]["one_step_weight"]  # its own optimizer stepped
    assert last["loss"] > last["reflow_loss"]  # its term adds to the regression, which stays the reflow loss
    ck = tmp_path / "a" / "checkpoints" / "step-00000006"
    assert set(load_file(ck / "extra-onestep.safetensors")) == {"weight", "bias"}
    # killed at step 3 and resumed: the same weights, the objective's own network included
    for steps in (3, 6):
        t = Trainer(_cfg(corpus, tmp_path / "b", max_steps=steps)).build()
        try:
            t.train()
        finally:
            t.close()
    for name in ("model.safetensors", "extra-onestep.safetensors"):
        a, b = load_file(ck / name), load_file(tmp_path / "b" / "checkpoints" / "step-00000006" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_a_checkpoint_without_a_registered_part_is_refused_by_name(corpus, tmp_path, registered):
    OBJECTIVES[:] = [o for o in OBJECTIVES if o is not OneStepObjective]
    t = Trainer(_cfg(corpus, tmp_path / "c", max_steps=3)).build()
    try:
        t.train()
    finally:
        t.close()
    objectives.register(OneStepObjective)
    with pytest.raises(ValueError, match="no one-step scale under"):
        Trainer(_cfg(corpus, tmp_path / "c", max_steps=6)).build()


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES], ids=lambda o: o.name)
def test_every_registered_objective_keeps_the_protocol(objective):
    assert issubclass(objective, Objective) and objective.name
    assert objective.requires <= set(FlowNetStudent.capabilities)  # every objective trains a flow-net student
    assert [o.name for o in OBJECTIVES].count(objective.name) == 1


@pytest.mark.parametrize("kw, names", [
    ({}, ["windows"]),
    ({"objective": "unrolled"}, ["unrolled"]),
    ({"ota_ratio": 0.25}, ["windows", "online"]),
    ({"adv_weight": 0.5}, ["windows", "adversarial"]),
    ({"objective": "unrolled", "ota_ratio": 0.25, "adv_weight": 0.5}, ["unrolled", "online", "adversarial"]),
])
def test_each_objective_runs_alone_and_combined_with_its_metrics(corpus, tmp_path, kw, names):
    rollout = None
    if kw.get("ota_ratio"):
        from trainer.data import open_corpus

        rollout = LocalRollout(teacher_from_card(open_corpus(corpus).card))
    t = Trainer(_cfg(corpus, tmp_path / "r", max_steps=3, **kw), rollout).build()
    try:
        assert [o.name for o in t.objectives] == names
        last = t.train()
    finally:
        t.close()
    assert torch.isfinite(torch.tensor(last["loss"]))
    if "adversarial" in names:
        assert {"adv_d_loss", "adv_g_loss", "adv_fm_loss"} <= set(last)
        assert (tmp_path / "r" / "checkpoints" / "step-00000003" / "extra-disc.safetensors").exists()
    if "online" in names:
        assert {"ota_samples", "ota_shortfall", "online_in_step"} <= set(last)
    if names == ["unrolled"]:
        assert last["loss"] == last["reflow_loss"]  # the unrolled solve is the fit when no rows regress


def test_an_objective_a_family_cannot_train_is_refused_before_anything_is_built():
    from trainer.objectives import check_requirements

    cfg = TrainConfig(data="memory://c", out="memory://o", objective="unrolled")
    with pytest.raises(ValueError, match="--objective unrolled .* is for flow-net students"):
        check_requirements(SD3Student, cfg)
    check_requirements(FlowNetStudent, cfg)
