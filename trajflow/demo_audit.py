"""The demo's corpus check: the full auditor when available (storage_schemas.audit), else a
manifest check (every shard present with the recorded size and sha256, every sample decodes)."""

from __future__ import annotations

import hashlib
from typing import Any


def audit_corpus(url: str) -> dict[str, Any]:
    try:
        from storage_schemas.audit import audit_corpus as full_audit  # the full auditor
    except ImportError:
        full_audit = None
    if full_audit is not None:
        return full_audit(url, deep=True, replay=8).to_dict()
    import fsspec

    from storage_schemas import DatasetCard, iter_shard_samples, manifest_from_parquet_bytes

    fs, root = fsspec.core.url_to_fs(url)
    card = DatasetCard.from_json(fs.cat_file(f"{root}/dataset.json"))
    rows = manifest_from_parquet_bytes(fs.cat_file(f"{root}/manifest.parquet"))
    problems = []
    samples = 0
    for r in rows:
        data = fs.cat_file(f"{root}/{r.path}")
        if len(data) != r.num_bytes or hashlib.sha256(data).hexdigest() != r.sha256:
            problems.append({"kind": "sha256_mismatch", "shard": r.shard_id, "detail": "size or hash differs"})
            continue
        samples += sum(1 for _ in iter_shard_samples(data, r.shard_id, card))
    return {"ok": not problems, "num_shards": len(rows), "num_samples": samples, "problems": problems, "stats": {}}
