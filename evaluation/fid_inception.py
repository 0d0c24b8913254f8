"""Standard FID: the TF-Inception-v3 network of the FID reference implementation, as plain torch modules.

FID (Heusel et al. 2017) compares the Gaussians fitted to the 2048-d pool3 features of TensorFlow's
2015-12-05 Inception-v3 graph. pytorch-fid (github.com/mseitzer/pytorch-fid, ``src/pytorch_fid/inception.py``)
ported those weights to PyTorch as ``pt_inception-2015-12-05-6726825d.pth`` (its GitHub release
``fid_weights``) and runs them in torchvision's ``Inception3`` (``torchvision/models/inception.py``) with
``num_classes=1008, aux_logits=False`` and four patched block kinds:

- ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the pooling branch averages without the
  zero padding (``count_include_pad=False``, as TensorFlow's average pool does);
- ``FIDInceptionE_2`` (``Mixed_7c``): the pooling branch is a 3x3 *max* pool (a quirk of the TF graph).

The input (RGB in [0, 1]) is resized to 299x299 bilinearly (``align_corners=False``, no antialiasing) and
mapped to [-1, 1]; the features are the global average pool after ``Mixed_7c``.

This module re-states that architecture without importing torchvision: the PyPI torchvision wheel does
not import beside the CPU torch wheel this project pins ("operator torchvision::nms does not exist"), so
pytorch-fid, torch-fidelity and torchmetrics' FID cannot be dependencies. Parameter names equal
torchvision's ``Inception3`` names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``,
``fc.weight``, ...), so pytorch-fid's released file loads as is — strictly: a missing, unexpected or
mis-shaped tensor is an error naming it. (BatchNorm's ``num_batches_tracked`` counters are optional in
the file: evaluation never reads them.)

Weights come from a LOCAL path only (``load_fid_inception``), never downloaded: the ``.pth`` is read with
``torch.load(weights_only=True)``; a ``.safetensors`` file holding the same state dict works too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.image_metrics import MetricWeightsMissing, frechet_distance

__all__ = ["FIDInceptionV3", "InceptionFID", "load_fid_inception", "save_random_fid_inception", "FID_WEIGHTS_FILE",
           "FID_FEATURE_DIM"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_FEATURE_DIM = 2048
_NBT = "num_batches_tracked"


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | TF avg pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (``Mixed_6a``): stride-2 3x3 | 1x1 -> 3x3 -> stride-2 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions and the TF average pool."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (``Mixed_7a``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool="avg"`` is FIDInceptionE_1 (``Mixed_7b``, TF average
    pool), ``pool="max"`` is FIDInceptionE_2 (``Mixed_7c``, 3x3 max pool, stride 1, padding 1)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (module docstring). ``forward(x)``: RGB [N, 3, H, W] in [0, 1] -> [N, 2048]
    pool3 features. ``fc`` (1008 TF classes) is kept only so the released state dict loads strictly."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W] in [0, 1], got {tuple(x.shape)}")
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle needing more than weights_only allows
        raise ValueError(f"cannot read FID Inception weights {path!r} with torch.load(weights_only=True): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"FID Inception weights {path!r} are not a flat state dict of tensors "
                         f"(expected pytorch-fid's {FID_WEIGHTS_FILE})")
    return sd


def _check_keys(sd: dict, model: nn.Module, path: str) -> None:
    want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith(_NBT)}
    have = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(_NBT)}
    extra_nbt = [k for k in sd if k.endswith(_NBT) and k not in model.state_dict()]
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want)) + sorted(extra_nbt)
    wrong = sorted(k for k in set(want) & set(have) if tuple(want[k]) != have[k])
    if missing or unexpected or wrong:
        def few(keys, fmt=str):
            return ", ".join(fmt(k) for k in keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")

        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        if wrong:
            parts.append("wrong shape " + few(wrong, lambda k: f"{k} {list(have[k])} (want {list(want[k])})"))
        raise ValueError(f"{path!r} is not the FID Inception-v3 state dict (pytorch-fid's {FID_WEIGHTS_FILE}): "
                         + "; ".join(parts))


def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """``FIDInceptionV3`` with the weights at a LOCAL ``.pth`` / ``.safetensors`` path, in eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricWeightsMissing(
            f"FID Inception weights not found at {path!r}: evaluation models are never downloaded; save "
            f"pytorch-fid's {FID_WEIGHTS_FILE} (github.com/mseitzer/pytorch-fid, release 'fid_weights') there, "
            "or a .safetensors of the same state dict")
    sd = _read_state_dict(path)
    model = FIDInceptionV3()
    _check_keys(sd, model, path)
    model.load_state_dict(sd, strict=False)  # only num_batches_tracked may be absent (checked above)
    return model.to(device).eval()


def save_random_fid_inception(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a RANDOM-weight FID Inception-v3 state dict: a stand-in for pytorch-fid's weights in tests and
    docs (its numbers mean nothing). Full size (24M parameters, ~95 MB), as the key set must be the real
    one. A ``.safetensors`` path is written with safetensors, anything else with ``torch.save`` of the
    plain state dict (loadable with ``weights_only=True``). Convolutions get He-normal weights, so the
    features keep their scale through the 94 conv layers (PyTorch's default init shrinks them to ~1e-8).
    Deterministic in ``seed``; the global RNG is untouched."""
    path = os.fspath(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FIDInceptionV3()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


class InceptionFID:
    """Pool3 features and FID of image sets with the FID Inception-v3 from a LOCAL weights file."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 32):
        self.model = load_fid_inception(path, device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.path = os.fspath(path)

    @staticmethod
    def _to_tensor(img) -> torch.Tensor:
        """PIL image -> [3, H, W] float in [0, 1] (pytorch-fid reads images as RGB with ToTensor)."""
        import numpy as np

        a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1)

    @torch.no_grad()
    def _run(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        # resize one by one, so a batch may mix sizes (bilinear resizing is per image anyway)
        x = torch.cat([F.interpolate(t[None].to(self.device), size=(299, 299), mode="bilinear",
                                     align_corners=False) for t in chunk])
        return self.model(x).double().cpu()

    def image_features(self, images: Iterable) -> torch.Tensor:
        """[N, 2048] float64 pool3 features of PIL images (any sizes, any iterable: streamed in batches)
        or of a float tensor [N, 3, H, W] in [0, 1]."""
        if isinstance(images, torch.Tensor):
            images = list(images.float())
        out, chunk = [], []
        for img in images:
            chunk.append(img if isinstance(img, torch.Tensor) else self._to_tensor(img))
            if len(chunk) == self.batch_size:
                out.append(self._run(chunk))
                chunk = []
        if chunk:
            out.append(self._run(chunk))
        if not out:
            raise ValueError("no images")
        return torch.cat(out)

    def fid(self, images_a, images_b) -> float:
        """FID between two image sets (each at least 2 images; reliable only with thousands)."""
        return frechet_distance(self.image_features(images_a), self.image_features(images_b))
