"""The corpus's teacher for the trainer: ``models.registry`` with an fsspec fetcher for remote weights.

``teacher_from_card(card, storage_options)`` rebuilds the teacher a card describes (GMM from its spec,
flow net from ``run.teacher_spec``, diffusers pipelines from ``teacher.config.source.path``) and checks
its fingerprint. Remote flow-net weights are fetched into the local cache (``TRAJFLOW_CACHE``) with the
run's storage options; the model layer itself never touches object storage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models import registry
from storage_schemas import DatasetCard
from storage_schemas.fetch import fetch_to_local

__all__ = ["CACHE_ROOT", "teacher_from_card"]

#: node-local cache for fetched teacher weights and fitted GMM nets (shared by every run and rank)
CACHE_ROOT = Path(os.environ.get("TRAJFLOW_CACHE", os.path.expanduser("~/.cache/trajflow")))


def teacher_from_card(card: DatasetCard, storage_options: dict[str, Any] | None = None, device=None):
    """The corpus's teacher, built by ``models.registry.teacher_from_card`` (fingerprint checked)."""
    def fetch(url: str) -> str:
        return fetch_to_local(url, str(CACHE_ROOT / "teachers"), storage_options)

    return registry.teacher_from_card(card, fetch=fetch, device=device)
