"""Bounds on what a reader accepts from storage, and the local-disk symlink rule.

A corpus is untrusted input: every document a reader parses has a size and a nesting limit, so a
small crafted object cannot make a reader allocate or recurse without bound (see
``docs/storage_format.md``, "Limits"). Exceeding one is corrupt data: a
:class:`~storage_schemas.errors.CorpusFormatError`, which ``train --on-corrupt skip`` skips and
``audit`` reports.

A corpus on a local disk holds plain files: a symbolic link anywhere below the root (a shard, a
record, a directory) is refused rather than followed, since it can point outside the root.
"""

from __future__ import annotations

import os
from typing import Any

#: largest ``<key>.json`` sample metadata member (a sample's index, seed, condition and prompt)
MAX_SAMPLE_JSON_BYTES = 4 << 20
#: largest ``dataset.json`` (a GMM teacher's spec with many components fits easily)
MAX_CARD_BYTES = 16 << 20
#: largest ``commits/<shard_id>.json`` commit record
MAX_COMMIT_BYTES = 1 << 20
#: deepest nesting of arrays/objects in any JSON document of the format (the format itself uses < 10)
MAX_JSON_DEPTH = 64


def json_depth_exceeds(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests arrays/objects deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


class SymlinkRefused(PermissionError):
    """A path below a local corpus root is (or passes through) a symbolic link (a permanent error:
    never retried)."""


def local_symlink_below(root: str, rel: str) -> str | None:
    """The first component of ``root/rel`` below ``root`` that is a symbolic link, or None.

    ``root`` itself may be (or lie under) a link: that is the user's choice of location. Only what
    lies inside the corpus is checked. Missing components are not links (returns None).
    """
    path = root.rstrip("/") or "/"
    for part in [p for p in rel.split("/") if p]:
        path = os.path.join(path, part)
        try:
            if os.path.islink(path):
                return path
        except OSError:
            return None
    return None


def refuse_local_symlink(root: str, rel: str, url: str | None = None) -> None:
    """Raise :class:`SymlinkRefused` (one line, naming the link and its target) if
    :func:`local_symlink_below` finds a link."""
    link = local_symlink_below(root, rel)
    if link is None:
        return
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    where = f"{url.rstrip('/')}/{rel}" if url else link
    raise SymlinkRefused(f"refusing {where}: {link} is a symbolic link (to {target}); a local corpus must hold "
                         "plain files, a link could point outside its root")
