"""The validation sample grid of diffusers students: one image per evaluation, written and sent to the trackers.

At each evaluation the trainer keeps the first ``GRID_SAMPLES`` validation trajectories' few-step samples of the
EMA student (the solve that ``val_coupling_error`` measures, from the stored noise and prompt) and the teacher's
stored endpoints of the same trajectories. The student turns both into images (``Student.preview_images``):

- **decoded** ("vae"): through the VAE of the corpus's base pipeline folder (``models.diffusers.vae``);
- **latent channels** ("latent channels"), when that folder has no VAE (e.g. the card names a bare
  transformer folder): each latent channel as a grey image, the value range [-3, 3] mapped to black..white
  (clipped outside; the latents have about unit variance), the C channels side by side.

The grid (``sample_grid``) has one row per validation sample: the teacher's endpoint on the left, the student's
sample on the right, 2 px gaps. Tiles are scaled to a height of at most 256 px (area) and, when tiny, scaled up
by a whole factor to at least 64 px (nearest), so tiny test models stay visible and SD3's 1024 px images stay
cheap (a grid of 8 is 2 x 256 px wide and 8 x 256 px high).

``log_sample_grid`` writes it as ``<out>/logs/samples/step-XXXXXXXX.png`` and logs it to every accelerate
tracker of the run as ``val_samples``: TensorBoard (``writer.add_image``, HWC), Weights & Biases (``wandb.Image``)
and MLflow (``mlflow.log_image`` with key and step). Main process only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

#: validation samples in a grid (the first ones of the split, in shard order)
GRID_SAMPLES = 8
#: the tracker key of the grid
GRID_KEY = "val_samples"
#: latent values mapped to black..white in the latent-channel view
LATENT_RANGE = 3.0


def fit_tile(img_CHW: torch.Tensor, *, max_side: int = 256, min_side: int = 64) -> torch.Tensor:
    """``img`` scaled down (area) to a height of at most ``max_side``, or up by a whole factor (nearest) to a
    height of at least ``min_side``; the aspect ratio kept (a latent-channel strip stays one row high)."""
    h, w = img_CHW.shape[1:]
    if h > max_side:
        s = max_side / h
        return F.interpolate(img_CHW[None], size=(max_side, max(1, round(w * s))), mode="area")[0]
    if h < min_side:
        return F.interpolate(img_CHW[None], scale_factor=math.ceil(min_side / h), mode="nearest")[0]
    return img_CHW


def latent_channel_images(x_BCHW: torch.Tensor, *, pad: int = 1) -> torch.Tensor:
    """Each sample's latent channels as grey tiles side by side: [B, 3, h, C*w + (C-1)*pad] in [0, 1], the
    value range [-LATENT_RANGE, LATENT_RANGE] mapped to [0, 1] (clipped); tiles 64 to 128 px high (64 at most
    for more than 4 channels: SD3's 16 channels of 128 x 128 make a strip about 1040 px wide)."""
    x = ((x_BCHW.float() / LATENT_RANGE + 1) / 2).clamp(0, 1)
    max_side = 128 if x.shape[1] <= 4 else 64
    rows = []
    for sample in x:
        tiles = [fit_tile(ch[None], max_side=max_side) for ch in sample]
        h = tiles[0].shape[1]
        gap = torch.ones(1, h, pad)
        strip = torch.cat([t if i == 0 else torch.cat([gap, t], dim=2) for i, t in enumerate(tiles)], dim=2)
        rows.append(strip.expand(3, -1, -1))
    return torch.stack(rows)


def sample_grid(reference_B3HW: torch.Tensor, student_B3HW: torch.Tensor, *, pad: int = 2) -> np.ndarray:
    """One row per sample, [reference | student], as an HWC uint8 array (white gaps of ``pad`` px)."""
    if reference_B3HW.shape != student_B3HW.shape:
        raise ValueError(f"reference {tuple(reference_B3HW.shape)} and student {tuple(student_B3HW.shape)} differ")
    tiles = [(fit_tile(r.float()), fit_tile(s.float())) for r, s in zip(reference_B3HW, student_B3HW)]
    h, w = tiles[0][0].shape[1:]
    grid = torch.ones(3, len(tiles) * (h + pad) + pad, 2 * (w + pad) + pad)
    for i, (r, s) in enumerate(tiles):
        y = pad + i * (h + pad)
        grid[:, y:y + h, pad:pad + w] = r
        grid[:, y:y + h, 2 * pad + w:2 * pad + 2 * w] = s
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def encode_png(grid_HWC: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grid_HWC).save(buf, format="PNG")
    return buf.getvalue()


def sample_png_path(step: int) -> str:
    """The grid's path relative to the run's --out."""
    return f"logs/samples/step-{int(step):08d}.png"


def log_to_trackers(trackers: Iterable, grid_HWC: np.ndarray, step: int, caption: str) -> None:
    """``grid`` as ``val_samples`` at ``step`` in each accelerate tracker that takes images."""
    for tracker in trackers:
        name = getattr(tracker, "name", "")
        if name == "tensorboard":
            tracker.writer.add_image(GRID_KEY, grid_HWC, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif name == "wandb":
            import wandb

            tracker.log({GRID_KEY: wandb.Image(grid_HWC, caption=caption)}, step=step)
        elif name == "mlflow":
            import mlflow

            mlflow.log_image(grid_HWC, key=GRID_KEY, step=step)
