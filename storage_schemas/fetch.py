"""Local copies of remote files (teacher weights and the like), shared by the pipeline and the trainer."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from fsspec.core import url_to_fs

from storage_schemas.retry import with_retries


def fetch_to_local(url: str, cache_dir: str, storage_options: dict[str, Any] | None = None) -> str:
    """A local path for ``url``: local files as they are, remote objects downloaded once into
    ``cache_dir`` (named by a hash of the URL; written to a temporary name, then renamed)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols:
        return path
    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + os.path.basename(path))
    if not os.path.exists(local):
        tmp = f"{local}.part{os.getpid()}"
        with_retries(lambda: fs.get_file(path, tmp), what=f"downloading {url}")
        os.replace(tmp, local)
    return local
