"""Prompt files for prompt-conditioned teachers: JSONL or Parquet with ``prompt_id`` and ``prompt``."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from pipeline.storage import with_retries


def load_prompts(url: str, storage_options: dict[str, Any] | None = None) -> tuple[tuple[tuple[Any, str], ...], str]:
    """Read (prompt_id, prompt) pairs from a .jsonl or .parquet file -> (pairs, sha256 of the file)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **(storage_options or {}))
    if not path.endswith((".parquet", ".jsonl", ".json")):
        raise ValueError(f"prompt file {url} must end in .jsonl or .parquet")
    data = with_retries(lambda: fs.cat_file(path), what=f"reading prompt file {url}")
    digest = hashlib.sha256(data).hexdigest()
    rows: list[dict[str, Any]]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise ValueError(f"prompt file {url} is not a valid Parquet file: {e}") from None
        rows = table.to_pylist()
    elif path.endswith((".jsonl", ".json")):
        rows = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"prompt file {url} line {n} is not valid JSON: {e}") from None
    else:
        raise ValueError(f"prompt file {url} must end in .jsonl or .parquet")
    pairs = []
    seen = set()
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "prompt_id" not in row or "prompt" not in row:
            raise ValueError(f"prompt file {url} row {n} needs the fields prompt_id and prompt")
        pid, text = row["prompt_id"], row["prompt"]
        if not isinstance(text, str) or not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ValueError(f"prompt file {url} row {n}: prompt_id must be a string or int and prompt a string")
        if pid in seen:
            raise ValueError(f"prompt file {url} row {n}: duplicate prompt_id {pid!r}")
        seen.add(pid)
        pairs.append((pid, text))
    if not pairs:
        raise ValueError(f"prompt file {url} holds no prompts")
    return tuple(pairs), digest
