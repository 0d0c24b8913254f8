"""Teacher SPEC strings: parsing and the diffusers folder layout (``models.registry`` builds the teachers).

    gmm:ring2d | gmm:latent10         built-in analytic GMM presets
    gmm:/path/spec.json               a GMM from a JSON spec (see models.gmm.GMMSpec)
    flownet:/path/net.safetensors     a small flow net saved by models.flownet.save_flow_net
    digits:8x8[:fit=N]                the digits testbed: a flow net fitted to scikit-learn's 8x8 digits
                                      (models.digits; fitted once, cached under $TRAJFLOW_CACHE)
    diffusers:/path/model[:subfolder] a diffusers pipeline from a local folder: the UNet adapter
                                      (models.diffusers.unet, SD1.5/SD2/SDXL) when the folder has
                                      unet/, the flow-matching transformer adapter
                                      (models.diffusers.sd3, SD3) when it has transformer/

Remote URLs (s3://, gs://, ...) reach ``models.registry.build_teacher`` with a ``fetch`` callable from
the caller (pipeline, trainer): the model layer stays free of object-storage code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

KINDS = ("gmm", "flownet", "diffusers", "digits")


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher SPEC: ``kind`` in KINDS, ``target`` (preset name, path or URL), optional ``variant``."""

    kind: str
    target: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" + (f":{self.variant}" if self.variant else "")


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """Parse 'kind:target[:variant]' with errors that show the accepted forms."""
    help_ = ("expected gmm:ring2d, gmm:latent10, gmm:FILE.json, flownet:FILE.safetensors, "
             "diffusers:PATH[:subfolder] or digits:8x8[:fit=N]")
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"bad teacher spec {spec!r}: {help_}")
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise ValueError(f"unknown teacher kind {kind!r} in {spec!r}: {help_}")
    if not rest:
        raise ValueError(f"teacher spec {spec!r} names no preset or path: {help_}")
    variant = None
    if kind == "diffusers":
        # 'diffusers:/path:transformer' or 'diffusers:s3://bucket/model:transformer'
        head, sep, tail = rest.rpartition(":")
        if sep and tail and "/" not in tail and not head.endswith(("s3", "gs", "gcs", "file", "memory")):
            rest, variant = head, tail
    if kind == "digits":  # 'digits:8x8' or 'digits:8x8:fit=400'
        rest, _, variant = rest.partition(":")
        if rest != "8x8":
            raise ValueError(f"unknown digits testbed {rest!r} in {spec!r}: expected digits:8x8 or digits:8x8:fit=N")
        variant = variant or None
    return TeacherSpec(kind, rest, variant)


def diffusers_subfolder(path: str, variant: str | None) -> str:
    """The model subfolder of a local diffusers pipeline folder: ``variant`` when given, else ``unet``
    when the folder has a unet/ subfolder (and no transformer/), else ``transformer``."""
    if variant:
        return variant
    has_unet, has_transformer = (os.path.isdir(os.path.join(path, d)) for d in ("unet", "transformer"))
    if has_unet and not has_transformer:
        return "unet"
    if os.path.isdir(path) and not has_transformer:
        raise FileNotFoundError(
            f"diffusers teacher folder {path!r} has neither a unet/ (SD1.5/SD2/SDXL) nor a transformer/ (SD3) "
            "subfolder; point at the pipeline folder or name the subfolder: diffusers:PATH:SUBFOLDER")
    return "transformer"


def is_unet_folder(path: str, subfolder: str) -> bool:
    """Whether ``path/subfolder`` holds a UNet (its config's ``_class_name`` names a UNet, or, with no
    readable config, the subfolder is called ``unet``)."""
    cfg = os.path.join(path, subfolder, "config.json")
    try:
        with open(cfg) as f:
            name = str(json.load(f).get("_class_name", ""))
    except (OSError, ValueError):
        return subfolder == "unet"
    return "UNet" in name


def scheduler_shift(scheduler_config: dict | None) -> float:
    """The time shift a diffusers pipeline's own scheduler config implies for trajflow's sigma grid.

    ``FlowMatchEulerDiscreteScheduler`` configs carry ``shift`` (SD3-Medium / SD3.5: 3.0); schedulers
    without one (DDIM / Euler / PNDM of SD1.5, SD2, SDXL UNets) mean no shift (1.0), as does a
    missing config (``None``). A config with ``use_dynamic_shifting`` (Flux-style, the shift depends
    on the resolution through ``mu``) has no single shift: that is a clear error asking for ``--shift``.
    """
    if not scheduler_config:
        return 1.0
    if scheduler_config.get("use_dynamic_shifting"):
        raise ValueError(
            f"the pipeline's scheduler ({scheduler_config.get('_class_name', 'scheduler')}) uses dynamic shifting: "
            "its shift depends on the resolution (shift = exp(mu)); pass --shift explicitly")
    shift = scheduler_config.get("shift", 1.0)
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not shift > 0:
        raise ValueError(f"the pipeline's scheduler config has an invalid shift {shift!r}; pass --shift explicitly")
    return float(shift)
