"""The local cache root of trajflow: fetched teachers, fitted networks, downloaded students."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$TRAJFLOW_CACHE`` (default ``~/.cache/trajflow``), read at call time (so a test or a caller that
    sets the variable after import is honoured)."""
    return Path(os.environ.get("TRAJFLOW_CACHE", os.path.expanduser("~/.cache/trajflow")))
