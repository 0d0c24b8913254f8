"""Teacher replay: re-solve stored trajectories from their recorded seed and condition.

The teacher is rebuilt from the card (``teacher.config``, ``run.teacher_spec``, or a local
``--replay-teacher`` SPEC), its fingerprint must equal the card's, and each chosen sample is solved
again with the card's solver, sigma grid and saved sigmas, from ``seeded_noise([seed])`` with the
recorded class/prompt and guidance. The replayed states, cast to the stored dtype, must equal the
stored ones within the dtype's tolerance: the data is then authentic and reproducible.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..card import DatasetCard
from ..locations import LocationPolicy, LocationRefused
from ..record import TORCH_DTYPES
from ._shards import ReplaySample
from .problems import Problem

TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
"""Max |replayed - stored| relative to the trajectory's scale (max |stored|), per stored dtype."""
BATCH = 32


class ReplayUnavailable(Exception):
    """The teacher cannot be rebuilt on this machine (the message says why and what to do)."""


def _local_target(target: str) -> str:
    if target.startswith("file://"):
        return target[len("file://"):]
    if "://" in target:
        raise ReplayUnavailable(
            f"the teacher's weights are at a remote URL ({target}); copy them to this machine and pass "
            "--replay-teacher KIND:/local/path (the fingerprint is still checked against the card)")
    return target


def _from_spec(spec: str, device: str, card: DatasetCard | None = None):
    from models.registry import build_teacher
    from models.spec import TeacherSpec, parse_teacher_spec

    s = parse_teacher_spec(spec)
    target = s.target if s.kind == "gmm" and "/" not in s.target else _local_target(s.target)
    if s.kind != "gmm" and not os.path.exists(target):
        raise ReplayUnavailable(f"teacher {spec!r}: {target} does not exist on this machine; pass "
                                "--replay-teacher KIND:/local/path")
    kwargs = {}
    if s.kind == "diffusers" and card is not None:  # the corpus's latent size and the teacher's dtype
        kwargs["sample_shape"] = tuple(card.sample_shape)
        dtype_name = card.run.get("teacher_dtype")
        if isinstance(dtype_name, str) and dtype_name:
            kwargs["dtype"] = getattr(torch, dtype_name)
    return build_teacher(TeacherSpec(s.kind, target, s.variant), device=device, **kwargs)


def rebuild_teacher(card: DatasetCard, override: str | None, device: str,
                    root: str | None = None) -> tuple[Any, list[str]]:
    """The first candidate teacher whose fingerprint equals the card's.

    What the card names is opened only under the corpus ``root`` (``storage_schemas.locations``); a
    ``--replay-teacher`` override is the user's own and is opened as given.

    Returns (teacher, []) on a match, (teacher, [fingerprints]) when every buildable candidate has
    another fingerprint (a teacher_mismatch), and raises ReplayUnavailable when none can be built.
    """
    builders = []
    if override:
        builders.append((f"--replay-teacher {override}", lambda: _from_spec(override, device, card)))
    else:  # the one registry every component rebuilds teachers with; local files only (no fetch here)
        def from_card():
            from models.registry import teacher_from_config

            policy = LocationPolicy(root, hint="to replay, copy it under the corpus root or pass --replay-teacher "
                                               "KIND:/local/path")
            try:
                return teacher_from_config(card.teacher.kind, card.teacher.config, card.run, device=device,
                                           check_location=lambda loc: policy.check(loc, "the teacher"))
            except LocationRefused as exc:
                raise ReplayUnavailable(str(exc)) from None
            except ValueError as exc:
                raise ReplayUnavailable(f"{exc}; pass --replay-teacher KIND:/local/path") from None

        builders.append((f"the card's {card.teacher.kind} teacher", from_card))
    if not builders:
        raise ReplayUnavailable(f"the card does not say how to rebuild its {card.teacher.kind!r} teacher "
                                "(no teacher.config.spec or run.teacher_spec); pass --replay-teacher SPEC")
    reasons, mismatched, built = [], [], None
    for label, build in builders:
        try:
            teacher = build()
        except ReplayUnavailable as exc:
            reasons.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - any failure to build is "unavailable", not a crash
            reasons.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        fp = teacher.fingerprint()
        if fp == card.teacher.fingerprint:
            return teacher, []
        built = built or teacher
        mismatched.append(f"{label} -> {fp[:16]}…")
    if built is not None:
        return built, mismatched
    raise ReplayUnavailable("; ".join(reasons))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _condition(teacher: Any, card: DatasetCard, batch: list[ReplaySample], device: str):
    kind = card.conditioning.kind
    if kind == "class":
        return torch.tensor([int(s.meta["class_id"]) for s in batch], dtype=torch.long, device=device)
    if kind == "prompt":
        encode = getattr(teacher, "encode_prompts", None)
        if encode is None or any("prompt" not in s.meta for s in batch):
            raise ReplayUnavailable("prompt-conditioned samples need a teacher with text encoders "
                                    "(encode_prompts) and the prompt text in the metadata")
        return encode([s.meta["prompt"] for s in batch])
    return None


def replay(card: DatasetCard, samples: list[ReplaySample], *, override: str | None = None,
           device: str | None = None, root: str | None = None) -> tuple[list[Problem], dict[str, Any], list[str]]:
    """Re-solve ``samples``; returns (problems, stats["replay"], notes). ``root``: the corpus root (what the card
    names outside it is not opened)."""
    from flowcore.solvers import seeded_noise, solve_teacher

    device = device or default_device()
    tol = TOLERANCES[card.dtype]
    stats: dict[str, Any] = {"requested": len(samples), "replayed": 0, "dtype": card.dtype, "tolerance": tol,
                             "device": device, "available": False, "max_deviation": None, "samples": []}
    if not samples:
        return [], stats, []
    try:
        teacher, mismatched = rebuild_teacher(card, override, device, root)
    except ReplayUnavailable as exc:
        stats["reason"] = str(exc)
        return [], stats, [f"replay unavailable: {exc}"]
    if mismatched:
        detail = (f"the rebuilt teacher's fingerprint differs from the card's teacher.fingerprint "
                  f"{card.teacher.fingerprint[:16]}… ({'; '.join(mismatched)}): replay skipped")
        stats["reason"] = "teacher fingerprint mismatch"
        return [Problem("teacher_mismatch", None, detail, "dataset.json")], stats, []
    if tuple(teacher.sample_shape) != tuple(card.sample_shape):
        stats["reason"] = f"teacher sample_shape {list(teacher.sample_shape)} != card {list(card.sample_shape)}"
        return [Problem("teacher_mismatch", None, f"the rebuilt teacher's sample_shape {list(teacher.sample_shape)} "
                                                  f"differs from the card's {list(card.sample_shape)}",
                        "dataset.json")], stats, []
    stats["available"] = True
    dtype = TORCH_DTYPES[card.dtype]
    problems: list[Problem] = []
    notes: list[str] = []
    worst = 0.0
    rows = []
    for start in range(0, len(samples), BATCH):
        batch = samples[start:start + BATCH]
        try:
            cond = _condition(teacher, card, batch, device)
        except ReplayUnavailable as exc:
            stats["available"] = False
            stats["reason"] = str(exc)
            return problems, stats, [f"replay unavailable: {exc}"]
        noise = seeded_noise([s.seed for s in batch], teacher.sample_shape, torch.float32, device)
        guidance = torch.tensor([s.guidance for s in batch], dtype=torch.float32, device=device)
        traj = solve_teacher(teacher, noise, list(card.solver.sigmas), cond=cond, guidance=guidance,
                             method=card.solver.name, capture_sigmas=list(card.saved_sigmas))
        replayed = traj.states_BKX.to("cpu", dtype).to(torch.float32)
        for s, r in zip(batch, replayed):
            stored = s.states.to(torch.float32)
            scale = float(stored.abs().max().clamp_min(1e-12))
            diff = (r - stored).abs().reshape(stored.shape[0], -1).amax(dim=1) / scale  # per saved state
            dev = float(diff.max())
            k = int(diff.argmax())
            worst = max(worst, dev)
            ok = dev <= tol
            rows.append({"shard": s.shard_id, "key": s.key, "index": s.index, "seed": s.seed,
                         "max_deviation": dev, "worst_sigma": card.saved_sigmas[k], "ok": ok})
            if not ok:
                problems.append(Problem(
                    "replay_mismatch", s.shard_id,
                    f"sample {s.key} (seed {s.seed}): replay deviates by {dev:.3g} of the trajectory's scale "
                    f"(worst at sigma {card.saved_sigmas[k]:.4g}), {card.dtype} tolerance is {tol:g}: the stored "
                    "states are not what the recorded teacher produces", s.path))
    stats.update(replayed=len(rows), max_deviation=worst, samples=rows,
                 authentic=all(r["ok"] for r in rows))
    return problems, stats, notes
