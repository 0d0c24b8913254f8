"""The one teacher registry (models.registry): every component rebuilds teachers through it."""

import numpy as np
import pytest
import torch

from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher, save_flow_net
from models.gmm import GMMTeacher, load_preset
from models.registry import TeacherMismatch, build_teacher, teacher_from_card, teacher_from_config


class _Card:
    """The card fields the registry reads (a real DatasetCard has these and more)."""

    def __init__(self, kind, config, fingerprint, run=None):
        self.teacher = type("T", (), {"kind": kind, "config": config, "fingerprint": fingerprint})()
        self.run = run or {}


def test_spec_and_card_give_the_same_gmm_teacher():
    t = build_teacher("gmm:ring2d")
    again = teacher_from_card(_Card("gmm", t.config(), t.fingerprint()))
    assert isinstance(again, GMMTeacher) and again.fingerprint() == t.fingerprint()


def test_flownet_from_the_card_goes_through_the_callers_fetch(tmp_path):
    torch.manual_seed(0)
    teacher = FlowNetTeacher(FlowNet(FlowNetConfig("mlp", (2,), None, width=16, depth=1)))
    path = tmp_path / "net.safetensors"
    save_flow_net(teacher.net, path)
    fetched = []

    def fetch(url):
        fetched.append(url)
        return str(path)

    card = _Card("flownet", teacher.config(), teacher.fingerprint(), {"teacher_spec": "flownet:s3://b/net.safetensors"})
    assert teacher_from_card(card, fetch=fetch).fingerprint() == teacher.fingerprint()
    assert fetched == ["s3://b/net.safetensors"]
    with pytest.raises(ValueError, match="remote location"):  # no fetch: remote weights are refused
        teacher_from_card(card)
    with pytest.raises(ValueError, match="remote location"):
        build_teacher("flownet:s3://b/net.safetensors")


def test_clear_errors_for_incomplete_cards():
    with pytest.raises(ValueError, match="no spec"):
        teacher_from_config("gmm", {}, {})
    with pytest.raises(ValueError, match="run.teacher_spec"):
        teacher_from_config("flownet", {}, {})
    with pytest.raises(ValueError, match="not on this machine"):
        teacher_from_config("diffusers", {"source": {"path": "/no/such/folder"}}, {})
    with pytest.raises(ValueError, match="no teacher of kind"):
        teacher_from_config("mystery", {}, {})
    t = GMMTeacher(load_preset("latent10"))
    with pytest.raises(TeacherMismatch, match="fingerprint differs"):
        teacher_from_card(_Card("gmm", t.config(), "0" * 64))


@pytest.mark.parametrize("schedule", [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    {"num_train_timesteps": 50, "trained_betas": list(np.linspace(1e-4, 0.02, 50))},
])
def test_pure_alphas_cumprod_equal_diffusers_ddpm(schedule):
    """flowcore.vp_flow computes the DDPM noise schedule without diffusers, bit-equal to diffusers' own."""
    from diffusers import DDPMScheduler

    from flowcore.vp_flow import alphas_cumprod_of

    ref = DDPMScheduler(**schedule).alphas_cumprod.double().numpy().copy()
    if ref[-1] == 0.0:
        ref[-1] = 2.0**-24  # zero terminal SNR: the same floor as alphas_cumprod_of
    assert np.array_equal(alphas_cumprod_of(schedule), ref)
