"""evaluation.fid_inception: the FID Inception-v3 written without torchvision has pytorch-fid's parameter
names and shapes, loads strictly from safetensors and weights-only .pth files, and gives FID."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evaluation.fid_inception import (
    FID_WEIGHTS_FILE,
    FIDInceptionV3,
    InceptionFID,
    _avg_pool_tf,
    load_fid_inception,
    save_random_fid_inception,
)
from evaluation.image_metrics import MetricWeightsMissing, frechet_distance

# Derived by hand from pytorch-fid's src/pytorch_fid/inception.py (fid_inception_v3: torchvision's
# Inception3(num_classes=1008, aux_logits=False) with Mixed_5b..7c swapped for the FID blocks, then
# load_state_dict of pt_inception-2015-12-05-6726825d.pth) and torchvision's models/inception.py.
# BasicConv2d modules per top-level block: stem convs 1 each, InceptionA 7, InceptionB 4, InceptionC 10,
# InceptionD 6, InceptionE 9.
CONVS_PER_BLOCK = {"Conv2d_1a_3x3": 1, "Conv2d_2a_3x3": 1, "Conv2d_2b_3x3": 1, "Conv2d_3b_1x1": 1,
                   "Conv2d_4a_3x3": 1, "Mixed_5b": 7, "Mixed_5c": 7, "Mixed_5d": 7, "Mixed_6a": 4, "Mixed_6b": 10,
                   "Mixed_6c": 10, "Mixed_6d": 10, "Mixed_6e": 10, "Mixed_7a": 6, "Mixed_7b": 9, "Mixed_7c": 9}
# 94 BasicConv2d x (conv.weight + bn.{weight, bias, running_mean, running_var}) + fc.{weight, bias}
N_KEYS = 94 * 5 + 2
N_PARAMS = 23_850_960  # torchvision inception_v3 without AuxLogits (23,834,568) + 8 more fc classes (8 * 2049)
SAMPLE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _images(seed, n=2, size=24):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def test_parameter_names_and_shapes_are_pytorch_fid_s():
    model = FIDInceptionV3()
    sd = model.state_dict()
    core = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(core) == N_KEYS and len(sd) == N_KEYS + 94
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    for k, shape in SAMPLE_SHAPES.items():
        assert core[k] == shape, k
    per_block = Counter(k.split(".")[0] for k in core if k.endswith(".conv.weight"))
    assert per_block == CONVS_PER_BLOCK
    assert not any(k.startswith("AuxLogits") for k in sd)
    # the TF patches: pooling without the padded zeros; max pooling in the last block only
    assert torch.equal(_avg_pool_tf(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_loads_safetensors_and_weights_only_pth_with_identical_features_and_fid(tmp_path):
    st = save_random_fid_inception(tmp_path / "fid.safetensors", seed=3)
    # pytorch-fid's file may predate BatchNorm's num_batches_tracked: a .pth without them loads too
    sd = load_file(st)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / FID_WEIGHTS_FILE)
    a = _images(0)
    b = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))  # tensors in [0, 1] work too
    fid_st = InceptionFID(st, batch_size=2)
    fid_pth = InceptionFID(tmp_path / FID_WEIGHTS_FILE, batch_size=2)
    fa = fid_st.image_features(a)
    assert fa.shape == (2, 2048) and fa.dtype == torch.float64 and torch.isfinite(fa).all()
    assert torch.equal(fa, fid_pth.image_features(a))
    scale = float(fa.var(0).sum())
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6 * scale)
    d = fid_st.fid(a, b)
    assert np.isfinite(d) and d > 1e-3 * scale

def test_strict_loading_and_missing_weights(tmp_path):
    with pytest.raises(MetricWeightsMissing, match=f"never downloaded.*{FID_WEIGHTS_FILE}"):
        load_fid_inception(tmp_path / "nothing.pth")
    # a file that is not the FID Inception's state dict names what is wrong
    torch.save({"fc.weight": torch.zeros(10, 2048), "head.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing Conv2d_1a_3x3\.bn\.bias.*unexpected head\.weight.*"
                                         r"wrong shape fc\.weight \[10, 2048\] \(want \[1008, 2048\]\)"):
        load_fid_inception(tmp_path / "other.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "notflat.pth")
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_fid_inception(tmp_path / "notflat.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only"):
        load_fid_inception(tmp_path / "garbage.pth")
