"""Sample-quality metrics with known answers (pure tensor functions).

* coupling error — RMS distance between a sampler's endpoint and a reference endpoint from the
  *same* noise (how well a few-step sampler reproduces the teacher's ODE map);
* sliced Wasserstein distance — between two sample sets, averaged over random 1-D projections;
* one-jump error per window — RMS distance after one student step across a window, started from
  the teacher's own state at the window start, against the teacher's state at the window end.
"""

from __future__ import annotations

import torch


def coupling_error(x_BX: torch.Tensor, ref_BX: torch.Tensor) -> float:
    """sqrt(mean_b ||x_b - ref_b||^2 / D): per-dimension RMS distance of paired samples."""
    d = (x_BX.double() - ref_BX.double()).flatten(1)
    return float(torch.sqrt((d**2).mean()))


def sliced_wasserstein(a_NX: torch.Tensor, b_MX: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 distance between two sample sets (equal sizes: sorted matching; else quantiles)."""
    a = a_NX.double().flatten(1)
    b = b_MX.double().flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        q = torch.linspace(0, 1, min(pa.shape[0], pb.shape[0]), dtype=torch.float64)
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return float(torch.sqrt(((pa - pb) ** 2).mean()))
