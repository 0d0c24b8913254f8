import pytest
import torch

from flowcore.schedules import shifted_sigmas
from flowcore.solvers import seeded_noise, solve_teacher
from flowcore.teacher import Teacher
from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher, fit_flow_net, load_flow_net, save_flow_net
from models.gmm import GMMTeacher, load_preset


def test_fit_ring2d_mlp_learns_the_flow(tmp_path):
    torch.manual_seed(0)
    gmm = GMMTeacher(load_preset("ring2d"))
    net = FlowNet(FlowNetConfig("mlp", (2,), 8, width=128, depth=3))
    losses = fit_flow_net(net, lambda n, g: gmm.sample(n, g), steps=600, batch_size=256, lr=3e-3)
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50
    teacher = FlowNetTeacher(net)
    assert isinstance(teacher, Teacher)
    # its 32-step class-conditional samples land near the right mode
    cls = torch.arange(8).repeat(25)
    x = solve_teacher(teacher, seeded_noise(range(200), (2,)), shifted_sigmas(32), cond=cls, capture_sigmas=[0.0]).final
    acc = (gmm.classify(x) == cls).float().mean()
    assert acc > 0.9, acc
    # save / load round trip: identical outputs and fingerprint
    p = tmp_path / "ring.safetensors"
    save_flow_net(net, p, extra={"fitted_on": "ring2d"})
    net2, extra = load_flow_net(p)
    assert extra == {"fitted_on": "ring2d"}
    t2 = FlowNetTeacher(net2)
    xs, s = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(teacher.velocity(xs, s, cls[:5], 2.0), t2.velocity(xs, s, cls[:5], 2.0))
    assert teacher.fingerprint() == t2.fingerprint()
    with torch.no_grad():
        net2.out[1].bias.add_(1e-3)
    assert teacher.fingerprint() != t2.fingerprint()


def test_conv_net_cfg_and_shapes():
    torch.manual_seed(0)
    net = FlowNet(FlowNetConfig("conv", (4, 8, 8), 10, width=16, depth=2))
    t = FlowNetTeacher(net)
    x, s, c = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    v1 = t.velocity(x, s, c, 1.0)
    with torch.no_grad():
        assert torch.allclose(v1, net(x, s, c))
        vu = net(x, s, torch.full((3,), -1))
    v3 = t.velocity(x, s, c, 3.0)
    torch.testing.assert_close(v3, vu + 3.0 * (v1 - vu), rtol=1e-4, atol=1e-5)
    # the sigma embedding resolves nearby window boundaries
    e = net.cond(torch.tensor([0.5, 0.5 + 1e-3]), None)
    assert (e[0] - e[1]).abs().max() > 1e-3


def test_config_and_file_errors(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        FlowNetConfig("unet", (2,))
    with pytest.raises(ValueError, match="C x H x W"):
        FlowNetConfig("conv", (2,))
    with pytest.raises(FileNotFoundError):
        load_flow_net(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_flow_net(bad)
    p = tmp_path / "t.safetensors"
    save_flow_net(FlowNet(FlowNetConfig("mlp", (2,), None, width=8, depth=1)), p)
    p.write_bytes(p.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError):
        load_flow_net(p)
