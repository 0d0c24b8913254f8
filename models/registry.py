"""ONE place that turns a teacher SPEC, or a corpus card's teacher record, into a Teacher.

``build_teacher(spec)``: a SPEC string (``gmm:ring2d``, ``gmm:/p/spec.json``, ``flownet:/p/net.safetensors``,
``diffusers:/p/pipeline[:subfolder]``) whose target is a preset or a LOCAL path.
``teacher_from_config(kind, config, run, fetch=...)``: the teacher a card describes (``card.teacher.kind``,
``card.teacher.config``, ``card.run``), checked against the card's fingerprint by the caller-facing
``teacher_from_card``. Remote locations are the caller's business: ``fetch(url) -> local path`` comes in
as an argument (the trainer and the generation workers pass fsspec-backed fetchers), so this layer never
touches object storage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from models.flownet import FlowNetTeacher, load_flow_net
from models.gmm import PRESETS, GMMSpec, GMMTeacher, load_preset
from models.spec import TeacherSpec, diffusers_subfolder, is_unet_folder, parse_teacher_spec

__all__ = ["build_teacher", "teacher_from_config", "teacher_from_card", "teacher_spec_for_card", "local_target", "TeacherMismatch",
           "DIFFUSERS_KINDS", "Fetch", "CheckLocation"]

#: card ``teacher.kind`` values of diffusers teachers (SD3-class transformer; SD1.5/SD2/SDXL UNet)
DIFFUSERS_KINDS = ("diffusers", "diffusers_unet")

#: ``fetch(url) -> local path``: how a caller with object-storage access brings a remote file here
Fetch = Callable[[str], str]
#: ``check_location(location)``: raises (a ValueError) when a location a card names must not be fetched or opened
CheckLocation = Callable[[str], object]


class TeacherMismatch(ValueError):
    """The teacher that was built is not the corpus's teacher (its fingerprint differs from the card's)."""


def local_target(target: str, fetch: Fetch | None, *, what: str) -> str:
    """A local path for ``target``: ``file://`` stripped; a remote URL through ``fetch`` (refused without one)."""
    if target.startswith("file://"):
        return target[len("file://"):]
    if "://" in target:
        if fetch is None:
            raise ValueError(f"{what} is at a remote location ({target}); this caller loads local files only: "
                             "copy it to this machine and pass its local path")
        return fetch(target)
    return target


def build_teacher(spec: str | TeacherSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  resolution: int | None = None, sample_shape=None, fetch: Fetch | None = None):
    """Build a Teacher from a SPEC whose target is a preset or a path.

    A remote flow-net target (``s3://...``) is brought here by ``fetch``, and refused without one;
    diffusers teachers load from a local folder only (``file://`` is stripped).

    ``resolution`` (image pixels) or ``sample_shape`` (latent C, H, W) size a diffusers teacher's
    samples (default: the model config's sample_size); other teachers have a fixed shape. A
    diffusers SD3 pipeline folder is loaded with its text encoders (``encode_prompts``); an SD1.5/SD2 UNet
    pipeline folder with its CLIP text encoder when it has text_encoder/ and tokenizer/ (SDXL: both CLIP
    encoders, when it also has text_encoder_2/ and tokenizer_2/; time ids at this resolution)."""
    s = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "digits":  # the digits testbed: a cached flow net fitted to scikit-learn's 8x8 digits
        if resolution is not None or sample_shape is not None:
            raise ValueError("resolution / sample_shape apply to diffusers teachers only; the digits testbed is 1x8x8")
        from models.digits import digits_teacher

        return digits_teacher(s, device=device, dtype=dtype)
    if s.kind == "diffusers" and "://" in s.target and not s.target.startswith("file://"):
        raise ValueError("diffusers teachers load from a local folder (or a hub on your cluster); copy the model "
                         f"next to the workers and pass diffusers:/local/path, got {str(s)!r}")
    if s.kind != "gmm" or "/" in s.target:
        s = TeacherSpec(s.kind, local_target(s.target, fetch, what=f"the {s.kind} teacher"), s.variant)
    if s.kind != "diffusers" and (resolution is not None or sample_shape is not None):
        raise ValueError(f"resolution / sample_shape apply to diffusers teachers only; {s.kind}: teachers have a "
                         "fixed sample shape")
    if s.kind == "gmm":
        gspec = load_preset(s.target) if s.target in PRESETS else GMMSpec.load(s.target)
        return GMMTeacher(gspec, device=device)
    if s.kind == "flownet":
        net, _ = load_flow_net(s.target, device=device)
        if dtype is not None:
            net = net.to(dtype)
        return FlowNetTeacher(net, name=Path(s.target).stem)
    kwargs = {"subfolder": diffusers_subfolder(s.target, s.variant)}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if sample_shape is not None:
        kwargs["sample_shape"] = tuple(int(d) for d in sample_shape)
    if is_unet_folder(s.target, kwargs["subfolder"]):
        from types import SimpleNamespace

        from models.diffusers.sd3 import latent_shape_for_resolution
        from models.diffusers.unet import DiffusersUNetTeacher

        if resolution is not None and sample_shape is None:
            with open(os.path.join(s.target, kwargs["subfolder"], "config.json")) as f:
                unet_cfg = SimpleNamespace(in_channels=int(json.load(f).get("in_channels", 4)))
            kwargs["sample_shape"] = latent_shape_for_resolution(s.target, unet_cfg, resolution)

        return DiffusersUNetTeacher.from_pretrained(s.target, **kwargs).to(device)
    from models.diffusers.sd3 import DiffusersFlowTeacher

    if resolution is not None and sample_shape is None:
        kwargs["resolution"] = int(resolution)
    return DiffusersFlowTeacher.from_pretrained(s.target, **kwargs).to(device)


def teacher_from_config(kind: str, config: Mapping[str, Any], run: Mapping[str, Any] | None = None, *,
                        fetch: Fetch | None = None, device: str | torch.device | None = None,
                        check_location: CheckLocation | None = None):
    """The teacher a corpus card describes: ``kind``/``config`` are ``card.teacher.kind``/``.config``, ``run``
    is ``card.run``.

    gmm: the exact GMM from ``config["spec"]``; flownet: the weights at ``run["teacher_spec"]`` (remote ones
    through ``fetch``); diffusers / diffusers_unet: the pipeline folder at ``config["source"]["path"]`` on
    this machine (text encoders and initial weights load from there). Raises ValueError with what is
    missing; the caller checks the fingerprint (``teacher_from_card`` does).

    ``check_location(location)``: the caller's fetch policy, called with every location the card names
    before it is fetched or opened (it raises to refuse; the trainer and the audit refuse what is not under
    the corpus root or an allowed prefix)."""
    def allowed(location: str) -> str:
        """The location to open: the one the caller's policy approved (normalised), never another spelling."""
        if check_location is not None:
            approved = check_location(location)
            if isinstance(approved, str):
                return approved
        return location

    run = run or {}
    if kind in DIFFUSERS_KINDS:
        if kind == "diffusers":
            from models.diffusers.sd3 import DiffusersFlowTeacher as teacher_cls
        else:
            from models.diffusers.unet import DiffusersUNetTeacher as teacher_cls
        source = config.get("source") or {}
        path = str(source.get("path") or "") if isinstance(source, Mapping) else ""
        if path:
            path = allowed(path)
        if not path or not os.path.isdir(path):
            raise ValueError(f"the corpus's diffusers teacher folder {path!r} is not on this machine: it is loaded "
                             "(text encoders, initial weights) from the path recorded in the card's "
                             "teacher.config.source.path; put the pipeline folder there on every node")
        return teacher_cls.from_config(dict(config), device=device)
    if kind == "gmm":
        spec = config.get("spec")
        if not isinstance(spec, Mapping):
            raise ValueError("the card's GMM teacher has no spec (teacher.config.spec): the corpus cannot say "
                             "which mixture it was drawn from")
        return GMMTeacher(GMMSpec.from_json_dict(dict(spec)), device=device or "cpu")
    if kind == "flownet":
        spec = str(run.get("teacher_spec", ""))
        testbed = config.get("testbed")
        if isinstance(testbed, Mapping) and str(testbed.get("spec", "")).startswith("digits:"):
            from models.digits import digits_teacher  # fitted deterministically, or loaded from the cache

            return digits_teacher(str(testbed["spec"]), device=device or "cpu")
        if not spec.startswith("flownet:"):
            raise ValueError("the card does not record where the flow-net teacher's weights are (run.teacher_spec)")
        path = local_target(allowed(spec[len("flownet:"):]), fetch, what="the flow-net teacher's weights")
        net, _ = load_flow_net(path, device=device or "cpu")
        return FlowNetTeacher(net)
    raise ValueError(f"no teacher of kind {kind!r} is known (known: gmm, flownet, {', '.join(DIFFUSERS_KINDS)})")


def teacher_from_card(card, *, fetch: Fetch | None = None, device: str | torch.device | None = None,
                      check_location: CheckLocation | None = None):
    """``teacher_from_config`` for a ``storage_schemas.DatasetCard`` (duck-typed: ``.teacher.kind``,
    ``.teacher.config``, ``.teacher.fingerprint``, ``.run``), checked against the card's fingerprint
    (``TeacherMismatch`` when it differs)."""
    teacher = teacher_from_config(card.teacher.kind, card.teacher.config, card.run, fetch=fetch, device=device,
                                  check_location=check_location)
    if teacher.fingerprint() != card.teacher.fingerprint:
        where = (card.teacher.config.get("source") or {}).get("path") if card.teacher.kind in DIFFUSERS_KINDS \
            else card.run.get("teacher_spec", card.teacher.kind)
        raise TeacherMismatch(f"the teacher at {where} is not the corpus's teacher (fingerprint differs: other "
                              "weights, dtype or text encoders)")
    return teacher


def teacher_spec_for_card(card, tmpdir: str, *, check_location: CheckLocation | None = None) -> str:
    """A SPEC that rebuilds the card's teacher through ``build_teacher`` (for processes configured by a SPEC,
    such as the teacher pool's replicas): a GMM's spec is written to ``tmpdir/gmm-spec.json``; other kinds
    use the recorded ``run.teacher_spec``."""
    if card.teacher.kind == "gmm":
        spec = card.teacher.config.get("spec")
        if not isinstance(spec, Mapping):
            raise ValueError("the card's GMM teacher has no spec (teacher.config.spec)")
        path = os.path.join(tmpdir, "gmm-spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        return f"gmm:{path}"
    spec = str(card.run.get("teacher_spec", ""))
    if not spec:
        raise ValueError("the corpus's card does not record its teacher SPEC (run.teacher_spec)")
    if check_location is not None:  # the caller's fetch policy sees every location the card names
        parsed = parse_teacher_spec(spec)
        if parsed.kind in ("flownet", "diffusers"):
            check_location(parsed.target)
    return spec
