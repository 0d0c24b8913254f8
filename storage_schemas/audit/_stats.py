"""Statistics that help choose a training recipe, accumulated shard by shard in bounded memory.

- straightness per window of every stage in the card: how far the intermediate saved states of a
  window stray from the straight segment between its endpoints (relative to the segment's length),
  and the path-length ratio (1 = straight);
- norms per sigma: the RMS of each saved state (per element) at each saved sigma;
- shard sizes, samples per shard, conditions (class or prompt histogram), guidance.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch

DEV_EDGES = np.concatenate([[0.0], np.logspace(-6, 1, 561), [np.inf]])
"""Histogram bins of relative deviations (log-spaced 1e-6..10, 80 per decade, ~3% wide): quantiles in
bounded memory."""
GUIDANCE_KEEP = 1_000_000
MAX_DISTINCT_CONDITIONS = 100_000
"""Distinct condition keys tracked; beyond that they are counted as "(other)" (bounded memory)."""


def _quantile_from_hist(counts: np.ndarray, q: float) -> float | None:
    total = int(counts.sum())
    if total == 0:
        return None
    target = q * total
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    hi = DEV_EDGES[i + 1]
    return float(hi if math.isfinite(hi) else DEV_EDGES[i])


def window_plan(num_saved: int, stages: tuple[int, ...] | None) -> list[tuple[int, int, int, int]]:
    """(stage windows W, window j, start state a, end state b) for every window of every stage."""
    intervals = num_saved - 1
    if stages:
        ladder = [w for w in stages if w >= 1 and intervals % w == 0]
    else:
        ladder = sorted({intervals, 1}, reverse=True)
    out = []
    for w in ladder:
        step = intervals // w
        out.extend((w, j, j * step, (j + 1) * step) for j in range(w))
    return out


class TrajectoryStats:
    """Norms per saved sigma and per-window straightness, mergeable across shards."""

    def __init__(self, saved_sigmas: tuple[float, ...], stages: tuple[int, ...] | None) -> None:
        self.sigmas = tuple(float(s) for s in saved_sigmas)
        k = len(self.sigmas)
        self.windows = window_plan(k, stages)
        self.count = 0
        self.norm_sum = np.zeros(k)
        self.norm_sumsq = np.zeros(k)
        self.norm_min = np.full(k, np.inf)
        self.norm_max = np.full(k, -np.inf)
        nw = len(self.windows)
        self.dev_sum = np.zeros(nw)
        self.dev_max = np.zeros(nw)
        self.dev_hist = np.zeros((nw, len(DEV_EDGES) - 1), dtype=np.int64)
        self.ratio_sum = np.zeros(nw)
        self._t = torch.tensor(self.sigmas, dtype=torch.float64)

    def add(self, states: torch.Tensor) -> None:
        """One sample's states [K, *sample_shape] (any float dtype, finite)."""
        x = states.detach().to("cpu", torch.float64).reshape(states.shape[0], -1)
        if x.shape[0] != len(self.sigmas):
            return
        rms = x.pow(2).mean(dim=1).sqrt().numpy()
        self.count += 1
        self.norm_sum += rms
        self.norm_sumsq += rms * rms
        np.minimum(self.norm_min, rms, out=self.norm_min)
        np.maximum(self.norm_max, rms, out=self.norm_max)
        steps = (x[1:] - x[:-1]).norm(dim=1)  # [K-1]
        for i, (_w, _j, a, b) in enumerate(self.windows):
            chord = x[b] - x[a]
            length = float(chord.norm())
            if length <= 0.0:
                continue
            self.ratio_sum[i] += float(steps[a:b].sum()) / length
            if b - a < 2:
                continue
            t = (self._t[a + 1 : b] - self._t[a]) / (self._t[b] - self._t[a])  # [m]
            line = x[a] + t[:, None] * chord  # [m, D]
            dev = float((x[a + 1 : b] - line).norm(dim=1).max()) / length
            self.dev_sum[i] += dev
            self.dev_max[i] = max(self.dev_max[i], dev)
            self.dev_hist[i, int(np.searchsorted(DEV_EDGES, dev, side="right")) - 1] += 1

    def merge(self, other: TrajectoryStats) -> None:
        self.count += other.count
        self.norm_sum += other.norm_sum
        self.norm_sumsq += other.norm_sumsq
        np.minimum(self.norm_min, other.norm_min, out=self.norm_min)
        np.maximum(self.norm_max, other.norm_max, out=self.norm_max)
        self.dev_sum += other.dev_sum
        np.maximum(self.dev_max, other.dev_max, out=self.dev_max)
        self.dev_hist += other.dev_hist
        self.ratio_sum += other.ratio_sum

    def norms(self) -> list[dict[str, Any]]:
        if not self.count:
            return []
        n = self.count
        mean = self.norm_sum / n
        std = np.sqrt(np.maximum(self.norm_sumsq / n - mean * mean, 0.0))
        return [
            {"sigma": s, "mean": float(mean[k]), "std": float(std[k]), "min": float(self.norm_min[k]),
             "max": float(self.norm_max[k])}
            for k, s in enumerate(self.sigmas)
        ]

    def straightness(self) -> list[dict[str, Any]]:
        stages: dict[int, list[dict[str, Any]]] = {}
        for i, (w, j, a, b) in enumerate(self.windows):
            n = self.count
            inner = b - a - 1
            row: dict[str, Any] = {
                "window": j,
                "sigma_start": self.sigmas[a],
                "sigma_end": self.sigmas[b],
                "intermediate_states": inner,
                "length_ratio_mean": float(self.ratio_sum[i] / n) if n else None,
            }
            if inner > 0 and n:
                row.update(deviation_mean=float(self.dev_sum[i] / n),
                           deviation_p50=min(_quantile_from_hist(self.dev_hist[i], 0.5) or 0.0, float(self.dev_max[i])),
                           deviation_p95=min(_quantile_from_hist(self.dev_hist[i], 0.95) or 0.0, float(self.dev_max[i])),
                           deviation_max=float(self.dev_max[i]))
            else:
                row.update(deviation_mean=None, deviation_p50=None, deviation_p95=None, deviation_max=None)
            stages.setdefault(w, []).append(row)
        return [{"windows": w, "per_window": rows} for w, rows in stages.items()]


class ConditionStats:
    """Condition histogram (class ids, prompt ids, or none) and guidance scales."""

    def __init__(self) -> None:
        self.classes: Counter[str] = Counter()
        self.guidance_count = 0
        self.guidance_sum = 0.0
        self.guidance_min = math.inf
        self.guidance_max = -math.inf
        self.guidance_values: list[float] = []

    def _count(self, key: str) -> None:
        if key in self.classes or len(self.classes) < MAX_DISTINCT_CONDITIONS:
            self.classes[key] += 1
        else:
            self.classes["(other)"] += 1

    def add(self, meta: dict[str, Any]) -> None:
        if "class_id" in meta and isinstance(meta["class_id"], int) and not isinstance(meta["class_id"], bool):
            self._count(str(meta["class_id"]))
        elif "prompt_id" in meta and isinstance(meta["prompt_id"], int | str) and not isinstance(meta["prompt_id"], bool):
            self._count(f"prompt:{meta['prompt_id']}")
        elif "prompt" in meta and isinstance(meta["prompt"], str):
            self._count(f"prompt:{meta['prompt'][:40]}")
        else:
            self._count("(none)")
        g = meta.get("guidance")
        if isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g):
            g = float(g)
            self.guidance_count += 1
            self.guidance_sum += g
            self.guidance_min = min(self.guidance_min, g)
            self.guidance_max = max(self.guidance_max, g)
            if len(self.guidance_values) < GUIDANCE_KEEP:
                self.guidance_values.append(g)

    def merge(self, other: ConditionStats) -> None:
        for key, n in other.classes.items():
            if key in self.classes or len(self.classes) < MAX_DISTINCT_CONDITIONS:
                self.classes[key] += n
            else:
                self.classes["(other)"] += n
        self.guidance_count += other.guidance_count
        self.guidance_sum += other.guidance_sum
        self.guidance_min = min(self.guidance_min, other.guidance_min)
        self.guidance_max = max(self.guidance_max, other.guidance_max)
        room = GUIDANCE_KEEP - len(self.guidance_values)
        if room > 0:
            self.guidance_values.extend(other.guidance_values[:room])

    def to_dict(self, kind: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        def order(item):
            k = item[0]
            return (0, int(k), "") if k.isdigit() else (1, 0, k)

        items = sorted(self.classes.items(), key=order)
        limit = 200
        conditions = {
            "kind": kind,
            "histogram": dict(items[:limit]),
            "distinct": len(items),
            "truncated": len(items) > limit,
        }
        if self.guidance_count:
            values = np.asarray(self.guidance_values)
            lo, hi = self.guidance_min, self.guidance_max
            counts, edges = np.histogram(values, bins=20 if hi > lo else 1, range=(lo, hi if hi > lo else lo + 1e-9))
            guidance = {"count": self.guidance_count, "min": lo, "max": hi, "mean": self.guidance_sum / self.guidance_count,
                        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
        else:
            guidance = {"count": 0}
        return conditions, guidance


def shard_size_stats(sizes: list[int], samples: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"count": 0}
    arr = np.asarray(sizes, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:  # all shards the same size: one bar, +-5% around it
        lo, hi = lo - max(1.0, 0.05 * lo), hi + max(1.0, 0.05 * hi)
    counts, edges = np.histogram(arr, bins=min(20, max(1, len(set(sizes)))), range=(lo, hi))
    return {
        "count": len(sizes),
        "bytes_total": int(arr.sum()),
        "bytes_min": int(arr.min()),
        "bytes_p50": float(np.median(arr)),
        "bytes_mean": float(arr.mean()),
        "bytes_max": int(arr.max()),
        "samples_min": int(min(samples)) if samples else None,
        "samples_max": int(max(samples)) if samples else None,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
