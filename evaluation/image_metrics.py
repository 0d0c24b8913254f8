"""Image metrics for real models, from weights the user supplies by LOCAL path (never downloaded).

- ``frechet_distance(feats_a, feats_b)``: the Fréchet distance between Gaussians fitted to two
  feature sets (the formula of FID), exact in float64 through symmetric eigendecompositions.
- ``CLIPScorer``: a transformers ``CLIPModel`` + processor from a local folder, giving
  - ``clip_score(images, prompts)``: mean of 100 * max(cos(image, text), 0) (torchmetrics' CLIPScore);
  - ``preference_score(images, prompts)``: mean of logit_scale * cos(image, text), which is the
    PickScore when the folder holds PickScore_v1 (``yuvalkirstain/PickScore_v1``, a CLIP-H model);
  - ``hps_score(images, prompts)``: mean of 100 * cos(image, text), the HPSv2 score when the folder
    holds HPSv2 (an OpenCLIP ViT-H-14 fine-tune) converted to transformers' CLIPModel layout. HPSv2's
    ``hpsv2.score`` returns the unscaled cosine (``hpsv2/img_score.py``: the diagonal of
    ``image_features @ text_features.T`` on unit-norm features) and its benchmark prints the mean times
    100 (``hpsv2/evaluation.py``); we report that scale (e.g. 27.5, not 0.275), not clamped at 0;
  - ``image_features(images)``: L2-normalised image embeddings, for ``frechet_distance``
    ("FD-CLIP": FID's formula on CLIP features instead of InceptionV3's pool3).

Standard FID (pool3 features of TF's Inception-v3 with pytorch-fid's weights) is
``evaluation.fid_inception``, written without torchvision (which does not import beside the CPU torch wheel).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

__all__ = ["frechet_distance", "CLIPScorer", "MetricWeightsMissing"]


class MetricWeightsMissing(FileNotFoundError):
    """The weights of an evaluation model are not at the given local path."""


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) for [N, D] and [M, D] features."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples per set")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    d = float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)
    return max(d, 0.0)  # >= 0 mathematically; rounding can leave -1e-10 for identical sets


class CLIPScorer:
    """CLIP model + processor from a LOCAL folder (see module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "CLIP"):
        from transformers import CLIPModel, CLIPProcessor

        root = os.fspath(path)
        def has(name):
            return os.path.isfile(os.path.join(root, name))

        missing = [] if has("config.json") else ["config.json"]
        if not (has("preprocessor_config.json") or has("processor_config.json")):
            missing.append("preprocessor_config.json")
        if not os.path.isdir(root) or missing:
            raise MetricWeightsMissing(
                f"{what} weights not found at {root!r} (missing {', '.join(missing) or 'the folder'}): evaluation "
                "models are never downloaded; save a transformers CLIPModel + CLIPProcessor folder there "
                "(e.g. openai/clip-vit-large-patch14 for CLIP score, yuvalkirstain/PickScore_v1 with the "
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor for PickScore, HPSv2 converted to a "
                "CLIPModel with that processor for HPSv2; see docs/models.md)")
        self.model = CLIPModel.from_pretrained(root, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(root, local_files_only=True)
        self.device = torch.device(device)
        self.path = root

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """[N, D] unit-norm image embeddings of PIL images."""
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        f = self.model.get_image_features(pixel_values=px)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        f = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                         attention_mask=tok["attention_mask"].to(self.device))
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    def _cos(self, images, prompts) -> torch.Tensor:
        if len(images) != len(prompts) or not images:
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)

    def clip_score(self, images, prompts) -> float:
        return float((100 * self._cos(images, prompts).clamp_min(0)).mean())

    def preference_score(self, images, prompts) -> float:
        scale = float(self.model.logit_scale.detach().exp())
        return float((scale * self._cos(images, prompts)).mean())

    def hps_score(self, images, prompts) -> float:
        """HPSv2: mean of 100 * cos(image, text) (module docstring), with an HPSv2 CLIPModel folder."""
        return float((100 * self._cos(images, prompts)).mean())
