"""Which locations a corpus card or a student file may make us open: the fetch policy of train, eval and audit.

A card (``run.teacher_spec``, ``teacher.config.source.path``) or an exported student's metadata names
where a teacher's weights or a base pipeline are. Those documents come from storage, so they are
input, not instructions: a forged card must not make ``train`` download ``http://`` URLs or another
bucket with the user's credentials, nor open ``/etc/...`` or ``../../``. ``LocationPolicy`` allows a
location only when it lies under the trusted root (the corpus root, or the student's folder) or under
a prefix the user named (``--allow-teacher-location PREFIX``, or the ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS``
environment variable: prefixes separated by whitespace); otherwise ``LocationRefused``, one line that
names the location. Pure string and path logic: nothing is opened here.

Comparison rules: URLs compare by scheme (case-insensitive; ``s3a``/``s3n`` are ``s3``), host and
normalised path (``..`` collapsed), on ``/`` boundaries, so ``s3://bucket-evil`` is not under
``s3://bucket``; query strings, fragments, credentials in URLs and chained URLs (``a::b``) are only
allowed by an exact allow-list entry. Local paths (plain or ``file://``) compare by ``os.path.realpath``
(symlinks and ``..`` resolved); a relative path is relative to the working directory, as it would be
opened. A local path is never under a remote root and vice versa.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["ALLOW_ENV", "ALLOW_FLAG", "LocationPolicy", "LocationRefused", "allowed_from_env", "is_remote"]

#: environment variable with extra allowed prefixes (whitespace-separated), e.g. for a cluster's runtime_env
ALLOW_ENV = "TRAJFLOW_ALLOW_TEACHER_LOCATIONS"
#: the command-line flag of `train` and `eval` that allows a prefix
ALLOW_FLAG = "--allow-teacher-location"

_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}


class LocationRefused(ValueError):
    """A location named by a corpus card or a student file is outside what the user trusts."""


def is_remote(location: str) -> bool:
    """True for ``scheme://`` URLs other than ``file://`` (and for chained fsspec URLs)."""
    return "::" in location or ("://" in location and not location.startswith("file://"))


def allowed_from_env(environ=None) -> tuple[str, ...]:
    """The prefixes in ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS`` (whitespace-separated; empty when unset)."""
    return tuple((environ if environ is not None else os.environ).get(ALLOW_ENV, "").split())


def _local(path: str) -> str:
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.realpath(os.path.expanduser(path))


def _remote_key(url: str) -> tuple[str, str, str] | None:
    """(scheme, host, normalised path) of a plain remote URL; None for URLs only an exact match may allow."""
    if "::" in url:
        return None
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc or "\\" in url:
        return None
    scheme = parts.scheme.lower()
    path = posixpath.normpath("/" + parts.path.lstrip("/")) if parts.path else "/"
    return _SCHEME_ALIASES.get(scheme, scheme), parts.netloc.lower(), path.rstrip("/") or "/"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _within(location: str, prefix: str) -> bool:
    """Whether ``location`` lies under ``prefix`` (both URLs, or both local paths)."""
    if location == prefix:
        return True
    if is_remote(location) != is_remote(prefix):
        return False
    if not is_remote(location):
        return _under(_local(location), _local(prefix))
    loc, pre = _remote_key(location), _remote_key(prefix)
    if loc is None or pre is None:
        return False
    return loc[:2] == pre[:2] and _under(loc[2], pre[2])


class LocationPolicy:
    """Allows locations under ``root`` (the trusted folder the document came from) or an ``allowed`` prefix.

    ``root_what`` names the root in messages ("the corpus root", "the student's folder"); ``source``
    names who asked ("the corpus's card", "the student file")."""

    def __init__(self, root: str | None, allowed: Iterable[str] = (), *, root_what: str = "the corpus root",
                 source: str = "the corpus's card", use_env: bool = True, hint: str | None = None):
        self.root = root.rstrip("/") if root and root.rstrip("/") else root
        self.allowed = tuple(a for a in allowed if a) + (allowed_from_env() if use_env else ())
        self.root_what, self.source, self.hint = root_what, source, hint

    def allows(self, location: str) -> bool:
        if self.root and _within(location, self.root):
            return True
        return any(_within(location, prefix) for prefix in self.allowed)

    def check(self, location: str, what: str = "a file") -> str:
        """``location`` itself when allowed; else ``LocationRefused`` (one line naming it)."""
        location = str(location)
        if not location or not self.allows(location):
            where = f"{self.root_what} {self.root!r}" if self.root else self.root_what
            shown = shlex.quote(location) if location.isprintable() else "PREFIX"
            hint = self.hint or f"if you trust it, pass {ALLOW_FLAG} {shown} (or a prefix of it)"
            raise LocationRefused(
                f"refusing to open {what} at {location!r}: {self.source} names it and it is not under {where}; {hint}")
        return location
