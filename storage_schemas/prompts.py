"""Prompt files (the ``--prompts`` of a prompt-conditioned corpus): JSONL or Parquet rows with
``prompt_id`` and ``prompt``. Pure bytes in, pairs out: the generator (``pipeline.prompts``) and the
trainer's OTA mixer (the prompts of online rollouts) read the same file, recorded in the card's
``run.prompts`` (url + sha256), through this one parser."""

from __future__ import annotations

import io
import json
from typing import Any


def parse_prompt_file(data: bytes, url: str) -> tuple[tuple[Any, str], ...]:
    """(prompt_id, prompt) pairs of a prompt file's bytes; ``url`` names the format (.jsonl/.json/.parquet)."""
    path = url.split("?", 1)[0]
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
    return tuple(pairs)
