"""Which locations a corpus card or a student file may make us open: the fetch policy of train, eval and audit.

A card (``run.teacher_spec``, ``teacher.config.source.path``) or an exported student's metadata names
where a teacher's weights or a base pipeline are. Those documents come from storage, so they are
input, not instructions: a forged card must not make ``train`` download ``http://`` URLs or another
bucket with the user's credentials, nor open ``/etc/...`` or ``../../``. ``LocationPolicy`` allows a
location only when it lies under the trusted root (the corpus root, or the student's folder) or under
a prefix the user named (``--allow-teacher-location PREFIX``, or the ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS``
environment variable: prefixes separated by ``os.pathsep``, ``:`` on POSIX, as in ``PATH``; a URL's own
``scheme://`` and ``host:port`` colons do not separate); otherwise ``LocationRefused``, one line that
names the location. Pure string and path logic: nothing is opened here.

``check`` returns the NORMALISED location it approved, and callers fetch that value:

- Remote URLs compare by scheme and host (case-insensitive; ``s3a``/``s3n`` are ``s3``, ``gcs`` is ``gs``)
  and by path segment, so ``s3://bucket-evil`` is not under ``s3://bucket`` and ``/ab`` not under ``/a``.
  Object stores read a key literally (``x/../a/net`` is a key outside ``a/``), HTTP clients and servers
  resolve ``..`` and decode ``%2e``/``%2f``: a location whose path reads differently in those ways (a
  ``.`` or ``..`` segment, an empty segment (``//``), a percent-encoded ``.``, ``/``, ``\\`` or ``%``, a
  backslash, a control character) is refused whoever would read it, with the reason; the user's own
  prefixes are resolved. Query strings, fragments, credentials in URLs, chained URLs (``a::b``) and
  ``data:`` URLs are only allowed by an exact allow-list entry.
- Local paths compare by ``os.path.realpath`` (symlinks and ``..`` resolved); a relative path is relative
  to the working directory, as it would be opened. ``file:`` URLs name the path they name by RFC 8089
  (``file:/x``, ``file:///x`` and ``file://localhost/x`` are ``/x``; ``file:x`` is relative); one with
  another host, a query, or percent-encoding is refused. ``~/x`` is approved only when both ``$HOME/x``
  (fsspec's reading) and ``./~/x`` (``open``'s) are. A local path is never under a remote root and vice
  versa.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ALLOW_ENV", "ALLOW_FLAG", "LocationPolicy", "LocationRefused", "allowed_from_env", "is_file_url",
           "is_remote", "local_path", "normalise_location", "split_locations"]

#: environment variable with extra allowed prefixes (separated by ``os.pathsep``), e.g. for a cluster's runtime_env
ALLOW_ENV = "TRAJFLOW_ALLOW_TEACHER_LOCATIONS"
#: the command-line flag of `train` and `eval` that allows a prefix
ALLOW_FLAG = "--allow-teacher-location"

_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
_LOCAL_SCHEMES = ("file", "local")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
#: percent-encodings that change how a path splits or resolves: '.', '/', '\', '%' (double encoding), NUL
_ENCODED = re.compile(r"%(2e|2f|5c|25|00)", re.IGNORECASE)
_FIXES = ("name the location without '.', '..' or empty segments, percent-encoded '.', '/', '\\' or '%', "
          "or backslashes")


class LocationRefused(ValueError):
    """A location named by a corpus card or a student file is outside what the user trusts."""


class _Unusable(ValueError):
    """A location that no allow-list entry but an exact one may approve; the message says why."""


@dataclass(frozen=True)
class _Remote:
    scheme: str  # compared (aliases folded)
    host: str
    segments: tuple[str, ...]
    text: str  # the normalised URL (scheme and host lower-cased, the path as given)


def is_remote(location: str) -> bool:
    """True for ``scheme://`` URLs other than ``file://``/``local://`` (and for chained fsspec URLs)."""
    if "::" in location:
        return True
    m = _SCHEME.match(location)
    return bool(m) and m.group(1).lower() not in _LOCAL_SCHEMES and location[m.end():].startswith("//")


def is_file_url(location: str) -> bool:
    """True for ``file:`` and ``local:`` URLs (any case), which ``local_path`` turns into the path they name."""
    m = _SCHEME.match(location)
    return bool(m) and m.group(1).lower() in _LOCAL_SCHEMES


def _opaque(location: str) -> bool:
    """Chained URLs and ``data:`` URLs: only an exact allow-list entry may approve them."""
    m = _SCHEME.match(location)
    return "::" in location or (bool(m) and m.group(1).lower() == "data")


_URL_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:\[[^\]/]*\]|[^/:\[]*)(?::[0-9]+)?")
_FILE_HEAD = re.compile(r"(?:file|local):", re.IGNORECASE)


def split_locations(text: str, sep: str = os.pathsep) -> list[str]:
    """The locations of an ``os.pathsep``-separated list (never whitespace: a path may hold spaces).

    With ``:`` as the separator, a URL's ``scheme://host:port`` and a leading ``file:``/``local:`` are kept
    whole (``s3://b/a:/opt/m`` is ``s3://b/a`` and ``/opt/m``); entries are stripped, empty ones dropped."""
    if sep != ":":
        parts = text.split(sep)
    else:
        parts, i, n = [], 0, len(text)
        while i <= n:
            m = _URL_HEAD.match(text, i) or _FILE_HEAD.match(text, i)
            j = text.find(sep, m.end() if m else i)
            j = n if j < 0 else j
            parts.append(text[i:j])
            i = j + 1
    return [p.strip() for p in parts if p.strip()]


def allowed_from_env(environ=None) -> tuple[str, ...]:
    """The prefixes in ``TRAJFLOW_ALLOW_TEACHER_LOCATIONS`` (``os.pathsep``-separated; empty when unset)."""
    return tuple(split_locations((environ if environ is not None else os.environ).get(ALLOW_ENV, "")))


# --- local paths ----------------------------------------------------------------------------------


def _file_url_path(location: str) -> str | None:
    """The path a ``file:``/``local:`` URL names (RFC 8089), None for other locations; ``_Unusable`` for
    one that names another host or carries a query, a fragment or percent-encoding."""
    m = _SCHEME.match(location)
    if not m or m.group(1).lower() not in _LOCAL_SCHEMES:
        return None
    if "%" in location or "?" in location or "#" in location:
        raise _Unusable("a file: URL with percent-encoding, a query or a fragment is read differently by "
                        "different openers; name the plain path")
    parts = urlsplit(location)
    if parts.netloc.lower() not in ("", "localhost"):
        raise _Unusable(f"a file: URL naming the host {parts.netloc!r} is not a local path")
    return parts.path


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (ValueError, OSError) as exc:  # an embedded NUL, a symlink loop on some platforms
        raise _Unusable(f"not a usable path ({exc})") from None


def local_path(location: str) -> str:
    """The path a local location names (``file:`` URLs as RFC 8089 reads them, ``~`` expanded), made
    absolute and resolved (``os.path.realpath``). For remote locations, ValueError."""
    if is_remote(location) or _opaque(location):
        raise ValueError(f"{location!r} is not a local path")
    path = _file_url_path(location)
    return _real(os.path.expanduser(location if path is None else path))


def _local_candidates(location: str) -> tuple[str, ...]:
    """Every resolved path a local location may open; all must be allowed."""
    path = _file_url_path(location)
    path = location if path is None else path
    if not path:
        raise _Unusable("an empty path")
    if path.startswith("~"):  # fsspec expands it, open() does not
        return tuple(dict.fromkeys((_real(os.path.expanduser(path)), _real(path))))
    return (_real(path),)


# --- remote URLs ----------------------------------------------------------------------------------


def _remote(url: str, *, strict: bool) -> _Remote:
    """Scheme, host and path segments of a plain remote URL. ``strict`` (a location to approve): a path
    that reads differently literally and resolved/decoded is ``_Unusable``; otherwise (the user's own
    prefix or root) it is resolved."""
    if not url.isprintable() or "\\" in url:
        raise _Unusable("a URL with a backslash or a control character is read differently by different clients")
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise _Unusable("a URL with a query, a fragment or credentials is allowed only by an exact "
                        f"{ALLOW_FLAG} entry")
    scheme, host = parts.scheme.lower(), parts.netloc.lower()
    path = parts.path
    if strict:
        if _ENCODED.search(path):
            raise _Unusable("its path has a percent-encoded '.', '/', '\\' or '%', which servers decode (and "
                            f"may resolve) while object storage does not; {_FIXES}")
        segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
        if segments and segments[-1] == "":
            segments = segments[:-1]  # a trailing slash
        if path and not path.startswith("/") or any(s == "" for s in segments):
            raise _Unusable("its path has an empty path segment ('//'), which object storage keeps in the key "
                            f"and HTTP may collapse; {_FIXES}")
        for s in segments:
            if s.split(";", 1)[0] in (".", ".."):
                raise _Unusable(f"its path has a {s.split(';', 1)[0]!r} segment, which object storage keeps in "
                                f"the key and HTTP resolves, so the allow-list and the fetch would disagree; {_FIXES}")
        text = f"{scheme}://{host}{path}"
    else:
        norm = posixpath.normpath("/" + path) if path else "/"
        segments = [s for s in norm.split("/") if s]
        text = f"{scheme}://{host}{path}"
    return _Remote(_SCHEME_ALIASES.get(scheme, scheme), host, tuple(segments), text)


def _under_segments(loc: tuple[str, ...], root: tuple[str, ...]) -> bool:
    return loc[:len(root)] == root


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def normalise_location(location: str) -> str:
    """The normalised form of a location ``LocationPolicy.check`` returns: a local path resolved (see
    ``local_path``), a remote URL with its scheme and host lower-cased; ``_Unusable`` (a ValueError) for
    a remote URL whose path reads differently literally and resolved. Chained and ``data:`` URLs as given."""
    if _opaque(location):
        return location
    if is_remote(location):
        return _remote(location, strict=True).text
    return local_path(location)


class LocationPolicy:
    """Allows locations under ``root`` (the trusted folder the document came from) or an ``allowed`` prefix.

    ``root_what`` names the root in messages ("the corpus root", "the student's folder"); ``source``
    names who asked ("the corpus's card", "the student file")."""

    def __init__(self, root: str | None, allowed: Iterable[str] = (), *, root_what: str = "the corpus root",
                 source: str = "the corpus's card", use_env: bool = True, hint: str | None = None):
        self.root = root.rstrip("/") if root and root.rstrip("/") else root
        self.allowed = tuple(str(a) for a in allowed if a) + (allowed_from_env() if use_env else ())
        self.root_what, self.source, self.hint = root_what, source, hint

    def _prefixes(self) -> tuple[str, ...]:
        return ((self.root,) if self.root else ()) + self.allowed

    def _approve(self, location: str) -> str:
        """The normalised ``location`` when some prefix holds it; else ``_Unusable`` (with the reason the
        location itself cannot be approved) or LookupError (it is just not under any prefix)."""
        prefixes = self._prefixes()
        if location in prefixes and (_opaque(location) or is_remote(location)):
            return location  # an exact entry (the only way to allow chained or data: URLs, or a query)
        if _opaque(location):
            raise _Unusable(f"a chained or data: URL is allowed only by an exact {ALLOW_FLAG} entry")
        if is_remote(location):
            loc = _remote(location, strict=True)
            for prefix in prefixes:
                if not is_remote(prefix) or _opaque(prefix):
                    continue
                try:
                    pre = _remote(prefix, strict=False)
                except _Unusable:
                    continue
                if (loc.scheme, loc.host) == (pre.scheme, pre.host) and _under_segments(loc.segments, pre.segments):
                    return loc.text
            raise LookupError(location)
        candidates = _local_candidates(location)
        roots = []
        for prefix in prefixes:
            if is_remote(prefix) or _opaque(prefix):
                continue
            try:
                roots.extend(_local_candidates(prefix))
            except _Unusable:
                continue
        if all(any(_under(c, r) for r in roots) for c in candidates):
            return candidates[0]
        raise LookupError(location)

    def allows(self, location: str) -> bool:
        try:
            self._approve(str(location))
        except (_Unusable, LookupError):
            return False
        return bool(location)

    def check(self, location: str, what: str = "a file") -> str:
        """The normalised ``location`` when allowed (fetch or open this value, not the one given); else
        ``LocationRefused`` (one line naming it, and why when the location itself is unusable)."""
        location = str(location)
        reason = None
        if location:
            try:
                return self._approve(location)
            except _Unusable as exc:
                reason = str(exc)
            except LookupError:
                pass
        where = f"{self.root_what} {self.root!r}" if self.root else self.root_what
        shown = shlex.quote(location) if location.isprintable() else "PREFIX"
        hint = self.hint or f"if you trust it, pass {ALLOW_FLAG} {shown} (or a prefix of it)"
        if reason:  # only an exact entry allows such a location
            hint = self.hint or f"if you trust it exactly as written, pass {ALLOW_FLAG} {shown}"
            raise LocationRefused(f"refusing to open {what} at {location!r}: {self.source} names it and {reason}; "
                                  f"{hint}")
        raise LocationRefused(
            f"refusing to open {what} at {location!r}: {self.source} names it and it is not under {where}; {hint}")
