"""Teacher fingerprints are part of every corpus card: moving or refactoring model code must not change them.

The values below were recorded before the model layer moved out of flowcore (issue 13); a change here
means existing corpora would no longer match their own teacher.
"""

import pytest
import torch

from trajflow.cli import main

GOLDEN = {
    "gmm:ring2d": "74c628c4e35f252f0c67cca7f0c85d8c9fb22d2e807eea779cd4e2bb3d5c5c4d",
    "gmm:latent10": "b9126f64f65c9b7fc26bac2ff67bd62ce8137833f926b3696fc3dc99a5fdbcb9",
    "flownet-seeded": "5bcd18a2ca65d7bbd71c7062cbdc9944ce215b55d2741ffa117f7e892ea677a2",
    "diffusers-sd3": "71ac176cfa3a1ad79f486fa77fe9db283801d289640e91f712d01bb9bc8af2c6",
    "diffusers-sd15": "03932877f1af249f366bca4d82b4c7262bcec43afa2b5a1d830fb336356eeb32",
    "diffusers-sdxl": "08f3ee0e1bba138cbc6ff06da67a99baf594717c955d3f374359932077fda20e",
}


def _build(name, tmp_path):
    from models.registry import build_teacher

    if name.startswith("gmm:"):
        return build_teacher(name)
    if name == "flownet-seeded":
        from models.flownet import FlowNet, FlowNetConfig, FlowNetTeacher

        torch.manual_seed(0)
        return FlowNetTeacher(FlowNet(FlowNetConfig("mlp", (10,), 4, width=64, depth=2, guidance_cond=True)))
    kind = name.split("-")[1]
    folder = tmp_path / kind
    assert main([f"make-tiny-{kind}", str(folder)]) == 0
    return build_teacher(f"diffusers:{folder}")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_fingerprint_is_golden(name, tmp_path):
    fp = _build(name, tmp_path).fingerprint()
    assert fp == GOLDEN[name], f"{name}: {fp}"
