"""Small flow nets: the "pretrained teacher" whose weights initialise students.

Two architectures, both predicting the velocity v = eps - x0 at (x_sigma, sigma, class):
  * ``mlp``  — residual MLP for vector samples (e.g. ring2d, sample shape (2,));
  * ``conv`` — small residual conv net for image-latent-like samples (e.g. latent10, 4x8x8).
Both take a sinusoidal embedding of sigma with frequencies up to ~1000 (so nearby window
boundaries get distinct embeddings: see the pitfall in ARCHITECTURE.md) and a class embedding with
one extra "null" row (index ``num_classes``, used for classifier-free guidance and cond dropout).

``fit_flow_net`` fits a net by plain flow matching on a data sampler; ``save_flow_net`` /
``load_flow_net`` store weights + JSON config in one safetensors file (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from flowcore.guidance import cfg_velocity
from flowcore.teacher import as_guidance_batch, as_sigma_batch, fingerprint_of
from flowcore.tensors import expand_like
from models.gmm import GMMSpec, GMMTeacher

ARCHS = ("mlp", "conv")
#: what a net with a GMM base learns on top of the exact velocity (FlowNetConfig.residual)
RESIDUALS = ("solver", "net")
#: knots of the "solver" residual's sigma table (sigma = i / (SOLVER_KNOTS - 1)); every point of the 1, 2, 4,
#: 8, 16, 32 and 64-step grids at shift 1 is a knot, other sigmas interpolate linearly between two
SOLVER_KNOTS = 65
#: the solver table's parameters are multiplied by this in the forward, so that the trainer's learning rate
#: (2e-4 by default, sized for networks) moves these few O(0.1) numbers at a useful pace (Adam's step scales
#: with it: an effective 1e-2)
SOLVER_PARAM_SCALE = 50.0
META_KEY = "trajflow_flownet_config"


@dataclass
class FlowNetConfig:
    """Architecture of a small flow net."""

    #: "mlp" (vector samples) or "conv" (C x H x W samples)
    arch: str
    #: one sample's shape, e.g. (2,) or (4, 8, 8)
    sample_shape: tuple[int, ...]
    #: number of classes (None: unconditional)
    num_classes: int | None = None
    #: hidden width (mlp) or channels (conv)
    width: int = 256
    #: residual blocks
    depth: int = 3
    #: sinusoidal frequencies of the sigma embedding
    time_freqs: int = 32
    #: also condition on the CFG weight (students distilled from corpora with a guidance range);
    #: the guidance embedding starts at zero, so a teacher's weights load into such a student unchanged
    guidance_cond: bool = False
    #: a GMM spec (``GMMSpec.to_json_dict()``) whose exact velocity the net adds its own output to: the
    #: student of an analytic GMM teacher starts *as* the teacher (its residual's output layer starts at
    #: zero), as a diffusers student starts from the teacher's weights. None: a plain net.
    base_gmm: dict[str, Any] | None = None
    #: the CFG weight of ``base_gmm`` when the net is not guidance-conditioned (a corpus with one fixed weight)
    base_guidance: float = 1.0
    #: what is learned on top of ``base_gmm``: "solver" (default) — per-sigma scale, time shift and x
    #: coefficient of the exact velocity, v = (1 + a(s)) v_gmm(x, s + tau(s)) + b(s) x, three numbers per
    #: knot of a 65-knot sigma table, all zero at init (a learned few-step solver in the manner of bespoke
    #: solvers, Shaul et al. 2023: it cannot over-fit a corpus, and costs one velocity call per step like the
    #: teacher); "net" — the flow-net residual (width, depth, ... above), whose output layer starts at zero
    residual: str = "solver"

    def __post_init__(self):
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        if self.base_gmm is not None:
            spec = GMMSpec.from_json_dict(self.base_gmm)  # validates it
            if tuple(spec.sample_shape) != self.sample_shape:
                raise ValueError(f"base_gmm has sample shape {tuple(spec.sample_shape)}, the net {self.sample_shape}")
            if (spec.num_classes or None) != self.num_classes:
                raise ValueError(f"base_gmm has {spec.num_classes} classes, the net {self.num_classes}")
        self.base_guidance = float(self.base_guidance)
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "conv" and len(self.sample_shape) != 3:
            raise ValueError(f"conv flow nets need a C x H x W sample shape, got {self.sample_shape}")
        if self.width < 1 or self.depth < 1 or self.time_freqs < 1:
            raise ValueError("width, depth and time_freqs must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("num_classes must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON data; a plain net (no ``base_gmm``) has exactly the fields it had before
        ``base_gmm`` existed, so the fingerprints and cache keys of plain nets are unchanged."""
        d = asdict(self)
        if d["base_gmm"] is None:
            del d["base_gmm"], d["base_guidance"], d["residual"]
        return d


def sigma_embedding(sigma_B: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[B] sigma -> [B, 2 * num_freqs] sinusoidal features of 1000 * sigma."""
    half = torch.exp(-math.log(1000.0) * torch.arange(num_freqs, device=sigma_B.device) / max(num_freqs - 1, 1))
    dtype = sigma_B.dtype if sigma_B.dtype.is_floating_point else torch.float32
    ang = 1000.0 * sigma_B.to(dtype)[:, None] * half.to(dtype)[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class _Cond(nn.Module):
    """Embedding of (sigma, class) -> [B, width]."""

    def __init__(self, cfg: FlowNetConfig, width: int):
        super().__init__()
        self.cfg = cfg
        self.time = nn.Sequential(nn.Linear(2 * cfg.time_freqs, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None
        self.guidance = None
        if cfg.guidance_cond:
            self.guidance = nn.Sequential(nn.Linear(2 * 8, width), nn.SiLU(), nn.Linear(width, width))
            nn.init.zeros_(self.guidance[2].weight)
            nn.init.zeros_(self.guidance[2].bias)

    def forward(self, sigma_B, class_B, guidance_B=None):
        e = self.time(sigma_embedding(sigma_B, self.cfg.time_freqs))
        if self.guidance is not None:
            g = torch.ones_like(sigma_B) if guidance_B is None else guidance_B.to(sigma_B.dtype)
            e = e + self.guidance(sigma_embedding(g / 1000.0 * 50.0, 8))
        if self.label is not None:
            idx = torch.full_like(sigma_B, self.cfg.num_classes, dtype=torch.long) if class_B is None else class_B.long()
            idx = torch.where(idx < 0, torch.full_like(idx, self.cfg.num_classes), idx)
            e = e + self.label(idx)
        return e


class _MLPBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(width, 2 * width)
        self.ff = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h, e):
        scale, shift = self.film(e).chunk(2, dim=1)
        return h + self.ff(self.norm(h) * (1 + scale) + shift)


class _ConvBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(ch, 2 * ch)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h, e):
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        r = self.conv1(nn.functional.silu(self.norm1(h)))
        r = self.norm2(r) * (1 + scale) + shift
        return h + self.conv2(nn.functional.silu(r))


class FlowNet(nn.Module):
    """v_theta(x [B, *sample_shape], sigma [B], class [B] long | None) -> [B, *sample_shape].

    With ``cfg.base_gmm`` the output is v_gmm(x, sigma, class, w) + net(x, ...): the exact velocity of the
    mixture (CFG weight ``guidance_B`` when guidance-conditioned, else ``cfg.base_guidance``) plus a
    residual whose output layer starts at zero, so the untrained net *is* the teacher.
    """

    def __init__(self, cfg: FlowNetConfig):
        super().__init__()
        self.cfg = cfg
        self._base = None  # the GMM of base_gmm, built on the first forward's device
        if cfg.base_gmm is not None and cfg.residual == "solver":
            # (scale a, time shift tau, x coefficient b) per sigma knot; zero: the exact teacher velocity
            self.solver = nn.Parameter(torch.zeros(SOLVER_KNOTS, 3))
            return
        w = cfg.width
        self.cond = _Cond(cfg, w)
        if cfg.arch == "mlp":
            d = math.prod(cfg.sample_shape)
            self.inp = nn.Linear(d, w)
            self.blocks = nn.ModuleList(_MLPBlock(w) for _ in range(cfg.depth))
            self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d))
        else:
            c = cfg.sample_shape[0]
            self.inp = nn.Conv2d(c, w, 3, padding=1)
            self.blocks = nn.ModuleList(_ConvBlock(w) for _ in range(cfg.depth))
            self.out = nn.Sequential(nn.GroupNorm(min(8, w), w), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1))
        if cfg.base_gmm is not None:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, sigma_B, class_B=None, guidance_B=None):
        if self.cfg.base_gmm is not None and self.cfg.residual == "solver":
            return self._solver_forward(x, sigma_B, class_B, guidance_B)
        B = x.shape[0]
        e = self.cond(sigma_B.to(x.dtype), class_B, guidance_B)
        h = self.inp(x.reshape(B, -1) if self.cfg.arch == "mlp" else x)
        for blk in self.blocks:
            h = blk(h, e)
        out = self.out(h).reshape(x.shape)
        if self.cfg.base_gmm is not None:
            out = out + self.base_velocity(x, sigma_B, class_B, guidance_B)
        return out

    def _solver_forward(self, x, sigma_B, class_B, guidance_B):
        """(1 + a) v_gmm(x, clamp(sigma + tau)) + b x, (a, tau, b) interpolated from the sigma table."""
        pos = sigma_B.to(self.solver.dtype).clamp(0, 1) * (SOLVER_KNOTS - 1)
        lo = pos.floor().long().clamp(max=SOLVER_KNOTS - 2)
        frac = (pos - lo)[:, None]
        coef = (self.solver[lo] * (1 - frac) + self.solver[lo + 1] * frac) * SOLVER_PARAM_SCALE  # [B, 3]
        a, tau, b = (expand_like(coef[:, i].to(x.dtype), x) for i in range(3))
        sigma_eval = (sigma_B.to(x.dtype) + tau.reshape(-1)).clamp(0, 1)
        return (1 + a) * self.base_velocity(x, sigma_eval, class_B, guidance_B) + b * x

    def base_velocity(self, x, sigma_B, class_B=None, guidance_B=None) -> torch.Tensor:
        """The exact GMM velocity the residual is added to ([B, *X], x's dtype; differentiable in x)."""
        if self._base is None or self._base.device != x.device:
            self._base = GMMTeacher(GMMSpec.from_json_dict(self.cfg.base_gmm), device=x.device)
        w = guidance_B if (self.cfg.guidance_cond and guidance_B is not None) else self.cfg.base_guidance
        with torch.autocast(device_type=x.device.type, enabled=False):  # float64 inside: keep autocast out
            return self._base.velocity(x, sigma_B, class_B if self.cfg.num_classes else None, w)


def fit_flow_net(
    net: FlowNet,
    sample_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    cond_dropout: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit ``net`` by flow matching on data from ``sample_fn(n, generator) -> (x0, classes)``.

    sigma ~ U(0, 1); x = (1 - sigma) x0 + sigma eps; loss = ||net(x, sigma, c) - (eps - x0)||^2.
    Classes are dropped to the null class with prob ``cond_dropout`` so CFG works. AdamW with a
    cosine decay. Returns the per-step losses. Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.02)
    device = next(net.parameters()).device
    losses = []
    net.train()
    for step in range(steps):
        x0, cls = sample_fn(batch_size, g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch_size, generator=g)
        if cls is not None and cond_dropout > 0:
            drop = torch.rand(batch_size, generator=g) < cond_dropout
            cls = torch.where(drop, torch.full_like(cls, -1), cls)
        s = expand_like(sigma, x0)
        x = (1 - s) * x0 + s * eps
        x, sigma, target = x.to(device), sigma.to(device), (eps - x0).to(device)
        pred = net(x, sigma, None if cls is None else cls.to(device))
        loss = torch.mean((pred - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    net.eval()
    return losses


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header re-serialised with sorted keys: safetensors writes the
    ``__metadata__`` map in hash order, which differs between processes, so identical tensors and metadata
    gave different bytes. The tensor bytes and their offsets are unchanged; the header is space-padded to
    8 bytes as safetensors writes it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_flow_net(net: FlowNet, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Weights + config (JSON in the safetensors metadata) in one file; byte-reproducible (the same tensors and
    metadata give the same bytes in every process: sorted JSON, canonical header)."""
    meta = {META_KEY: json.dumps(net.cfg.to_dict(), sort_keys=True),
            "trajflow_extra": json.dumps(extra or {}, sort_keys=True)}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    Path(path).write_bytes(canonical_safetensors(st_save(state, metadata=meta)))


def load_flow_net(path: str | Path, device: str | torch.device = "cpu") -> tuple[FlowNet, dict[str, Any]]:
    """Inverse of ``save_flow_net`` -> (net in eval mode, extra metadata). Clear errors on bad files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"flow net weights not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise ValueError(f"{p} is not a valid safetensors file: {e}") from None
    if META_KEY not in meta:
        raise ValueError(f"{p} has no trajflow flow-net config in its metadata")
    raw = json.loads(meta[META_KEY])
    cfg = FlowNetConfig(**raw)
    net = FlowNet(cfg)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.to(device).eval(), json.loads(meta.get("trajflow_extra", "{}"))


class FlowNetTeacher:
    """A FlowNet as a Teacher: CFG through one batched cond + null-class call."""

    def __init__(self, net: FlowNet, name: str = "flownet"):
        self.net = net.eval()
        self.name = name
        self.sample_shape = net.cfg.sample_shape
        self.num_classes = net.cfg.num_classes

    @torch.no_grad()
    def velocity(self, x, sigma, cond=None, guidance=1.0):
        B = x.shape[0]
        p = next(self.net.parameters())
        xs = x.to(p.device, p.dtype)
        s = as_sigma_batch(sigma, B, p.device, p.dtype)
        if cond is None or self.num_classes is None:
            v = self.net(xs, s, None)
        else:
            c = torch.as_tensor(cond, device=p.device).long().reshape(B)
            w = as_guidance_batch(guidance, B, p.device, p.dtype)
            v = cfg_velocity(self.net, xs, s, c, torch.full_like(c, -1), w)
        return v.to(x.device, x.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": "flownet", "name": self.name, "net": self.net.cfg.to_dict()}

    def fingerprint(self) -> str:
        return fingerprint_of({"kind": "flownet", "net": self.net.cfg.to_dict()}, dict(self.net.state_dict()))
