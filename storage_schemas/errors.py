"""Errors raised when bytes on storage do not follow the corpus format.

Every error is a ``ValueError`` (bad data, not a bug in the caller) and derives from
:class:`CorpusFormatError`, so a reader can catch the whole family at once. Messages name the
offending thing: the field, the tensor, the sample key, the tar member, the shard.

The base class itself is raised for bytes that cannot be parsed at all (bad JSON, a truncated or
corrupt tar, a blob that is not Parquet, a corrupt safetensors buffer).
"""

from __future__ import annotations

from collections.abc import Iterable


class CorpusFormatError(ValueError):
    """Base class: the bytes are not a valid piece of a trajflow corpus."""


class UnsupportedSchemaVersion(CorpusFormatError):
    """A document's ``schema_version`` is missing, mistyped or not one this code can read.

    Attributes:
        what: the document, e.g. ``"dataset card (dataset.json)"``.
        found: the value found (``None`` when the field is missing).
        supported: the versions this code reads, ascending.
    """

    def __init__(self, what: str, found: object, supported: Iterable[int]) -> None:
        self.what = what
        self.found = found
        self.supported = tuple(sorted(supported))
        found_text = "no schema_version" if found is None else f"schema_version {found!r}"
        super().__init__(
            f"{what}: {found_text}; this trajflow reads schema_version "
            f"{', '.join(str(v) for v in self.supported)}"
        )

    def __reduce__(self):  # keep the exception transportable between processes (e.g. Ray)
        return (type(self), (self.what, self.found, self.supported))


class SchemaError(CorpusFormatError):
    """A field, tensor or member is missing, unknown, or of the wrong type or value."""


class ShapeMismatchError(CorpusFormatError):
    """A tensor's shape disagrees with the dataset card or with a sibling tensor."""


class NonFiniteError(CorpusFormatError):
    """A tensor holds NaN or +-Inf values."""


class UnsafeMemberError(CorpusFormatError):
    """A tar member that is not part of the format; its payload is never read or decoded.

    Covers unknown suffixes (``.pickle``, ``.pt``, ``.npy``, ``.pyd``...), path traversal (``..``),
    absolute paths, nested paths, links, devices, FIFOs and directories.

    Attributes:
        member: the member name exactly as stored in the tar (or ``<key>.<suffix>``).
        reason: why it is rejected, e.g. ``"symbolic link"``.
        shard_id: the shard it was found in, when known.
    """

    def __init__(self, member: str, reason: str, shard_id: str | None = None) -> None:
        self.member = member
        self.reason = reason
        self.shard_id = shard_id
        where = f"shard {shard_id!r}: " if shard_id is not None else ""
        super().__init__(
            f"{where}unsafe tar member {member!r}: {reason}; it is not part of the format and was not read"
        )

    def __reduce__(self):
        return (type(self), (self.member, self.reason, self.shard_id))
