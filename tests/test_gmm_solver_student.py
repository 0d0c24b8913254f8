"""The GMM solver student (issue 14): it starts as the exact teacher, stores its mixture with its weights, and the
unrolled objective trains it through its whole few-step solve against the stored endpoint."""

from __future__ import annotations

import json

import pytest
import torch

from flowcore.windows import stage_boundary_indices
from models.flownet import SOLVER_KNOTS, FlowNet, FlowNetConfig, FlowNetTeacher, load_flow_net, save_flow_net
from models.gmm import GMMSpec, GMMTeacher, load_preset
from trainer.config import TrainConfig
from trainer.loop import Trainer


def _spec() -> GMMSpec:
    """A small anisotropic, class-conditional mixture no preset has (3-D, 4 components, 2 classes)."""
    return GMMSpec(sample_shape=(3,), name="aniso3",
                   means_MD=torch.tensor([[1.5, 0.0, -1.0], [-1.5, 0.5, 0.0], [0.0, -2.0, 1.0], [0.5, 1.5, 1.5]]),
                   stds_MD=torch.tensor([[0.2, 0.4, 0.1], [0.3, 0.1, 0.2], [0.15, 0.15, 0.5], [0.4, 0.2, 0.2]]),
                   weights_M=torch.tensor([0.4, 0.3, 0.2, 0.1]), classes_M=torch.tensor([0, 0, 1, 1]))


@pytest.mark.parametrize("guidance_cond", [False, True])
def test_untrained_solver_student_is_the_exact_teacher(guidance_cond):
    spec = _spec()
    teacher = GMMTeacher(spec)
    net = FlowNet(FlowNetConfig("mlp", (3,), 2, guidance_cond=guidance_cond, base_gmm=spec.to_json_dict(),
                                base_guidance=2.5)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    sigma = torch.rand(64, generator=g, dtype=torch.float64)
    cls = torch.randint(-1, 2, (64,), generator=g)
    w = 1.0 + 3.0 * torch.rand(64, generator=g, dtype=torch.float64)
    want = teacher.velocity(x, sigma, cls, w if guidance_cond else 2.5)
    assert torch.equal(net(x, sigma, cls, w), want)
    assert sum(p.numel() for p in net.parameters()) == SOLVER_KNOTS * 3  # three numbers per sigma knot, no net


def test_solver_student_round_trips_with_its_mixture_and_plain_nets_keep_their_config(tmp_path):
    spec = _spec()
    net = FlowNet(FlowNetConfig("mlp", (3,), 2, base_gmm=spec.to_json_dict(), base_guidance=1.5))
    with torch.no_grad():
        net.solver.normal_(0, 0.01)  # a trained table
    save_flow_net(net, tmp_path / "s.safetensors")
    back, _ = load_flow_net(tmp_path / "s.safetensors")
    x, sigma, cls = torch.randn(8, 3), torch.rand(8), torch.tensor([0, 1] * 4)
    assert back.cfg == net.cfg and torch.equal(back(x, sigma, cls), net(x, sigma, cls))
    assert not torch.equal(back(x, sigma, cls), GMMTeacher(spec).velocity(x, sigma, cls, 1.5))
    # a plain net's config (and so every fingerprint and cache key of plain nets) has none of the new fields
    plain = FlowNetConfig("mlp", (3,), 2)
    assert not {"base_gmm", "base_guidance", "residual"} & set(plain.to_dict())
    assert "base_gmm" not in json.dumps(FlowNetTeacher(FlowNet(plain)).config())


def test_net_residual_starts_at_the_teacher_too():
    spec = _spec()
    net = FlowNet(FlowNetConfig("mlp", (3,), 2, width=32, depth=2, base_gmm=spec.to_json_dict(), residual="net"))
    x, sigma, cls = torch.randn(16, 3), torch.rand(16), torch.tensor([0, 1] * 8)
    assert torch.allclose(net(x, sigma, cls), GMMTeacher(spec).velocity(x, sigma, cls, 1.0))
    assert sum(p.numel() for p in net.parameters()) > SOLVER_KNOTS * 3


@pytest.mark.parametrize("bad,match", [
    (dict(residual="spline"), "residual must be one of"),
    (dict(sample_shape=(4,)), "sample shape"),
    (dict(num_classes=3), "classes"),
])
def test_bad_solver_configs_are_refused(bad, match):
    kw = dict(arch="mlp", sample_shape=(3,), num_classes=2, base_gmm=_spec().to_json_dict()) | bad
    with pytest.raises(ValueError, match=match):
        FlowNetConfig(**kw)


def test_objective_and_init_are_validated():
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(data="memory://c", out="memory://o", objective="consistency")
    with pytest.raises(ValueError, match="init must be one of"):
        TrainConfig(data="memory://c", out="memory://o", init="pretrained")


def test_unrolled_loss_is_the_few_step_endpoint_error_and_reaches_every_step(tmp_path, gmm_corpus):
    data = gmm_corpus(64, 32, guidance=1.0, stages=(4,), num_steps=16)
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), stages=(4,), max_steps=1, batch_size=32,
                      progress=False, num_workers=0)
    t = Trainer(cfg).build()
    try:
        assert t.objective == "unrolled"  # the GMM solver student's default
        net = t.student.network
        assert net.cfg.base_gmm == load_preset("latent10").to_json_dict()
        gen = t._corpus_batches()
        batch = next(gen)
        gen.close()
        cond = t.student.corpus_condition(batch)
        loss = t.part("unrolled").solve_loss(batch, cond, batch["valid"].bool(), 4)
        # at init the student is the teacher: the loss is the teacher's own 4-step Euler error, computed here
        teacher = GMMTeacher(load_preset("latent10"))
        states, sig = batch["states"].double(), batch["sigmas"][0].double()
        bounds = stage_boundary_indices(states.shape[1], 4)
        x = states[:, 0]
        for i0, i1 in zip(bounds[:-1], bounds[1:]):
            x = x + (sig[i1] - sig[i0]) * teacher.velocity(x, float(sig[i0]), batch["class_id"], 1.0)
        want = ((x - states[:, -1]) ** 2).flatten(1).mean(1).mean()
        assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)
        loss.backward()
        knots_with_grad = (net.solver.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        assert knots_with_grad == [16, 32, 48, 64]  # sigma 0.25, 0.5, 0.75, 1: every step of the solve
    finally:
        t.close()


def test_windows_objective_still_trains_the_solver_student(tmp_path, gmm_corpus):
    data = gmm_corpus(64, 32, guidance=1.0, stages=(4,), num_steps=16)
    cfg = TrainConfig(data=data, out=str(tmp_path / "run"), stages=(4,), max_steps=3, batch_size=32,
                      progress=False, num_workers=0, objective="windows", ema_decay=0.0)
    t = Trainer(cfg).build()
    try:
        assert t.objective == "windows"
        t.train()
        assert float(t.student.network.solver.detach().abs().sum()) > 0
    finally:
        t.close()


def test_a_spec_written_back_out_rebuilds_the_same_teacher(tmp_path):
    """Weights that need renormalising in their last bits ([.4, .3, .2, .1] sums to 1 + 2e-16): the card and the
    pool's spec file hold the normalised floats, and rebuilding from them must give the recorded fingerprint."""
    spec = GMMSpec.from_json_dict({"name": "four", "sample_shape": [2], "means": [[0, 0], [1, 1], [2, 0], [0, 3]], "stds": [0.3] * 4,
                                   "weights": [0.4, 0.3, 0.2, 0.1]})
    fp = GMMTeacher(spec).fingerprint()
    again = GMMSpec.from_json_dict(json.loads(json.dumps(spec.to_json_dict())))
    assert torch.equal(again.weights_M, spec.weights_M) and GMMTeacher(again).fingerprint() == fp
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(again.to_json_dict()))
    assert GMMTeacher(GMMSpec.load(path)).fingerprint() == fp
    assert float(GMMSpec.from_json_dict({"sample_shape": [1], "means": [[0], [1]], "stds": [1, 1],
                                         "weights": [3, 1]}).weights_M[0]) == 0.75  # unnormalised: normalised
