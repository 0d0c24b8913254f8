"""Analytic Gaussian-mixture teacher: the exact marginal velocity of the rectified-flow path.

Data: x0 ~ sum_m w_m N(mu_m, diag(s_m^2)) in any sample shape (flattened to D dims), each
component m carrying a class label c_m. Path: x = (1 - sigma) x0 + sigma eps, eps ~ N(0, I).

Given component m, x is Gaussian: x | m ~ N(a mu_m, diag(c_m^2)) with a = 1 - sigma and
c_m^2 = a^2 s_m^2 + sigma^2, and (eps - x0, x) are jointly Gaussian with
Cov(eps - x0, x) = diag(sigma - a s_m^2), so

    E[eps - x0 | x, m] = -mu_m + (sigma - a s_m^2) / c_m^2 * (x - a mu_m)

and the marginal velocity is v(x, sigma) = sum_m r_m(x) E[eps - x0 | x, m] with posterior
responsibilities r_m(x) proportional to w_m N(x; a mu_m, diag(c_m^2)). The formula is finite on
the closed interval sigma in [0, 1] (c_m > 0 whenever s_m > 0), so solvers may evaluate it at
both ends. Conditioning on class y restricts the mixture to the components of class y (weights
renormalised); class -1 (or cond=None) is the unconditional mixture. Classifier-free guidance is
exact: v_w = v_uncond + w (v_cond - v_uncond).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from flowcore.teacher import as_guidance_batch, as_sigma_batch, fingerprint_of

PRESETS = ("ring2d", "latent10")


@dataclass
class GMMSpec:
    """Parameters of a (class-conditional) Gaussian mixture.

    means_MD: [M, D] component means (D = prod(sample_shape)).
    stds_MD: [M, D] per-dimension standard deviations (> 0).
    weights_M: [M] mixture weights (> 0, normalised on construction).
    classes_M: [M] long class id of each component in [0, num_classes), or None (unconditional).
    """

    sample_shape: tuple[int, ...]
    means_MD: torch.Tensor
    stds_MD: torch.Tensor
    weights_M: torch.Tensor
    classes_M: torch.Tensor | None = None
    num_classes: int | None = None
    name: str = "custom"

    def __post_init__(self):
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        D = math.prod(self.sample_shape)
        self.means_MD = torch.as_tensor(self.means_MD, dtype=torch.float64).reshape(-1, D)
        M = self.means_MD.shape[0]
        if M < 1:
            raise ValueError("a GMM needs at least one component")
        stds = torch.as_tensor(self.stds_MD, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(M)
        if stds.ndim == 1:
            if stds.shape[0] != M:
                raise ValueError(f"stds: expected {M} values (one per component), got {stds.shape[0]}")
            stds = stds[:, None].expand(M, D)
        self.stds_MD = stds.reshape(M, D).clone()
        w = torch.as_tensor(self.weights_M, dtype=torch.float64).reshape(-1)
        if w.shape[0] != M:
            raise ValueError(f"weights: expected {M} values, got {w.shape[0]}")
        if not bool(torch.all(torch.isfinite(self.means_MD))) or not bool(torch.all(torch.isfinite(self.stds_MD))):
            raise ValueError("GMM means and stds must be finite")
        if bool(torch.any(self.stds_MD <= 0)):
            raise ValueError("GMM stds must be > 0")
        if bool(torch.any(w <= 0)) or not bool(torch.all(torch.isfinite(w))):
            raise ValueError("GMM weights must be finite and > 0")
        # weights that already sum to 1 are kept bit for bit: renormalising them moves their last bits, and a
        # spec written out by to_json_dict (the card, the pool's spec file, a student's base_gmm) must rebuild
        # the teacher with the fingerprint it was recorded with
        self.weights_M = w if abs(float(w.sum()) - 1.0) <= 1e-12 else w / w.sum()
        if self.classes_M is not None:
            c = torch.as_tensor(self.classes_M, dtype=torch.long).reshape(-1)
            if c.shape[0] != M:
                raise ValueError(f"classes: expected {M} values, got {c.shape[0]}")
            if bool(torch.any(c < 0)):
                raise ValueError("class ids must be >= 0")
            n = int(c.max()) + 1 if self.num_classes is None else int(self.num_classes)
            if bool(torch.any(c >= n)):
                raise ValueError(f"class ids must be < num_classes={n}")
            missing = sorted(set(range(n)) - set(c.tolist()))
            if missing:
                raise ValueError(f"classes {missing} have no component")
            self.classes_M, self.num_classes = c, n
        else:
            self.num_classes = None

    @property
    def dim(self) -> int:
        return self.means_MD.shape[1]

    def to_json_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "sample_shape": list(self.sample_shape),
            "means": self.means_MD.tolist(),
            "stds": self.stds_MD.tolist(),
            "weights": self.weights_M.tolist(),
        }
        if self.classes_M is not None:
            d["classes"] = self.classes_M.tolist()
            d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> GMMSpec:
        """Build from {"sample_shape", "means" [M][D], "stds" [M] or [M][D], "weights" [M],
        optional "classes" [M], "num_classes", "name"}; errors name the missing/bad field."""
        if not isinstance(d, dict):
            raise ValueError("a GMM spec must be a JSON object")
        unknown = set(d) - {"name", "sample_shape", "means", "stds", "weights", "classes", "num_classes"}
        if unknown:
            raise ValueError(f"GMM spec has unknown fields {sorted(unknown)}")
        for key in ("sample_shape", "means", "stds"):
            if key not in d:
                raise ValueError(f"GMM spec is missing the field {key!r}")
        means = torch.as_tensor(d["means"], dtype=torch.float64)
        M = means.reshape(means.shape[0], -1).shape[0] if means.ndim else 0
        return cls(
            sample_shape=tuple(d["sample_shape"]),
            means_MD=means,
            stds_MD=torch.as_tensor(d["stds"], dtype=torch.float64),
            weights_M=torch.as_tensor(d.get("weights", [1.0] * M), dtype=torch.float64),
            classes_M=None if d.get("classes") is None else torch.as_tensor(d["classes"]),
            num_classes=d.get("num_classes"),
            name=str(d.get("name", "custom")),
        )

    @classmethod
    def load(cls, path: str | Path) -> GMMSpec:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"GMM spec file not found: {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"GMM spec {p} is not valid JSON: {e}") from None
        spec = cls.from_json_dict(d)
        if spec.name == "custom":
            spec.name = p.stem
        return spec


def ring2d_spec(num_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> GMMSpec:
    """8 isotropic Gaussians on a circle in 2-D, one class per mode (for plots)."""
    ang = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], dim=1)
    return GMMSpec((2,), means, torch.full((num_modes,), std), torch.ones(num_modes),
                   torch.arange(num_modes), num_modes, name="ring2d")


def load_preset(name: str) -> GMMSpec:
    """Built-in presets: ``ring2d`` (computed) and ``latent10`` (shipped JSON, 10 classes, 4x8x8)."""
    if name == "ring2d":
        return ring2d_spec()
    if name == "latent10":
        text = resources.files("models").joinpath("presets/latent10.json").read_text()
        return GMMSpec.from_json_dict(json.loads(text))
    raise ValueError(f"unknown GMM preset {name!r}; built-in presets: {', '.join(PRESETS)}")


class GMMTeacher:
    """Exact velocity of the rectified-flow path of a GMM (see module docstring).

    Implements the Teacher protocol: ``velocity(x [B, *sample_shape], sigma [B] | float,
    cond [B] long | None, guidance float | [B])``. Computation runs in float64 internally and
    returns x's dtype.
    """

    def __init__(self, spec: GMMSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.sample_shape = spec.sample_shape
        self.num_classes = spec.num_classes
        self.device = torch.device(device)
        self._mu = spec.means_MD.to(self.device)
        self._var = (spec.stds_MD**2).to(self.device)
        self._logw = spec.weights_M.log().to(self.device)
        self._classes = None if spec.classes_M is None else spec.classes_M.to(self.device)
        # Isotropic components (one std per component, as in both presets) allow a matmul-only
        # path with no [B, M, D] intermediates: O(B M D) flops, O(B M + B D) memory.
        self._iso_var = None
        if bool(torch.all(spec.stds_MD == spec.stds_MD[:, :1])):
            self._iso_var = (spec.stds_MD[:, 0] ** 2).to(self.device)  # [M]
            self._mu_sq = (self._mu**2).sum(1)  # [M]

    # -- Teacher protocol -------------------------------------------------------------------
    def velocity(self, x, sigma, cond=None, guidance=1.0):
        B = x.shape[0]
        xf = x.reshape(B, -1).to(self.device, torch.float64)
        s = as_sigma_batch(sigma, B, self.device, torch.float64)
        w = as_guidance_batch(guidance, B, self.device, torch.float64)
        cls = self._cond_classes(cond, B)
        if cls is not None and bool(torch.all(w == 1.0)) and bool(torch.all(cls >= 0)):
            return self._velocity(xf, s, cls).reshape(x.shape).to(x.device, x.dtype)
        v_uncond = self._velocity(xf, s, None)
        if cls is None:
            v = v_uncond
        else:
            v_cond = self._velocity(xf, s, cls)
            # class -1 means "no condition": its conditional velocity is the unconditional one
            unc = (cls < 0).unsqueeze(1)
            v_cond = torch.where(unc, v_uncond, v_cond)
            v = v_uncond + w.unsqueeze(1) * (v_cond - v_uncond)
        return v.reshape(x.shape).to(x.device, x.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": "gmm", "name": self.spec.name, "spec": self.spec.to_json_dict()}

    def fingerprint(self) -> str:
        return fingerprint_of({"kind": "gmm", "spec": self.spec.to_json_dict()})

    # -- exact quantities -------------------------------------------------------------------
    def _cond_classes(self, cond, B):
        if cond is None:
            return None
        if self._classes is None:
            raise ValueError("this GMM is unconditional; pass cond=None")
        c = torch.as_tensor(cond, device=self.device).long().reshape(-1)
        if c.shape[0] != B:
            raise ValueError(f"cond must have one class id per sample ({B}), got {c.shape[0]}")
        if bool(torch.any(c >= self.num_classes)) or bool(torch.any(c < -1)):
            raise ValueError(f"class ids must be in [-1, {self.num_classes}) (-1 = unconditional)")
        return c

    def _component_logits(self, xf, s, cls):
        """log w_m + log N(x; a mu_m, c_m^2) restricted to class ``cls`` -> [B, M], plus c^2, a."""
        a = (1.0 - s)[:, None, None]
        c2 = a**2 * self._var[None] + (s**2)[:, None, None]  # [B, M, D]
        diff = xf[:, None, :] - a * self._mu[None]
        logp = -0.5 * ((diff**2) / c2 + torch.log(2 * math.pi * c2)).sum(-1) + self._logw[None]
        if cls is not None:
            mask = self._classes[None, :] == cls.clamp(min=0)[:, None]
            logp = logp.masked_fill(~mask, -math.inf)
        return logp, c2, diff, a

    def _class_mask(self, logp, cls):
        if cls is not None:
            mask = self._classes[None, :] == cls.clamp(min=0)[:, None]
            logp = logp.masked_fill(~mask, -math.inf)
        return logp

    def _velocity_isotropic(self, xf, s, cls):
        D = xf.shape[1]
        a = (1.0 - s)[:, None]  # [B, 1]
        c2 = a**2 * self._iso_var[None] + (s**2)[:, None]  # [B, M]
        x_sq = (xf**2).sum(1, keepdim=True)  # [B, 1]
        x_mu = xf @ self._mu.T  # [B, M]
        dist2 = x_sq - 2 * a * x_mu + a**2 * self._mu_sq[None]
        logp = -0.5 * (dist2 / c2 + D * torch.log(2 * math.pi * c2)) + self._logw[None]
        r = torch.softmax(self._class_mask(logp, cls), dim=1)  # [B, M]
        gain = (s[:, None] - a * self._iso_var[None]) / c2  # [B, M]
        # sum_m r_m (-mu_m + g_m (x - a mu_m)) = (r . g) x - (r * (1 + a g)) @ mu
        return (r * gain).sum(1, keepdim=True) * xf - (r * (1 + a * gain)) @ self._mu

    def _velocity(self, xf, s, cls):
        if self._iso_var is not None:
            return self._velocity_isotropic(xf, s, cls)
        logp, c2, diff, a = self._component_logits(xf, s, cls)
        r = torch.softmax(logp, dim=1)  # [B, M]
        gain = (s[:, None, None] - a * self._var[None]) / c2
        v_m = -self._mu[None] + gain * diff  # [B, M, D]
        return (r[:, :, None] * v_m).sum(1)

    def log_prob(self, x0: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log density of data samples x0 [B, *X] (class-conditional if ``cls``) -> [B]."""
        B = x0.shape[0]
        xf = x0.reshape(B, -1).to(self.device, torch.float64)
        c = None if cls is None else self._cond_classes(cls, B)
        logp, *_ = self._component_logits(xf, torch.zeros(B, dtype=torch.float64, device=self.device), c)
        out = torch.logsumexp(logp, dim=1)
        if c is not None:  # renormalise to the class's share of the mixture weights
            mask = self._classes[None, :] == c.clamp(min=0)[:, None]
            out = out - torch.logsumexp(self._logw[None].expand(B, -1).masked_fill(~mask, -math.inf), 1)
        return out

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """Bayes-optimal class of data samples x0 [B, *X] -> [B] long (requires classes)."""
        if self._classes is None:
            raise ValueError("this GMM has no classes")
        B = x0.shape[0]
        xf = x0.reshape(B, -1).to(self.device, torch.float64)
        logp, *_ = self._component_logits(xf, torch.zeros(B, dtype=torch.float64, device=self.device), None)
        per_class = torch.full((B, self.num_classes), -math.inf, dtype=torch.float64, device=self.device)
        for k in range(self.num_classes):
            per_class[:, k] = torch.logsumexp(logp[:, self._classes == k], dim=1)
        return per_class.argmax(1)

    def sample(self, n: int, generator: torch.Generator | None = None,
               cls: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw n data samples -> (x0 [n, *X] float32, classes [n] or None); ``cls`` fixes the classes."""
        if cls is not None:
            cls = self._cond_classes(cls, n).cpu()
            comps = torch.empty(n, dtype=torch.long)
            w = self.spec.weights_M
            for k in cls.unique().tolist():
                idx = (cls == k).nonzero().flatten()
                sel = (self.spec.classes_M == k).nonzero().flatten()
                pick = torch.multinomial(w[sel], len(idx), replacement=True, generator=generator)
                comps[idx] = sel[pick]
        else:
            comps = torch.multinomial(self.spec.weights_M, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.spec.dim, generator=generator, dtype=torch.float64)
        x0 = self.spec.means_MD[comps] + self.spec.stds_MD[comps] * eps
        classes = None if self.spec.classes_M is None else self.spec.classes_M[comps]
        return x0.reshape(n, *self.sample_shape).float(), classes
