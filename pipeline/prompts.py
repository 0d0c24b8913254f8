"""Prompt files for prompt-conditioned teachers: JSONL or Parquet with ``prompt_id`` and ``prompt``."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.storage import with_retries
from storage_schemas.locations import is_file_url, local_path
from storage_schemas.prompts import parse_prompt_file


def load_prompts(url: str, storage_options: dict[str, Any] | None = None) -> tuple[tuple[tuple[Any, str], ...], str]:
    """Read (prompt_id, prompt) pairs from a .jsonl or .parquet file -> (pairs, sha256 of the file).

    A ``file:`` URL opens the path it names as ``storage_schemas.locations`` reads it (``file://localhost/x``
    is ``/x``, as the allow-lists approve it; fsspec alone would read ``./localhost/x``); one naming another
    host is refused (ValueError)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(local_path(url) if is_file_url(url) else url, **(storage_options or {}))
    if not path.endswith((".parquet", ".jsonl", ".json")):
        raise ValueError(f"prompt file {url} must end in .jsonl or .parquet")
    data = with_retries(lambda: fs.cat_file(path), what=f"reading prompt file {url}")
    digest = hashlib.sha256(data).hexdigest()
    return parse_prompt_file(data, url), digest
