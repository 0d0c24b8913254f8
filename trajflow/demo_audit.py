"""The demo's corpus check: the full auditor with deep checks and a few replayed trajectories."""

from __future__ import annotations

from typing import Any


def audit_corpus(url: str) -> dict[str, Any]:
    from storage_schemas.audit import audit_corpus as full_audit

    return full_audit(url, deep=True, replay=8).to_dict()
