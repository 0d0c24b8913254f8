"""Experiment trackers (``--report-to``): which accelerate trackers a run starts, and starting them without
handing them a secret.

What the trackers receive: the logged scalars (the same rows as ``logs/metrics.jsonl``), the diffusers
students' preview images, a run name (the last component of the local log folder) and the run config as
``public_config`` makes it for checkpoints: scalar fields only, no ``storage_options``, no key that names a
credential, URLs without user info or query string.

What they never receive: the command line (where ``--storage-options`` may carry keys) and the storage options
or credentials of the environment. Weights & Biases records the command line, the program, the git remote and
the host in its run metadata unless told not to (issue 25, finding 2): its run starts with that metadata, code
and requirements capture and git capture off (``WANDB_SETTINGS``). MLflow's default tags hold the program path
(``sys.argv[0]``), the user and the git commit and repository URL (which MLflow strips of credentials);
TensorBoard writes only what it is given. While the trackers start, ``sys.argv`` is also shown to them
redacted (``redacted_argv``), so a tracker that reads the command line by itself sees no secret either.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trainer.checkpoint import public_config, redact_url

__all__ = ["TRACKERS", "tracker_names", "tracker_config", "redacted_argv", "WANDB_SETTINGS", "start_trackers"]

#: --report-to choices -> the accelerate trackers they start (metrics.jsonl is always written)
TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "mlflow": ["mlflow"],
            "all": ["tensorboard", "wandb", "mlflow"], "none": []}

#: wandb.Settings of a trajflow run: no system metadata (command line, program, git remote, host, executable),
#: no code or requirements capture, no git state (settings this wandb version does not know are left out)
WANDB_SETTINGS = {"x_disable_meta": True, "disable_git": True, "save_code": False, "disable_code": True,
                  "x_save_requirements": False}

#: flags whose value is never shown to a tracker, even redacted as a URL
_SECRET_FLAGS = ("--storage-options",)


def tracker_names(report_to: str) -> list[str]:
    """The accelerate trackers of ``--report-to`` (comma-separated names allowed), each checked to be
    installed, with the pip command when it is not."""
    names: list[str] = []
    for part in str(report_to).split(","):
        part = part.strip()
        if part not in TRACKERS:
            raise ValueError(f"--report-to {part!r}: choose from {', '.join(TRACKERS)} (comma-separated)")
        names += [n for n in TRACKERS[part] if n not in names]
    for n in names:
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"--report-to {n} needs the {n} package: pip install {n}"
                             + (" (or mlflow-skinny)" if n == "mlflow" else ""))
    return names


def tracker_config(cfg) -> dict[str, Any]:
    """The run config a tracker records: ``public_config`` of ``cfg`` (a TrainConfig), scalar fields only."""
    return {k: v for k, v in public_config(cfg.to_dict()).items() if isinstance(v, (int, float, str, bool))}


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret-bearing flag (``--storage-options``) replaced by ``***`` and
    every URL without user info or query string."""
    out: list[str] = []
    hide = False
    for token in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        name, eq, _ = token.partition("=")
        if name in _SECRET_FLAGS:
            out.append(f"{name}=***" if eq else token)
            hide = not eq
            continue
        out.append(redact_url(token))
    return out


@contextlib.contextmanager
def _argv_redacted() -> Iterator[None]:
    saved = sys.argv
    sys.argv = [*saved[:1], *redacted_argv(saved[1:])]
    try:
        yield
    finally:
        sys.argv = saved


def _wandb_settings():
    import wandb

    known = getattr(wandb.Settings, "model_fields", None)
    settings = {k: v for k, v in WANDB_SETTINGS.items() if known is None or k in known}
    return wandb.Settings(**settings)


def start_trackers(accelerator, cfg, log_dir: str) -> list[str]:
    """Start the run's trackers (``cfg.report_to``; main process only) with the public run config, under
    ``log_dir/logs`` for the file-based ones; returns the names started (none on the other processes).
    The trackers get no command line and no secret (see the module docstring)."""
    names = tracker_names(cfg.report_to)
    if not accelerator.is_main_process or not names:
        return []
    run_name = Path(log_dir).name or "trajflow"
    init_kwargs: dict[str, dict[str, Any]] = {"wandb": {"dir": str(Path(log_dir) / "logs"), "name": run_name},
                                              "mlflow": {"run_name": run_name}}
    if "wandb" in names:
        init_kwargs["wandb"]["settings"] = _wandb_settings()
    with _argv_redacted():
        accelerator.init_trackers("trajflow", config=tracker_config(cfg), init_kwargs=init_kwargs)
    return names
