"""Shard tars: write them byte-identically, read them without trusting them.

A shard is an uncompressed POSIX (ustar) tar in WebDataset layout: for each sample, in the order
given, the members ``<key>.json`` then ``<key>.traj.safetensors`` (a sample's members sorted by suffix,
as WebDataset's TarWriter writes them). Every header is fixed (mtime 0, uid/gid 0, user/group
``trajflow``, mode 0444), so the same records always give the same bytes: a retried or resumed
shard is byte-identical and its sha256 is a pure function of the run config. The writer builds
these plain ustar headers itself (the bytes TarWriter + tarfile write for them, which the tests
check); anything unusual is packed by TarWriter.

Reading streams the tar with the standard library (``tarfile`` mode ``'r|'``), never extracts
to disk, and checks each member's header before its payload is read: only regular files named
``<key>.<suffix>`` with a valid key and a format suffix are read. Anything else (links, devices,
directories, absolute or ``..`` paths, nested paths, ``.pickle``/``.pt``/``.npy``/... members) is
an :class:`UnsafeMemberError`; the payload is skipped unread. A tar that is cut short, whose
headers are corrupt, or that lacks its end-of-archive marker is a :class:`CorpusFormatError`
naming the shard (the stdlib reader alone silently stops at a bad header or a cut at a member
boundary; this reader does not).

A shard held in memory (bytes) is first read by a fast path (:func:`index_shard_members`): one
pass over the raw ustar headers, accepting only what the format writes (regular files with a flat
``<key>.<suffix>`` name, octal sizes, valid checksums, no ustar prefix, consecutive samples,
zero end-of-archive). Anything else, however harmless, is handed to the general reader above over
the same bytes, which then decides: it raises the precise error, or reads a valid but unusual tar
(pax headers, GNU long names, ...). The fast path never yields before the whole shard is checked,
so both paths yield the same samples and raise the same errors.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import webdataset

from .errors import CorpusFormatError, SchemaError, UnsafeMemberError
from .record import (
    SAMPLE_MEMBER_SUFFIXES,
    SampleRecord,
    check_record_against_card,
    decode_sample,
    encode_sample,
    encode_samples,
)

if TYPE_CHECKING:
    import torch

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
    samples: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
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
        samples.append((record.key, encode_sample(record)))
    return _pack_shard(samples)


def write_shard_arrays(
    states: torch.Tensor, sigmas: torch.Tensor, metas: Sequence[Mapping[str, Any]]
) -> bytes:
    """:func:`write_shard_bytes` of ``SampleRecord(sample_key(meta["index"]), states[i], sigmas,
    meta)`` for each ``metas[i]``, from the arrays the solver produced: the same bytes, the same
    checks and errors, with the per-sample work vectorised (see
    :func:`~storage_schemas.record.encode_samples`).

    Args:
        states: [N, K, *sample_shape] in the stored dtype.
        sigmas: [K] float32, the saved sigmas of every sample.
        metas: N metadata dicts, in the order to store them.
    """
    samples = encode_samples(states, sigmas, metas)
    seen: set[str] = set()
    for key, _ in samples:
        if key in seen:
            raise SchemaError(f"duplicate sample key {key!r} in one shard")
        seen.add(key)
    return _pack_shard(samples)


def _header_template() -> tuple[bytes, int]:
    """The ustar header of every member with name, size and checksum blanked (checksum field as
    the 8 spaces the checksum is computed over), and the byte sum of that block."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uname, info.gname = 0, TAR_MTIME, TAR_MODE, TAR_USER, TAR_GROUP
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "ascii", "replace"))
    block[0:100] = bytes(100)
    block[124:136] = bytes(12)
    block[148:156] = b" " * 8
    return bytes(block), sum(block)


_HEADER_TEMPLATE, _HEADER_TEMPLATE_SUM = _header_template()
_HEADER_AFTER_SIZE = _HEADER_TEMPLATE[136:148]
_HEADER_AFTER_CHECKSUM = _HEADER_TEMPLATE[156:]
_PLAIN_MEMBER_NAME = re.compile(r"[A-Za-z0-9_-]+\.(?:json|traj\.safetensors)")
_MAX_PLAIN_SIZE = 8**11 - 1  # the largest size a ustar header holds in octal (no pax record)


def _pack_shard(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The tar that ``webdataset.TarWriter(format=ustar, ...)`` writes for ``samples`` (each
    ``(key, {suffix: payload})``, members in suffix order), byte for byte.

    For the names and sizes the format writes (flat ASCII ``<key>.<suffix>`` of at most 100
    bytes, sizes below 8 GiB) tarfile writes a plain ustar header: that header is built here from a
    template (only name, size and checksum differ between members). Anything else goes through
    TarWriter itself (which then writes pax records).
    """
    if not samples:
        raise SchemaError("a shard holds at least one sample; no records were given")
    members = [(f"{key}.{suffix}", payload[suffix]) for key, payload in samples for suffix in sorted(payload)]
    if not all(len(name) <= 100 and _PLAIN_MEMBER_NAME.fullmatch(name) and len(data) <= _MAX_PLAIN_SIZE
               for name, data in members):
        return _pack_shard_with_tarwriter(samples)
    parts: list[bytes] = []
    offset = 0
    for name, data in members:
        raw_name = name.encode("ascii")
        size_field = b"%011o\0" % len(data)
        checksum = _HEADER_TEMPLATE_SUM + sum(raw_name) + sum(size_field)
        parts += (raw_name, _HEADER_TEMPLATE[len(raw_name):124], size_field, _HEADER_AFTER_SIZE,
                  b"%06o\0 " % checksum, _HEADER_AFTER_CHECKSUM, data)
        padding = -len(data) % _BLOCK
        if padding:
            parts.append(bytes(padding))
        offset += _BLOCK + len(data) + padding
    # end of archive: two zero blocks, then zeros up to a whole record (tarfile.TarFile.close)
    offset += 2 * _BLOCK
    parts.append(bytes(2 * _BLOCK + -offset % tarfile.RECORDSIZE))
    return b"".join(parts)


def _pack_shard_with_tarwriter(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(
        buffer, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False, compress=False,
        format=tarfile.USTAR_FORMAT,
    ) as writer:
        for key, payload in samples:
            writer.write({"__key__": key, **payload})
    return buffer.getvalue()


#: reads past the end of the source tolerated before the tar counts as cut short. tarfile's stream
#: mode skips a member's payload by reading it, block after block, even past the end of the data:
#: a 10 KiB shard whose header claims 1e12 bytes would cost ~1e8 empty reads (minutes). With this
#: bound the time of a read is linear in the bytes actually there, never in a size a header claims.
_MAX_READS_PAST_END = 8


class _TailRecorder:
    """A read-only stream wrapper remembering the last bytes read, to check the end-of-archive, and
    refusing to be read on and on past its end (see :data:`_MAX_READS_PAST_END`)."""

    def __init__(self, source: BinaryIO, shard_id: str = "?") -> None:
        self._source = source
        self._shard_id = shard_id
        self.position = 0
        self._tail = bytearray()
        self._tail_start = 0
        self._reads_past_end = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        if not chunk and size != 0:
            self._reads_past_end += 1
            if self._reads_past_end > _MAX_READS_PAST_END:
                raise CorpusFormatError(
                    f"shard {self._shard_id!r}: truncated tar: a member header declares more data than the shard "
                    f"holds ({self.position} bytes)"
                )
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


MemberSpans = dict[str, tuple[int, int]]
"""A sample's members as ``{suffix: (byte offset of the payload, payload size)}`` in the shard bytes."""

_FAST_NAME = re.compile(rb"([A-Za-z0-9_-]+)\.(json|traj\.safetensors)")
# a tar number field as tarfile's nti reads plain octal: cut at the first NUL, strip whitespace, digits
_FAST_NUMBER = re.compile(rb"[ \t\n\r\x0b\x0c]*([0-7]+)[ \t\n\r\x0b\x0c]*(?:\0[\x00-\xff]*)?")
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
# the header fields other than name [0, 100), size [124, 136) and checksum [148, 156)
_OTHER_FIELDS = ((100, 124), (136, 148), (156, _BLOCK))
assert {m.decode() for m in (b"json", b"traj.safetensors")} == SAMPLE_MEMBER_SUFFIXES


def _plain_fields_ok(header: bytes) -> bool:
    """The header's fields other than name and size parse as tarfile parses them, describe a
    regular file, and carry no ustar name prefix (the format never writes one)."""
    try:
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return info.type in _REGULAR_TYPES and header[345] == 0


_OCTAL_DIGITS = np.arange(ord("0"), ord("8"))
_KEY_BYTES = np.zeros(256, dtype=bool)
_KEY_BYTES[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", dtype=np.uint8)] = True


def _octal_fields(headers: np.ndarray, start: int, digits: int) -> np.ndarray | None:
    """The octal numbers of a field written as tarfile writes it (``digits`` octal digits, then NUL)
    in every header row, or None if any row has another form."""
    field = headers[:, start : start + digits]
    if not (((field >= 0x30) & (field <= 0x37)).all() and (headers[:, start + digits] == 0).all()):
        return None
    weights = 8 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    return (field.astype(np.int64) - 0x30) @ weights


def _uniform_spans(data: bytes | bytearray) -> list[tuple[str, MemberSpans]] | None:
    """:func:`_fast_spans` for a shard laid out as the pipeline writes it, vectorised over all headers:
    two members per sample whose padded sizes are the same in every sample (so headers sit at a fixed
    stride), number fields as tarfile writes them, every other header field equal to the first
    header's. Gives exactly :func:`_fast_spans`'s result, or None (anything else: the loop decides)."""
    total = len(data)
    if total % _BLOCK or total < 3 * _BLOCK:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    blocks = buf.reshape(-1, _BLOCK)
    first: list[tuple[int, bytes, bytes, int]] = []  # (offset, key, suffix, size) of the first two headers
    offset = 0
    for _ in range(2):
        if offset + _BLOCK > total:
            return None
        nul = data.find(b"\0", offset, offset + 100)
        name = _FAST_NAME.fullmatch(data, offset, offset + 100 if nul < 0 else nul)
        size = _FAST_NUMBER.fullmatch(data, offset + 124, offset + 136)
        if name is None or size is None or nul < 0:
            return None
        first.append((offset, bytes(name.group(1)), bytes(name.group(2)), int(size.group(1), 8)))
        offset += _BLOCK + -(-first[-1][3] // _BLOCK) * _BLOCK
    (_, key_a, suffix_a, size_a), (offset_b, key_b, suffix_b, size_b) = first
    if key_a != key_b or suffix_a == suffix_b or not _plain_fields_ok(bytes(data[:_BLOCK])):
        return None
    stride = offset  # bytes per sample
    # samples: header A at k*stride while that block is not the zero end-of-archive block
    starts = np.arange(0, total - _BLOCK + 1, stride, dtype=np.int64)
    nonzero = blocks[starts // _BLOCK].any(axis=1)
    count = int(np.argmin(nonzero)) if not nonzero.all() else len(starts)
    end = count * stride
    if count == 0 or end + _BLOCK > total or buf[end:].any():
        return None
    starts = starts[:count]
    heads_a, heads_b = blocks[starts // _BLOCK], blocks[(starts + offset_b) // _BLOCK]
    headers = np.concatenate([heads_a, heads_b])
    # every field but name, size and checksum equal to the first header's (which tarfile accepted)
    for a, b in _OTHER_FIELDS:
        if not (headers[:, a:b] == headers[0, a:b]).all():
            return None
    # names: the same key (fixed length, key characters) in both members, then ".suffix" and a NUL
    length = len(key_a)
    keys = heads_a[:, :length]
    if not (_KEY_BYTES[keys].all() and (heads_b[:, :length] == keys).all()):
        return None
    for heads, suffix in ((heads_a, suffix_a), (heads_b, suffix_b)):
        tail = np.frombuffer(b"." + suffix + b"\0", dtype=np.uint8)
        if not (heads[:, length : length + len(tail)] == tail).all():
            return None
    if len(np.unique(keys.view(np.dtype((np.void, length))))) != count:
        return None  # a repeated key: the loop says why
    sizes = _octal_fields(headers, 124, 11)
    checksums = _octal_fields(headers, 148, 6)
    if sizes is None or checksums is None or int(sizes.max()) > MAX_MEMBER_BYTES:
        return None
    sizes_a, sizes_b = sizes[:count], sizes[count:]
    if ((-(-sizes_a // _BLOCK)) != -(-size_a // _BLOCK)).any() or ((-(-sizes_b // _BLOCK)) != -(-size_b // _BLOCK)).any():
        return None  # a member of another padded size: headers are not at the stride
    unsigned = 256 + headers[:, :148].sum(axis=1, dtype=np.int64) + headers[:, 156:].sum(axis=1, dtype=np.int64)
    if (unsigned != checksums).any():
        return None
    names = keys.tobytes().decode("ascii")
    sa, sb = suffix_a.decode("ascii"), suffix_b.decode("ascii")
    return [(names[k * length : (k + 1) * length], {sa: (a + _BLOCK, za), sb: (a + offset_b + _BLOCK, zb)})
            for k, (a, za, zb) in enumerate(zip(starts.tolist(), sizes_a.tolist(), sizes_b.tolist()))]


def _fast_spans(data: bytes) -> list[tuple[str, MemberSpans]] | None:
    """Index a shard in one pass over its raw headers, or None if anything is unusual.

    Accepts only: regular-file headers with a valid checksum, a flat ``<key>.<suffix>`` name of
    the format, an octal size within :data:`MAX_MEMBER_BYTES` whose payload (and padding) is
    present; samples whose members are consecutive and not repeated; and a zero block followed by
    nothing but zeros. These are exactly the conditions under which the general reader accepts the
    tar without error, so for an accepted shard both give the same samples. Nothing is yielded or
    raised here: on None the caller runs the general reader, which raises the precise error.
    """
    uniform = _uniform_spans(data)
    if uniform is not None:
        return uniform
    size_of_data = len(data)
    samples: list[tuple[str, MemberSpans]] = []
    seen: set[str] = set()
    other: tuple[bytes, ...] | None = None  # the other fields of the last header checked with tarfile
    header_offsets: list[int] = []
    stored_checksums: list[int] = []
    key: str | None = None
    members: MemberSpans = {}
    name_match, number_match = _FAST_NAME.fullmatch, _FAST_NUMBER.fullmatch
    offset = 0
    while True:
        if offset + _BLOCK > size_of_data:
            return None  # cut short: no header (or no end-of-archive marker) here
        if data.startswith(_ZERO_BLOCK, offset):  # end of archive: only zeros may follow
            if not samples or data.count(0, offset) != size_of_data - offset:
                return None
            break
        nul = data.find(b"\0", offset, offset + 100)
        name = name_match(data, offset, offset + 100 if nul < 0 else nul)
        size = number_match(data, offset + 124, offset + 136)
        checksum = number_match(data, offset + 148, offset + 156)
        if name is None or size is None or checksum is None:
            return None
        size = int(size.group(1), 8)
        if size > MAX_MEMBER_BYTES:
            return None
        if other is None or not (data.startswith(other[0], offset + 100) and data.startswith(other[1], offset + 136)
                                 and data.startswith(other[2], offset + 156)):
            header = data[offset : offset + _BLOCK]
            if not _plain_fields_ok(header):
                return None
            other = tuple(header[a:b] for a, b in _OTHER_FIELDS)
        member_key, suffix = name.group(1).decode("ascii"), name.group(2).decode("ascii")
        if member_key != key:
            if member_key in seen:
                return None
            seen.add(member_key)
            key, members = member_key, {}
            samples.append((key, members))
        if suffix in members:
            return None
        members[suffix] = (offset + _BLOCK, size)
        header_offsets.append(offset)
        stored_checksums.append(int(checksum.group(1), 8))
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
    # checksums of all headers at once: 256 + the sum of every byte but the checksum field's 8
    raw = np.frombuffer(data, dtype=np.uint8)
    blocks = raw[np.asarray(header_offsets, dtype=np.int64)[:, None] + np.arange(_BLOCK)]
    unsigned = 256 + blocks[:, :148].sum(axis=1, dtype=np.int64) + blocks[:, 156:].sum(axis=1, dtype=np.int64)
    for i in np.flatnonzero(unsigned != np.asarray(stored_checksums, dtype=np.int64)).tolist():
        # tarfile also accepts the signed-byte sum some old tars wrote
        if stored_checksums[i] not in tarfile.calc_chksums(data[header_offsets[i] : header_offsets[i] + _BLOCK]):
            return None
    return samples


def _stream_members(
    source: BinaryIO,
    shard_id: str,
    collect_unsafe: list[UnsafeMemberError] | None,
) -> Iterator[tuple[str, dict[str, bytes], MemberSpans]]:
    """The general reader (tarfile, streaming): ``(key, {suffix: payload}, {suffix: span})``."""
    recorder = _TailRecorder(source, shard_id)
    try:
        tar = tarfile.open(fileobj=recorder, mode="r|")
    except _TAR_ERRORS as exc:
        raise _corrupt(shard_id, exc) from None
    seen_keys: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    spans: MemberSpans = {}
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
                    yield key, members, spans
                if member_key in seen_keys:
                    raise SchemaError(
                        f"shard {shard_id!r}: sample key {member_key!r} appears again after other samples "
                        "(a sample's members must be consecutive)"
                    )
                seen_keys.add(member_key)
                key, members, spans = member_key, {}, {}
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
            spans[suffix] = (info.offset_data, info.size)
        recorder.check_end_of_archive(tar.offset, shard_id)
        if key is not None:
            yield key, members, spans
    finally:
        tar.close()


def index_shard_members(data: bytes | bytearray | memoryview, shard_id: str) -> list[tuple[str, MemberSpans]]:
    """Check a whole shard held in memory and say where each sample's payloads lie in it.

    Applies every check of :func:`iter_shard_members` (unsafe members raise; truncation, corrupt
    headers, a missing end-of-archive marker, non-consecutive or repeated members) to the whole
    shard before returning, in one fast pass over the headers for the tars the format writes.

    Returns:
        ``[(key, {suffix: (offset, size)}), ...]`` in tar order; ``data[offset:offset + size]``
        is the member's payload.

    Raises:
        UnsafeMemberError, SchemaError, CorpusFormatError: as :func:`iter_shard_members`.
    """
    if not isinstance(data, bytes | bytearray):  # the fast path reads bytes and bytearrays alike
        data = bytes(data)
    spans = _fast_spans(data)
    if spans is not None:
        return spans
    return [(key, where) for key, _, where in _stream_members(io.BytesIO(data), shard_id, None)]


def iter_shard_members(
    data: ShardData,
    shard_id: str,
    *,
    collect_unsafe: list[UnsafeMemberError] | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a shard tar safely, yielding ``(key, {suffix: payload})`` per sample in tar order.

    Args:
        data: the shard bytes (checked whole by the fast path of :func:`index_shard_members`
            first, then sliced) or a binary file object (read once, sequentially, by the general
            reader: memory stays at one member).
        shard_id: names the shard in error messages.
        collect_unsafe: ``None`` (default) raises on the first unsafe member; a list instead
            receives every :class:`UnsafeMemberError` while reading goes on (for auditors).
            Either way the unsafe member's payload is skipped unread.

    Raises:
        UnsafeMemberError: a member outside the format (header checked before the payload).
        SchemaError: a key whose members are not consecutive, or a duplicated member.
        CorpusFormatError: truncated or corrupt tar, or no end-of-archive marker.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        data = data if isinstance(data, bytes) else bytes(data)
        spans = _fast_spans(data)  # a shard the fast path accepts has no unsafe member to collect
        if spans is not None:
            for key, where in spans:
                yield key, {suffix: data[offset : offset + size] for suffix, (offset, size) in where.items()}
            return
        data = io.BytesIO(data)
    for key, members, _ in _stream_members(data, shard_id, collect_unsafe):
        yield key, members


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
