"""Where each object of a corpus lives under its root (pure string operations, no I/O).

::

    <root>/dataset.json                 dataset card
    <root>/shards/<shard_id>.tar        WebDataset tar shards
    <root>/commits/<shard_id>.json      one commit record per verified shard
    <root>/manifest.parquet             one row per committed shard, written at finalize

``root`` is an fsspec URL or a local path (``s3://bucket/corpus``, ``memory://c``, ``/data/c``).
Paths are joined with ``/`` whatever the platform, as fsspec expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SchemaError

DATASET_CARD = "dataset.json"
MANIFEST = "manifest.parquet"
SHARDS_DIR = "shards"
COMMITS_DIR = "commits"
SHARD_SUFFIX = ".tar"
COMMIT_SUFFIX = ".json"

SHARD_ID_DIGITS = 6
_SHARD_ID_PATTERN = re.compile(rf"shard-([0-9]{{{SHARD_ID_DIGITS},}})")


def shard_id(number: int) -> str:
    """The id of shard ``number``: ``shard_id(3) == "shard-000003"`` (more digits past 999999)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"shard number must be a non-negative int, found {number!r}")
    return f"shard-{number:0{SHARD_ID_DIGITS}d}"


def validate_shard_id(value: str) -> str:
    """Check ``value`` is ``shard-`` + at least six digits, as :func:`shard_id` makes; return it.

    Raises:
        SchemaError: naming the id.
    """
    if (
        not isinstance(value, str)
        or not _SHARD_ID_PATTERN.fullmatch(value)
        or shard_id(shard_number(value)) != value
    ):
        raise SchemaError(
            f"invalid shard id {value!r}: expected 'shard-' and a zero-padded number, e.g. 'shard-000003'"
        )
    return value


def shard_number(value: str) -> int:
    """The number in a shard id: ``shard_number("shard-000003") == 3``."""
    match = _SHARD_ID_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise SchemaError(
            f"invalid shard id {value!r}: expected 'shard-' and a zero-padded number, e.g. 'shard-000003'"
        )
    return int(match.group(1))


def shard_relpath(value: str) -> str:
    """Path of a shard relative to the root: ``"shards/shard-000003.tar"``."""
    return f"{SHARDS_DIR}/{validate_shard_id(value)}{SHARD_SUFFIX}"


def commit_relpath(value: str) -> str:
    """Path of a shard's commit record relative to the root: ``"commits/shard-000003.json"``."""
    return f"{COMMITS_DIR}/{validate_shard_id(value)}{COMMIT_SUFFIX}"


def validate_relative_path(path: str) -> str:
    """Check a stored path stays inside the root: relative, '/'-separated, no '..', '.' or empty part.

    A manifest row or commit record can therefore never point a reader outside the corpus.

    Raises:
        SchemaError: naming the path.
    """
    if not isinstance(path, str) or not path:
        raise SchemaError(f"invalid relative path {path!r}: must be a non-empty string")
    if "://" in path or path.startswith("/") or "\\" in path or re.match(r"[A-Za-z]:", path):
        raise SchemaError(f"invalid relative path {path!r}: must be relative to the corpus root")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise SchemaError(f"invalid relative path {path!r}: no empty, '.' or '..' components")
    return path


@dataclass(frozen=True)
class CorpusLayout:
    """The object paths of the corpus rooted at ``root`` (trailing slashes are dropped)."""

    root: str

    def __post_init__(self) -> None:
        if not isinstance(self.root, str):
            raise TypeError(
                f"corpus root must be a str (fsspec URL or path), found {type(self.root).__name__}"
            )
        root = self.root.rstrip("/")
        if not root or root.endswith(":"):
            raise ValueError(f"corpus root {self.root!r} must name a directory below the filesystem root")
        object.__setattr__(self, "root", root)

    def join(self, relpath: str) -> str:
        """``<root>/<relpath>`` for a path validated by :func:`validate_relative_path`."""
        return f"{self.root}/{validate_relative_path(relpath)}"

    @property
    def card_path(self) -> str:
        return self.join(DATASET_CARD)

    @property
    def manifest_path(self) -> str:
        return self.join(MANIFEST)

    @property
    def shards_dir(self) -> str:
        return self.join(SHARDS_DIR)

    @property
    def commits_dir(self) -> str:
        return self.join(COMMITS_DIR)

    def shard_path(self, shard_id: str) -> str:
        return self.join(shard_relpath(shard_id))

    def commit_path(self, shard_id: str) -> str:
        return self.join(commit_relpath(shard_id))

    def relative(self, path: str) -> str:
        """The part of ``path`` below the root: ``relative(layout.shard_path(s)) == shard_relpath(s)``.

        ``path`` may carry the root's protocol or not (``s3://b/c/x`` and ``b/c/x`` both work).

        Raises:
            ValueError: ``path`` is not below the root.
        """
        roots = [self.root]
        if "://" in self.root:  # fsspec listings usually drop the protocol: "bucket/corpus/..."
            roots.append(self.root.split("://", 1)[1])
        for root in roots:
            prefix = root + "/"
            if isinstance(path, str) and path.startswith(prefix) and len(path) > len(prefix):
                return validate_relative_path(path[len(prefix) :])
        raise ValueError(f"path {path!r} is not below the corpus root {self.root!r}")
