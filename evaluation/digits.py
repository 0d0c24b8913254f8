"""Few-step evaluation on the digits testbed (``digits:8x8``, ``models.digits``).

The testbed's data distribution is only known through its 1,797 real images, so its metrics are:

* **coupling error**: RMS distance per element between a sampler's endpoint and the teacher's
  256-step Heun endpoint from the same noise and class (``flowcore.metrics.coupling_error``), in the
  teacher's own space (the whitened code, as SD students are compared in latents);
* **Frechet distance** (FD) between the decoded samples and all 1,797 real images, in the penultimate-layer
  feature space of a small classifier trained on the same images (``DigitsClassifier``: an MLP,
  fixed seed, 80/20 train/held-out split, cached under ``$TRAJFLOW_CACHE/pretrained``; its held-out
  accuracy is in every report);
* **class accuracy**: the fraction of samples that classifier assigns to the class they were asked for;
* a **PNG grid** of samples per sampler (``write_sample_grid``; matplotlib).

``evaluate_digits`` reports the teacher at the same step counts as the student on both grids
(diffusers' default FlowMatchEuler grid and the corrected ``few_step_sigmas``), plus 32 steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.gmm import EVAL_SEED_BASE, student_velocity_fn
from evaluation.image_metrics import frechet_distance
from flowcore.metrics import coupling_error
from flowcore.schedules import few_step_sigmas, shifted_sigmas
from flowcore.solvers import seeded_noise, solve, solve_teacher
from models.diffusers.schedulers import diffusers_default_sigmas
from models.digits import NUM_CLASSES, cache_root, digits_data, read_cache_entry, write_cache_entry

__all__ = ["DigitsClassifier", "digits_classifier", "evaluate_digits", "write_sample_grid", "GRID_PER_CLASS"]

CLASSIFIER_SEED = 0
CLASSIFIER_STEPS = 1500
HELD_OUT_FRACTION = 0.2
GRID_PER_CLASS = 2
_META = "trajflow_digits_classifier"
log = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    """64 -> 256 -> 128 (features) -> 10; ``features`` is the Frechet distance's feature space."""

    def __init__(self, width: int = 256, feat: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Dropout(0.1),
                                  nn.Linear(width, feat), nn.SiLU())
        self.head = nn.Linear(feat, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float().reshape(-1, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(CLASSIFIER_SEED))
    k = int(round(n * HELD_OUT_FRACTION))
    return perm[k:], perm[:k]


def _train_classifier() -> tuple[DigitsClassifier, float]:
    x, y = digits_data()
    tr, te = _split(len(y))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(CLASSIFIER_SEED)
        g = torch.Generator().manual_seed(CLASSIFIER_SEED)
        net = DigitsClassifier()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        net.train()
        for _ in range(CLASSIFIER_STEPS):
            idx = tr[torch.randint(len(tr), (128,), generator=g)]
            # light Gaussian jitter: samples are continuous, the real images are 17-level quantised
            xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(x[te]).argmax(1) == y[te]).double().mean())
    finally:
        torch.set_num_threads(threads)
    return net, acc


def digits_classifier() -> tuple[DigitsClassifier, dict[str, Any]]:
    """The evaluation classifier (trained once with a fixed seed, cached) and its info (held-out accuracy)."""
    key = hashlib.sha256(json.dumps({"seed": CLASSIFIER_SEED, "steps": CLASSIFIER_STEPS, "held_out": HELD_OUT_FRACTION,
                                     "arch": "mlp-256-128"}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "pretrained" / f"digits8x8-classifier-{key}.safetensors"
    net = DigitsClassifier()
    # used only when its digest matches (models.digits.read_cache_entry): a changed, forged or pre-digest entry,
    # or one that is not a regular file, is trained again and rewritten (a warning names it)
    entry = read_cache_entry(path)
    if entry is not None:
        tensors, meta = entry
        try:
            info = json.loads(meta[_META])
            if not isinstance(info, dict):
                raise ValueError("its info is not a JSON object")
            net.load_state_dict(tensors)
            return net.eval(), info
        except (KeyError, ValueError, RuntimeError) as exc:
            log.warning("cache entry %s cannot be used (%s): training the classifier again", path,
                        " ".join(str(exc).split())[:200])
    trained, acc = _train_classifier()
    te = _split(len(digits_data()[1]))[1]
    info = {"held_out_accuracy": acc, "held_out_images": int(len(te)), "train_images": int(1797 - len(te)),
            "seed": CLASSIFIER_SEED, "steps": CLASSIFIER_STEPS, "arch": "MLP 64-256-128-10", "features": 128}
    write_cache_entry(path, trained.state_dict(), {_META: json.dumps(info)})
    net.load_state_dict(trained.state_dict())
    return net.eval(), info


class _Scorer:
    def __init__(self):
        self.net, self.info = digits_classifier()
        x, _ = digits_data()
        self.real_feats = self.features(x)

    @torch.no_grad()
    def features(self, x):
        return torch.cat([self.net.features(c) for c in x.float().split(1024)])

    @torch.no_grad()
    def quality(self, x, ref, cls, decode) -> dict[str, float]:
        feats = self.features(decode(x.float()))
        pred = self.net.head(feats).argmax(1)
        return {"coupling_error": coupling_error(x.double(), ref.double()),
                "frechet_distance": frechet_distance(feats, self.real_feats),
                "class_accuracy": float((pred == cls).double().mean())}


def write_sample_grid(rows: list[tuple[str, torch.Tensor]], path: str | os.PathLike, title: str | None = None) -> str:
    """One row of images per (label, samples [N, 1, 8, 8] in [-1, 1]) -> a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(int(x.shape[0]) for _, x in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.55 * cols + 2.6, 0.62 * len(rows) + 0.4), squeeze=False)
    for r, (label, x) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < x.shape[0]:
                ax.imshow(x[c].reshape(8, 8).float().clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=min(0.5, 1.9 / (0.55 * cols + 2.6)), right=0.995, bottom=0.01,
                        top=0.99 if not title else 0.93, wspace=0.05, hspace=0.08)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return str(path)


#: the teachers' reference endpoints by (fingerprint, samples, steps, shift, guidance): a comparison evaluates
#: many students against the same reference, which costs more than all their few-step solves together
_REFERENCES: dict[tuple, torch.Tensor] = {}


def _reference(teacher, noise, cls, g, reference_steps: int, shift: float) -> torch.Tensor:
    """The teacher's ``reference_steps`` Heun endpoint from ``noise`` (cached in this process, 4 entries)."""
    key = (teacher.fingerprint(), tuple(noise.shape), int(reference_steps), float(shift), float(g[0]))
    if key not in _REFERENCES:
        if len(_REFERENCES) >= 4:
            _REFERENCES.pop(next(iter(_REFERENCES)))
        _REFERENCES[key] = solve_teacher(teacher, noise, shifted_sigmas(reference_steps, shift), cond=cls,
                                         guidance=g, method="heun", capture_sigmas=[0.0]).final
    return _REFERENCES[key].clone()


def evaluate_digits(student, teacher, *, shift: float, guidance: float, steps=(1, 2, 4), num_samples: int = 1000,
                    reference_steps: int = 256, teacher_steps=None, default_grid_steps=None,
                    keep_samples: bool = True) -> dict[str, Any]:
    """Metrics of a student FlowNet (or None: teacher only) on the digits testbed.

    The teacher is reported at ``teacher_steps`` (default: ``steps`` and 32) on the corrected grid and at
    ``default_grid_steps`` (default: ``steps``) on diffusers' default grid. With ``keep_samples`` the report's
    ``grid_samples`` maps a sampler's label to its first ``GRID_PER_CLASS`` samples of every class (for
    ``write_sample_grid``; not JSON: pop it before printing).
    """
    steps = tuple(int(s) for s in steps)
    teacher_steps = tuple(teacher_steps) if teacher_steps is not None else (*steps, 32)
    default_grid_steps = tuple(default_grid_steps) if default_grid_steps is not None else steps
    if reference_steps % math.lcm(*steps) != 0:
        raise ValueError(f"reference_steps {reference_steps} must be a multiple of every evaluated step count")
    scorer = _Scorer()
    decode = teacher.decode  # the teacher's code -> pixels (coupling error is measured in the code)
    shape = tuple(teacher.sample_shape)
    noise = seeded_noise([EVAL_SEED_BASE + i for i in range(num_samples)], shape, torch.float32)
    cls = torch.arange(num_samples) % NUM_CLASSES
    g = torch.full((num_samples,), float(guidance))
    ref = _reference(teacher, noise, cls, g, reference_steps, shift)
    n_grid = GRID_PER_CLASS * NUM_CLASSES
    order = torch.argsort(cls[:n_grid], stable=True)  # the grid's columns: class 0, 0, 1, 1, ...
    grid: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"testbed": "digits:8x8", "num_samples": num_samples, "shift": shift,
                              "guidance": guidance, "reference": f"teacher Heun {reference_steps} steps",
                              "classifier": scorer.info, "teacher": {}, "student": {}}
    report["reference_quality"] = {k: v for k, v in scorer.quality(ref, ref, cls, decode).items() if k != "coupling_error"}
    grid["real images"] = teacher.sample(n_grid, torch.Generator().manual_seed(1), cls[:n_grid])[0][order]
    grid[f"teacher {reference_steps} Heun"] = ref[:n_grid][order]

    def teacher_run(sigmas):
        return solve_teacher(teacher, noise, sigmas, cond=cls, guidance=g, capture_sigmas=[sigmas[-1]]).final

    for n in teacher_steps:
        x = teacher_run(few_step_sigmas(n, shift))
        report["teacher"][f"{n}_steps"] = scorer.quality(x, ref, cls, decode)
        grid[f"teacher {n} (corrected)"] = x[:n_grid][order]
    for n in default_grid_steps:
        x = teacher_run([float(s) for s in diffusers_default_sigmas(n, shift)])
        report["teacher"][f"{n}_steps_diffusers_default_grid"] = scorer.quality(x, ref, cls, decode)
        grid[f"teacher {n} (diffusers grid)"] = x[:n_grid][order]
    if student is not None:
        student = student.float().eval()
        vfn = student_velocity_fn(student, cls, g if student.cfg.guidance_cond else None)
        for n in steps:
            x = solve(vfn, noise, few_step_sigmas(n, shift), capture_sigmas=[0.0]).final
            report["student"][f"{n}_steps"] = scorer.quality(x, ref, cls, decode)
            grid[f"student {n}"] = x[:n_grid][order]
    if keep_samples:
        report["grid_samples"] = {k: decode(v.float()) for k, v in grid.items()}
    return report
