"""The corpus's teacher for the trainer: ``models.registry`` with an fsspec fetcher for remote weights.

``teacher_from_card(card, storage_options, root=..., allow=...)`` rebuilds the teacher a card describes
(GMM from its spec, flow net from ``run.teacher_spec``, diffusers pipelines from
``teacher.config.source.path``) and checks its fingerprint. Every location the card names goes through
``storage_schemas.locations.LocationPolicy`` first: it is fetched or opened only when it lies under
``root`` (the corpus root, or an exported student's folder) or under a prefix the user allowed
(``--allow-teacher-location``, ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS``); anything else is refused with a
one-line ``LocationRefused`` before any request. Allowed remote flow-net weights are fetched into the
local cache (``TRAJFLOW_CACHE``) with the run's storage options; the model layer never touches object
storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from models import registry
from models.cache import cache_root
from storage_schemas import DatasetCard
from storage_schemas.fetch import fetch_to_local
from storage_schemas.locations import LocationPolicy

__all__ = ["teacher_from_card"]


def teacher_from_card(card: DatasetCard, storage_options: dict[str, Any] | None = None, device=None, *,
                      root: str | None = None, allow: Iterable[str] = (), root_what: str = "the corpus root",
                      source: str = "the corpus's card"):
    """The corpus's teacher, built by ``models.registry.teacher_from_card`` (fingerprint checked).

    ``root``: the trusted folder the card came from (None: nothing the card names is trusted unless
    ``allow`` or the environment allows it)."""
    policy = LocationPolicy(root, allow, root_what=root_what, source=source)

    def fetch(url: str) -> str:
        # the registry checked already; a fetch never skips it, and fetches the normalised location it approved
        approved = policy.check(url, "the teacher's weights")
        return fetch_to_local(approved, str(cache_root() / "teachers"), storage_options)

    return registry.teacher_from_card(card, fetch=fetch, device=device,
                                      check_location=lambda loc: policy.check(loc, "the teacher's weights"))
