"""Shard tars: write them byte-identically, read them without trusting them.

A shard is an uncompressed POSIX (ustar) tar in WebDataset layout: for each sample, in the order
given, the members ``<key>.json`` then ``<key>.traj.safetensors`` (TarWriter sorts a sample's
members by suffix). Every header is fixed (mtime 0, uid/gid 0, user/group ``trajflow``, mode
0444), so the same records always give the same bytes: a retried or resumed shard is
byte-identical and its sha256 is a pure function of the run config.

Reading streams the tar with the standard library (``tarfile`` mode ``'r|'``), never extracts
to disk, and checks each member's header before its payload is read: only regular files named
``<key>.<suffix>`` with a valid key and a format suffix are read. Anything else (links, devices,
directories, absolute or ``..`` paths, nested paths, ``.pickle``/``.pt``/``.npy``/... members) is
an :class:`UnsafeMemberError`; the payload is skipped unread. A tar that is cut short, whose
headers are corrupt, or that lacks its end-of-archive marker is a :class:`CorpusFormatError`
naming the shard (the stdlib reader alone silently stops at a bad header or a cut at a member
boundary; this reader does not).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import webdataset

from .errors import CorpusFormatError, SchemaError, UnsafeMemberError
from .record import (
    SAMPLE_MEMBER_SUFFIXES,
    SampleRecord,
    check_record_against_card,
    decode_sample,
    encode_sample,
)

if TYPE_CHECKING:
    from .card import DatasetCard

TAR_USER = "trajflow"
TAR_GROUP = "trajflow"
TAR_MODE = 0o444
TAR_MTIME = 0
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_BLOCK = tarfile.BLOCKSIZE
_KEEP_TAIL = 8 * tarfile.RECORDSIZE  # tarfile's stream reader reads ahead at most one record

ShardData = bytes | bytearray | memoryview | BinaryIO
"""A shard as bytes, or a binary file object positioned at its start (read sequentially)."""


#: largest member a reader accepts (one trajectory's states; 1 GiB is far beyond any real sample)
MAX_MEMBER_BYTES = 1 << 30

def write_shard_bytes(records: Iterable[SampleRecord], card: DatasetCard | None = None) -> bytes:
    """Pack records into a deterministic WebDataset tar.

    Args:
        records: at least one record, unique keys, in the order to store them (the pipeline
            writes ascending index).
        card: when given, every record must agree with it (shape, dtype, sigmas, condition).

    Returns:
        The tar bytes; equal inputs give byte-identical outputs.

    Raises:
        SchemaError: duplicate key, no record, or a record that disagrees with ``card``.
        ShapeMismatchError: a record whose shape disagrees with ``card``.
    """
    buffer = io.BytesIO()
    seen: set[str] = set()
    with webdataset.TarWriter(
        buffer, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False, compress=False,
        format=tarfile.USTAR_FORMAT,  # plain ustar headers: our names are short ASCII, no pax records needed
    ) as writer:
        for record in records:
            if not isinstance(record, SampleRecord):
                raise TypeError(
                    f"write_shard_bytes takes SampleRecord objects, found {type(record).__name__}"
                )
            if record.key in seen:
                raise SchemaError(f"duplicate sample key {record.key!r} in one shard")
            seen.add(record.key)
            if card is not None:
                check_record_against_card(record, card)
            writer.write({"__key__": record.key, **encode_sample(record)})
    if not seen:
        raise SchemaError("a shard holds at least one sample; no records were given")
    return buffer.getvalue()


class _TailRecorder:
    """A read-only stream wrapper remembering the last bytes read, to check the end-of-archive."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.position = 0
        self._tail = bytearray()
        self._tail_start = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self.position += len(chunk)
        self._tail += chunk
        excess = len(self._tail) - _KEEP_TAIL
        if excess > _KEEP_TAIL:
            del self._tail[:excess]
            self._tail_start += excess
        return chunk

    def check_end_of_archive(self, end_offset: int, shard_id: str) -> None:
        """Everything from ``end_offset`` to EOF must be zeros, at least one 512-byte block."""
        if end_offset < self._tail_start:  # cannot happen with tarfile's bounded read-ahead
            raise CorpusFormatError(f"shard {shard_id!r}: cannot verify the end of the tar")
        trailing = bytes(self._tail[end_offset - self._tail_start :])
        header = trailing[:_BLOCK]  # tarfile tried to read one header block here and stopped
        if len(header) < _BLOCK:
            if header.count(0) != len(header):
                raise CorpusFormatError(
                    f"shard {shard_id!r}: truncated tar: a partial member header ({len(header)} bytes) at byte {end_offset}"
                )
            raise CorpusFormatError(
                f"shard {shard_id!r}: truncated tar: no end-of-archive marker after byte {end_offset}"
            )
        if header.count(0) != _BLOCK:
            raise CorpusFormatError(
                f"shard {shard_id!r}: corrupt tar: invalid member header at byte {end_offset}"
            )
        rest = trailing[_BLOCK:]
        while True:
            if rest.count(0) != len(rest):
                raise CorpusFormatError(f"shard {shard_id!r}: non-zero data after the end-of-archive marker")
            rest = self._source.read(1 << 20)
            if not rest:
                return


def _unsafe_reason(info: tarfile.TarInfo) -> str | None:
    """Why a member header is not part of the format, or None if it is ``<key>.<suffix>``."""
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        if info.issym():
            return f"symbolic link (to {info.linkname!r})"
        if info.islnk():
            return f"hard link (to {info.linkname!r})"
        if info.isdir():
            return "directory"
        if info.ischr() or info.isblk():
            return "device file"
        if info.isfifo():
            return "FIFO"
        return f"not a regular file (tar type {info.type!r})"
    name = info.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "path traversal ('..')"
    if "/" in name or "\\" in name:
        return "nested path (shard members are flat '<key>.<suffix>' names)"
    key, dot, suffix = name.partition(".")
    if not dot:
        return "no '.<suffix>'"
    if not _KEY_PATTERN.fullmatch(key):
        return f"invalid sample key {key!r} (ASCII letters, digits, '_' or '-')"
    if suffix not in SAMPLE_MEMBER_SUFFIXES:
        return f"suffix {suffix!r} is not one of {sorted(SAMPLE_MEMBER_SUFFIXES)}"
    return None


def _corrupt(shard_id: str, exc: BaseException) -> CorpusFormatError:
    return CorpusFormatError(f"shard {shard_id!r}: not a readable tar (truncated or corrupt): {exc}")


_TAR_ERRORS = (tarfile.TarError, EOFError, UnicodeError)


def iter_shard_members(
    data: ShardData,
    shard_id: str,
    *,
    collect_unsafe: list[UnsafeMemberError] | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a shard tar safely, yielding ``(key, {suffix: payload})`` per sample in tar order.

    Args:
        data: the shard bytes or a binary file object (read once, sequentially).
        shard_id: names the shard in error messages.
        collect_unsafe: ``None`` (default) raises on the first unsafe member; a list instead
            receives every :class:`UnsafeMemberError` while reading goes on (for auditors).
            Either way the unsafe member's payload is skipped unread.

    Raises:
        UnsafeMemberError: a member outside the format (header checked before the payload).
        SchemaError: a key whose members are not consecutive, or a duplicated member.
        CorpusFormatError: truncated or corrupt tar, or no end-of-archive marker.
    """
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
    recorder = _TailRecorder(source)
    try:
        tar = tarfile.open(fileobj=recorder, mode="r|")
    except _TAR_ERRORS as exc:
        raise _corrupt(shard_id, exc) from None
    seen_keys: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        while True:
            try:
                info = tar.next()
            except _TAR_ERRORS as exc:
                raise _corrupt(shard_id, exc) from None
            if info is None:
                break
            reason = _unsafe_reason(info)
            if reason is not None:
                error = UnsafeMemberError(info.name, reason, shard_id)
                if collect_unsafe is None:
                    raise error
                collect_unsafe.append(error)
                continue
            member_key, _, suffix = info.name.partition(".")
            if member_key != key:
                if key is not None:
                    yield key, members
                if member_key in seen_keys:
                    raise SchemaError(
                        f"shard {shard_id!r}: sample key {member_key!r} appears again after other samples "
                        "(a sample's members must be consecutive)"
                    )
                seen_keys.add(member_key)
                key, members = member_key, {}
            if suffix in members:
                raise SchemaError(f"shard {shard_id!r}: member {info.name!r} appears twice")
            if info.size > MAX_MEMBER_BYTES:  # a forged header must not make readers allocate gigabytes
                raise UnsafeMemberError(info.name, f"declares {info.size} bytes, more than the "
                                        f"{MAX_MEMBER_BYTES}-byte limit for one member", shard_id=shard_id)
            try:
                payload_file = tar.extractfile(info)
                payload = payload_file.read() if payload_file is not None else b""
            except _TAR_ERRORS as exc:
                raise _corrupt(shard_id, exc) from None
            if len(payload) != info.size:
                raise CorpusFormatError(
                    f"shard {shard_id!r}: truncated tar: member {info.name!r} has {len(payload)} of {info.size} bytes"
                )
            members[suffix] = payload
        recorder.check_end_of_archive(tar.offset, shard_id)
        if key is not None:
            yield key, members
    finally:
        tar.close()


def iter_shard_samples(
    data: ShardData,
    shard_id: str,
    card: DatasetCard | None = None,
    *,
    collect_unsafe: list[UnsafeMemberError] | None = None,
) -> Iterator[SampleRecord]:
    """Stream a shard's decoded, validated samples (see :func:`iter_shard_members` and
    :func:`~storage_schemas.record.decode_sample`); errors name the shard and the sample key."""
    for key, members in iter_shard_members(data, shard_id, collect_unsafe=collect_unsafe):
        yield decode_sample(key, members, card, shard_id=shard_id)
