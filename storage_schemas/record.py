"""The sample record: one trajectory, stored as two tar members.

On storage a sample with key ``0000000042`` is the pair of tar members

- ``0000000042.traj.safetensors``: tensors ``states`` [K, *sample_shape] (card dtype) and
  ``sigmas`` [K] float32, the saved sigmas strictly decreasing (``states[k]`` is the solver
  state at ``sigmas[k]``; ``states[0]`` is the noise at sigma 1, ``states[-1]`` the data at 0);
- ``0000000042.json``: metadata, at least ``index`` (int), ``seed`` (int), ``guidance`` (float)
  and the condition: ``class_id`` (int) or ``prompt_id`` (int or str) and/or ``prompt`` (str).

Keys are ``sample_key(index)``: the zero-padded global index. WebDataset splits a member name at
the first dot of its basename, so a key never contains a dot or a slash.

Decoding never runs code from the data: safetensors and JSON only, and a member with any other
suffix is rejected with :class:`UnsafeMemberError` without being looked at.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch

from ._fields import (
    MAX_SEED,
    canonical_json,
    expect_dict,
    expect_float,
    expect_int,
    expect_str,
    parse_json_object,
)
from .card import SIGMA_TOLERANCE
from .errors import CorpusFormatError, NonFiniteError, SchemaError, ShapeMismatchError, UnsafeMemberError
from .limits import MAX_SAMPLE_JSON_BYTES, json_depth_exceeds

if TYPE_CHECKING:
    from .card import DatasetCard

TRAJ_MEMBER = "traj.safetensors"
"""Suffix of the tensor member: ``<key>.traj.safetensors``."""
META_MEMBER = "json"
"""Suffix of the metadata member: ``<key>.json``."""
SAMPLE_MEMBER_SUFFIXES = frozenset({TRAJ_MEMBER, META_MEMBER})
"""The only member suffixes of the format; every sample has exactly these two."""

STATES_TENSOR = "states"
SIGMAS_TENSOR = "sigmas"
SAMPLE_TENSORS = frozenset({STATES_TENSOR, SIGMAS_TENSOR})

KEY_DIGITS = 10
MAX_INDEX = 10**KEY_DIGITS - 1
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Card dtype name -> torch dtype of ``states``."""
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

META_REQUIRED_FIELDS = ("index", "seed", "guidance")


def sample_key(index: int) -> str:
    """The key of the sample with global index ``index``: ten zero-padded digits, e.g. ``"0000000042"``."""
    expect_int(index, where="sample_key", field="index", minimum=0, maximum=MAX_INDEX)
    return f"{index:0{KEY_DIGITS}d}"


def validate_key(key: str) -> str:
    """Check a sample key is non-empty ASCII ``[A-Za-z0-9_-]`` (no '.', no '/', no '..'); return it.

    Raises:
        SchemaError: naming the key.
    """
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise SchemaError(
            f"invalid sample key {key!r}: a key is non-empty ASCII letters, digits, '_' or '-' "
            "(WebDataset splits member names at the first '.')"
        )
    return key


def _where(key: str, shard_id: str | None) -> str:
    return f"sample {key!r}" + (f" in shard {shard_id!r}" if shard_id is not None else "")


def _is_plain_flat_json(meta: dict[str, Any]) -> bool:
    """True when a dict fresh from ``json.loads`` is already what the JSON round trip of
    :func:`expect_dict` would return: sorted keys, scalar values, no non-finite float."""
    keys = list(meta)
    if keys != sorted(keys):
        return False
    for value in meta.values():
        if isinstance(value, float):
            if not math.isfinite(value):
                return False
        elif not (value is None or isinstance(value, str | int)):  # bool is an int
            return False
    return True


def _checked_meta(meta: Any, *, where: str, from_json: bool = False) -> dict[str, Any]:
    """Validate sample metadata; returns it normalised through JSON (plain dict, guidance float).

    ``from_json``: ``meta`` is a fresh result of ``json.loads`` (decoding); the JSON round trip is
    then skipped when it could not change anything (see :func:`_is_plain_flat_json`).
    """
    where = f"{where} metadata (.json)"
    if not (from_json and isinstance(meta, dict) and _is_plain_flat_json(meta)):
        meta = expect_dict(meta, where=where, field="<root>")
    for name in META_REQUIRED_FIELDS:
        if name not in meta:
            raise SchemaError(f"{where}: missing field {name!r}")
    expect_int(meta["index"], where=where, field="index", minimum=0, maximum=MAX_INDEX)
    expect_int(meta["seed"], where=where, field="seed", minimum=0, maximum=MAX_SEED)
    meta["guidance"] = expect_float(meta["guidance"], where=where, field="guidance")
    if "class_id" in meta:
        expect_int(meta["class_id"], where=where, field="class_id", minimum=0)
    if "prompt_id" in meta and not isinstance(meta["prompt_id"], str):
        expect_int(meta["prompt_id"], where=where, field="prompt_id", minimum=0)
    if "prompt" in meta:
        expect_str(meta["prompt"], where=where, field="prompt", nonempty=False)
    return meta


def _validated_meta(key: str, meta: Any, where: str, *, from_json: bool) -> dict[str, Any]:
    """The key and metadata checks of a record; returns the normalised metadata."""
    validate_key(key)
    meta = _checked_meta(meta, where=where, from_json=from_json)
    if key != sample_key(meta["index"]):
        raise SchemaError(
            f"{where}: key must be sample_key(index) = {sample_key(meta['index'])!r} for index {meta['index']}"
        )
    return meta


@dataclass(frozen=True, eq=False)
class SampleRecord:
    """One stored trajectory.

    Attributes:
        key: ``sample_key(meta["index"])``.
        states: [K, *sample_shape] tensor, float32 | float16 | bfloat16, all finite; ``states[k]``
            is the teacher's solver state at ``sigmas[k]``.
        sigmas: [K] float32, strictly decreasing, in [0, 1] (sequences are converted).
        meta: JSON metadata: ``index``, ``seed``, ``guidance`` and the condition
            (``class_id`` | ``prompt_id``/``prompt``); more plain-JSON fields are allowed.

    Raises (on construction):
        SchemaError, ShapeMismatchError, NonFiniteError: naming the key and the field.
    """

    key: str
    states: torch.Tensor
    sigmas: torch.Tensor
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self._validate(meta_from_json=False)

    def _validate(self, *, meta_from_json: bool) -> None:
        where = _where(self.key, None)
        object.__setattr__(self, "meta", _validated_meta(self.key, self.meta, where, from_json=meta_from_json))
        states = self.states
        if not isinstance(states, torch.Tensor):
            raise SchemaError(f"{where}: 'states' must be a torch.Tensor, found {type(states).__name__}")
        if states.dtype not in _DTYPE_NAMES:
            raise SchemaError(
                f"{where}: 'states' dtype must be one of {sorted(TORCH_DTYPES)}, found {states.dtype}"
            )
        if states.ndim < 2 or states.shape[0] < 2:
            raise ShapeMismatchError(
                f"{where}: 'states' must have shape [K, *sample_shape] with K >= 2, found {list(states.shape)}"
            )
        sigmas = self.sigmas
        if not isinstance(sigmas, torch.Tensor):
            sigmas = torch.tensor(list(sigmas), dtype=torch.float32)
        elif sigmas.dtype != torch.float32:
            if not sigmas.dtype.is_floating_point:
                raise SchemaError(f"{where}: 'sigmas' must be float32, found {sigmas.dtype}")
            sigmas = sigmas.to(torch.float32)
        object.__setattr__(self, "sigmas", sigmas)
        if sigmas.ndim != 1 or sigmas.shape[0] != states.shape[0]:
            raise ShapeMismatchError(
                f"{where}: 'sigmas' must have shape [K] = [{states.shape[0]}] to match 'states' "
                f"{list(states.shape)}, found {list(sigmas.shape)}"
            )
        values = sigmas.tolist()
        if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in values):
            raise SchemaError(f"{where}: 'sigmas' must be finite and in [0, 1], found {values}")
        if any(not values[i] < values[i - 1] for i in range(1, len(values))):
            raise SchemaError(f"{where}: 'sigmas' must be strictly decreasing, found {values}")
        # a finite sum means every value is finite (NaN and +-Inf propagate); a non-finite sum may
        # also be an overflow, so only then are the values checked one by one
        if states.numel() and math.isfinite(states.sum().item()):
            return
        finite = torch.isfinite(states)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteError(
                f"{where}: 'states' holds {bad} non-finite value(s) (NaN/Inf) out of {states.numel()}"
            )

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def guidance(self) -> float:
        return float(self.meta["guidance"])

    @property
    def dtype_name(self) -> str:
        """The card dtype name of ``states``, e.g. ``"bfloat16"``."""
        return _DTYPE_NAMES[self.states.dtype]


def _record_from_json(key: str, states: torch.Tensor, sigmas: torch.Tensor, meta: dict[str, Any]) -> SampleRecord:
    """``SampleRecord(key, states, sigmas, meta)`` for ``meta`` fresh from ``json.loads``: the same
    checks, without a JSON round trip of metadata that is already plain JSON."""
    record = object.__new__(SampleRecord)
    for name, value in (("key", key), ("states", states), ("sigmas", sigmas), ("meta", meta)):
        object.__setattr__(record, name, value)
    record._validate(meta_from_json=True)
    return record


def encode_sample(record: SampleRecord) -> dict[str, bytes]:
    """Serialise a record to its tar members (suffix -> bytes); deterministic for equal records.

    Returns:
        ``{"traj.safetensors": <safetensors with states, sigmas>, "json": <canonical UTF-8 JSON>}``.
    """
    tensors = {
        STATES_TENSOR: record.states.detach().cpu().contiguous(),
        SIGMAS_TENSOR: record.sigmas.detach().cpu().contiguous(),
    }
    return {
        TRAJ_MEMBER: safetensors.torch.save(tensors),
        META_MEMBER: canonical_json(record.meta).encode("utf-8"),
    }


def encode_samples(
    states: torch.Tensor, sigmas: torch.Tensor | Sequence[float], metas: Sequence[Mapping[str, Any]]
) -> list[tuple[str, dict[str, bytes]]]:
    """:func:`encode_sample` of a whole shard given as arrays, with the tensor work vectorised.

    The result, validation and errors are exactly those of building
    ``SampleRecord(sample_key(meta["index"]), states[i], sigmas, meta)`` for every ``metas[i]`` in
    order and encoding each: ``[(key, {suffix: bytes}), ...]``, byte-identical. The common case (a
    supported dtype, shared float32 ``sigmas``, plain metadata) is checked once per shard (sigma
    values, finite states) plus each sample's metadata, and serialised from one contiguous buffer
    (one safetensors layout, made by safetensors itself for the first sample and checked against
    it). Anything else, including any failed check, takes the per-record path, which raises the
    precise error. ``metas`` are not modified.

    Args:
        states: [N, K, *sample_shape] (float32 | float16 | bfloat16).
        sigmas: [K] float32, shared by every sample.
        metas: N metadata dicts (``index``, ``seed``, ``guidance``, condition, ...).
    """
    fast = _encode_samples_fast(states, sigmas, metas)
    if fast is not None:
        return fast
    if not isinstance(states, torch.Tensor) or states.ndim < 1 or len(states) != len(metas):
        raise ShapeMismatchError(
            f"states {list(getattr(states, 'shape', []))} must have one row per metadata dict ({len(metas)})"
        )
    out = []
    for i, meta in enumerate(metas):
        record = SampleRecord(sample_key(meta["index"]), states[i], sigmas, meta)
        out.append((record.key, encode_sample(record)))
    return out


def _plain_str_keyed(meta: Any) -> bool:
    """True when ``meta`` is a dict of str keys and plain scalar values (str, int, bool, finite
    float, None; exact types): its JSON round trip would only sort its keys."""
    if type(meta) is not dict:
        return False
    for key, value in meta.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return False
        elif not (kind is int or kind is str or kind is bool or value is None):
            return False
    return True


def _encode_samples_fast(
    states: Any, sigmas: Any, metas: Sequence[Mapping[str, Any]]
) -> list[tuple[str, dict[str, bytes]]] | None:
    """The common case of :func:`encode_samples`, or None where the per-record path must decide."""
    count = len(metas)
    if not (isinstance(states, torch.Tensor) and isinstance(sigmas, torch.Tensor) and sys.byteorder == "little"):
        return None
    if not (states.dtype in _DTYPE_NAMES and states.device.type == "cpu" and not states.requires_grad
            and states.ndim >= 3 and states.shape[0] == count and count > 0 and states.shape[1] >= 2
            and states.numel() > 0):
        return None
    if not (sigmas.dtype == torch.float32 and sigmas.device.type == "cpu" and not sigmas.requires_grad
            and sigmas.ndim == 1 and sigmas.shape[0] == states.shape[1]):
        return None
    # the sigma and state checks of SampleRecord, once for the shard
    values = sigmas.tolist()
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in values):
        return None
    if any(not values[i] < values[i - 1] for i in range(1, len(values))):
        return None
    states = states.contiguous()
    if not bool(torch.isfinite(states).all()):
        return None
    # metadata: the checks of SampleRecord, per sample (on a copy: metas are the caller's)
    keys, texts = [], []
    try:
        for meta in metas:
            if not isinstance(meta, Mapping) or "index" not in meta:
                return None
            key = sample_key(meta["index"])
            where = _where(key, None)
            if _plain_str_keyed(meta):
                checked = _validated_meta(key, dict(sorted(meta.items())), where, from_json=True)
            else:
                checked = _validated_meta(key, meta, where, from_json=False)
            keys.append(key)
            texts.append(canonical_json(checked).encode("utf-8"))
    except (CorpusFormatError, ValueError, TypeError, KeyError, UnicodeError):
        return None
    # safetensors: one layout for every sample (same shapes and dtypes); safetensors writes the first
    sigmas = sigmas.contiguous()
    template = safetensors.torch.save({STATES_TENSOR: states[0], SIGMAS_TENSOR: sigmas})
    layout = _safetensors_layout(template)
    if layout is None:
        return None
    try:
        header = json.loads(layout[8:])
        spans = sorted((header[name]["data_offsets"], name) for name in SAMPLE_TENSORS)
    except (ValueError, TypeError, KeyError):
        return None
    rows = states.view(count, -1).view(torch.uint8).numpy()
    sigma_bytes = sigmas.view(torch.uint8).numpy().tobytes()
    expected_begin = 0
    for (begin, end), name in spans:
        size = rows.shape[1] if name == STATES_TENSOR else len(sigma_bytes)
        if begin != expected_begin or end - begin != size:
            return None
        expected_begin = end
    states_first = spans[0][1] == STATES_TENSOR
    if len(template) != len(layout) + expected_begin:
        return None

    def traj(i: int) -> bytes:
        row = rows[i].tobytes()
        return b"".join((layout, row, sigma_bytes) if states_first else (layout, sigma_bytes, row))

    if traj(0) != template:  # the layout must give exactly what safetensors wrote
        return None
    out = [(keys[0], {META_MEMBER: texts[0], TRAJ_MEMBER: template})]
    out += [(keys[i], {META_MEMBER: texts[i], TRAJ_MEMBER: traj(i)}) for i in range(1, count)]
    return out


def check_record_against_card(
    record: SampleRecord, card: DatasetCard, *, shard_id: str | None = None
) -> None:
    """Check a record agrees with the dataset card: shape, dtype, saved sigmas, condition, guidance.

    Raises:
        ShapeMismatchError: ``states.shape != [len(card.saved_sigmas), *card.sample_shape]``.
        SchemaError: dtype, sigma values, condition or guidance disagree with the card.
    """
    where = _where(record.key, shard_id)
    if tuple(record.states.shape) != card.states_shape:
        raise ShapeMismatchError(
            f"{where}: 'states' shape {list(record.states.shape)} does not match the card's "
            f"[len(saved_sigmas), *sample_shape] = {list(card.states_shape)}"
        )
    if record.dtype_name != card.dtype:
        raise SchemaError(
            f"{where}: 'states' dtype {record.dtype_name} does not match the card's dtype {card.dtype}"
        )
    for k, (stored, expected) in enumerate(zip(record.sigmas.tolist(), card.saved_sigmas)):
        if abs(stored - expected) > SIGMA_TOLERANCE:
            raise SchemaError(
                f"{where}: 'sigmas[{k}]' = {stored!r} does not match the card's saved_sigmas[{k}] = {expected!r} "
                f"(tolerance {SIGMA_TOLERANCE})"
            )
    _check_meta_against_card(record.meta, card, where)


def _check_meta_against_card(meta: dict[str, Any], card: DatasetCard, where: str) -> None:
    """The metadata part of :func:`check_record_against_card` (condition, guidance)."""
    meta_where = f"{where} metadata (.json)"
    conditioning = card.conditioning
    if conditioning.kind == "class":
        if "class_id" not in meta:
            raise SchemaError(f"{meta_where}: missing field 'class_id' (the card's conditioning is 'class')")
        assert conditioning.num_classes is not None
        expect_int(
            meta["class_id"],
            where=meta_where,
            field="class_id",
            minimum=0,
            maximum=conditioning.num_classes - 1,
        )
    elif conditioning.kind == "prompt" and "prompt_id" not in meta and "prompt" not in meta:
        raise SchemaError(
            f"{meta_where}: missing field 'prompt_id' or 'prompt' (the card's conditioning is 'prompt')"
        )
    guidance = float(meta["guidance"])
    if not card.solver.guidance_allows(guidance):
        raise SchemaError(
            f"{meta_where}: field 'guidance' = {guidance} is not allowed by the card's solver.guidance "
            f"{card.solver.to_dict()['guidance']}"
        )


def decode_sample(
    key: str,
    members: Mapping[str, bytes],
    card: DatasetCard | None = None,
    *,
    shard_id: str | None = None,
) -> SampleRecord:
    """Decode and validate one sample from its tar members.

    Args:
        key: the sample key (member names are ``<key>.<suffix>``).
        members: suffix -> payload bytes, e.g. ``{"traj.safetensors": b"...", "json": b"..."}``.
        card: when given, the record must also agree with it (see :func:`check_record_against_card`).
        shard_id: named in error messages when given.

    Raises:
        UnsafeMemberError: a member suffix outside the format (checked first; never decoded).
        SchemaError: missing member, unknown/missing tensor, wrong dtype, bad metadata, card mismatch.
        ShapeMismatchError: inconsistent shapes, or shapes that disagree with the card.
        NonFiniteError: NaN/Inf in ``states``.
        CorpusFormatError: a payload that cannot be parsed at all.
    """
    validate_key(key)
    where = _where(key, shard_id)
    for suffix in sorted(members):
        if suffix not in SAMPLE_MEMBER_SUFFIXES:
            raise UnsafeMemberError(
                f"{key}.{suffix}",
                f"suffix {suffix!r} is not one of {sorted(SAMPLE_MEMBER_SUFFIXES)}",
                shard_id,
            )
    for suffix in sorted(SAMPLE_MEMBER_SUFFIXES):
        if suffix not in members:
            raise SchemaError(f"{where}: missing member {key + '.' + suffix!r}")
    meta = parse_json_object(bytes(members[META_MEMBER]), where=f"{where} metadata (.json)",
                             max_bytes=MAX_SAMPLE_JSON_BYTES)
    try:
        tensors = safetensors.torch.load(bytes(members[TRAJ_MEMBER]))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/buffers
        raise CorpusFormatError(
            f"{where}: {key}.{TRAJ_MEMBER} is not a valid safetensors buffer: {exc}"
        ) from None
    names = set(tensors)
    if names != SAMPLE_TENSORS:
        missing, unknown = sorted(SAMPLE_TENSORS - names), sorted(names - SAMPLE_TENSORS)
        raise SchemaError(
            f"{where}: {key}.{TRAJ_MEMBER} must hold exactly tensors {sorted(SAMPLE_TENSORS)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    if tensors[SIGMAS_TENSOR].dtype != torch.float32:
        raise SchemaError(
            f"{where}: 'sigmas' must be stored as float32, found {tensors[SIGMAS_TENSOR].dtype}"
        )
    try:
        record = _record_from_json(key, tensors[STATES_TENSOR], tensors[SIGMAS_TENSOR], meta)
    except (SchemaError, ShapeMismatchError, NonFiniteError) as exc:
        if shard_id is None:
            raise
        raise type(exc)(f"shard {shard_id!r}: {exc}") from None
    if card is not None:
        check_record_against_card(record, card, shard_id=shard_id)
    return record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in a safetensors header")
    return dict(pairs)


def _safetensors_layout(payload: bytes) -> bytes | None:
    """The 8-byte length and JSON header of a safetensors buffer (None if it cannot be one)."""
    if len(payload) < 8:
        return None
    size = int.from_bytes(payload[:8], "little")
    return payload[: 8 + size] if size <= len(payload) - 8 else None


def _fast_meta(key: str, text: bytes, card: DatasetCard | None, class_card: bool) -> dict[str, Any] | None:
    """A sample's metadata with every check :func:`decode_sample` makes on it, or None when any
    fails or the text is unusual (then :func:`decode_sample` gives the precise error)."""
    try:
        if len(text) > MAX_SAMPLE_JSON_BYTES:
            return None
        # json.loads(bytes) reads UTF-8 when the text starts "{" and a non-NUL byte (its encoding
        # detection); anything else goes to decode_sample
        if not (text[:1] == b"{" and text[1:2] not in (b"", b"\0")):
            return None
        meta = _META_DECODER.decode(text.decode("utf-8", "surrogatepass"))
        if not isinstance(meta, dict):
            return None
        if class_card and _common_class_meta_ok(key, meta, card):  # type: ignore[arg-type]
            return meta  # four plain numbers: no nesting to measure
        meta = _validated_meta(key, meta, key, from_json=True)
        if card is not None:
            _check_meta_against_card(meta, card, key)
    except (CorpusFormatError, ValueError, RecursionError):
        return None
    return None if json_depth_exceeds(meta) else meta


def _byte_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data`` (no copy; only ever read)."""
    view = memoryview(data)
    if view.readonly:  # torch warns that it cannot protect a read-only buffer; nothing writes to it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def _gather_rows(buf: torch.Tensor, starts: np.ndarray, width: int, out: torch.Tensor) -> None:
    """``out[j] = buf[starts[j]:starts[j] + width]`` for every j (every span lies inside ``buf``).

    Spans at a common stride (the samples of a shard the pipeline wrote, or any subset of them) are
    copied with one strided ``index_select``; others one by one."""
    count = len(starts)
    if count > 1:
        stride = int(np.diff(starts).min())
        if stride > 0 and not ((starts - starts[0]) % stride).any():
            rows = (starts - starts[0]) // stride
            view = buf[int(starts[0]):].as_strided((int(rows[-1]) + 1, width), (stride, 1))
            torch.index_select(view, 0, torch.from_numpy(rows), out=out)
            return
    for j, start in enumerate(starts.tolist()):
        out[j] = buf[start : start + width]


def decode_spans_into(
    data: bytes | bytearray | memoryview,
    samples: Sequence[tuple[str, Mapping[str, tuple[int, int]]]],
    card: DatasetCard,
    states_out: torch.Tensor,
    sigmas_out: torch.Tensor,
    *,
    shard_id: str | None = None,
) -> list[dict[str, Any] | CorpusFormatError]:
    """:func:`decode_sample` for many samples whose payloads lie in one buffer (a shard's bytes and the
    spans :func:`storage_schemas.shard.index_shard_members` found in it), with the tensor work
    vectorised, writing the tensors straight into preallocated rows instead of making one record per
    sample (the loader's decoder).

    Args:
        data: the buffer; ``samples[j] = (key, {suffix: (offset, size)})`` locates sample j's members.
        card: the corpus card (the records must agree with it, as for :func:`decode_sample`).
        states_out: ``[len(samples), K, *sample_shape]`` float32, contiguous: row j receives sample
            j's states (cast from the card dtype).
        sigmas_out: ``[len(samples), K]`` float32, contiguous: row j receives its sigmas.

    Returns:
        Per sample, in order: its validated metadata, or the :class:`CorpusFormatError` that
        :func:`decode_sample` raises for it (its rows are then unspecified). The same checks, records
        and errors as :func:`decode_sample`: samples sharing a safetensors layout (header bytes and
        length; all samples of a shard the pipeline wrote) have the first decoded by
        :func:`decode_sample`, which validates the layout (tensor names, dtypes, shapes, offsets, and
        against ``card``); the others are checked vectorised (values of the sigmas: finite, in [0, 1],
        strictly decreasing, the card's; finite states) plus their metadata, and any that fails, or
        has a layout of its own, is decoded alone by :func:`decode_sample`. The payloads are copied
        once, from ``data`` into the rows.
    """
    count = len(samples)
    results: list[dict[str, Any] | CorpusFormatError | None] = [None] * count
    buf = _byte_tensor(data)

    def one(i: int) -> dict[str, Any] | CorpusFormatError:
        key, spans = samples[i]
        members = {suffix: bytes(data[start : start + size]) for suffix, (start, size) in spans.items()}
        try:
            record = decode_sample(key, members, card, shard_id=shard_id)
        except CorpusFormatError as exc:
            return exc
        states_out[i].copy_(record.states)
        sigmas_out[i].copy_(record.sigmas)
        return record.meta

    groups: dict[tuple[bytes, int], list[int]] = {}
    little = sys.byteorder == "little"
    for i, (_, spans) in enumerate(samples):
        traj = spans.get(TRAJ_MEMBER) if len(spans) == 2 and META_MEMBER in spans else None
        layout = None
        if traj is not None and little and traj[1] >= 8:
            start, size = traj
            header_size = int.from_bytes(data[start : start + 8], "little")
            if header_size <= size - 8:
                layout = bytes(data[start : start + 8 + header_size])
        if layout is None:
            results[i] = one(i)
        else:
            groups.setdefault((layout, traj[1]), []).append(i)
    class_card = card.conditioning.kind == "class"
    expected_sigmas = torch.tensor(card.saved_sigmas, dtype=torch.float64)
    for (layout, _length), indices in groups.items():
        template = None
        key0, spans0 = samples[indices[0]]
        try:
            template = decode_sample(key0, {s: bytes(data[a : a + z]) for s, (a, z) in spans0.items()}, card,
                                     shard_id=shard_id)
        except CorpusFormatError as exc:
            results[indices[0]] = exc
        if template is None:  # the layout itself may be bad: decode one by one
            for i in indices[1:]:
                results[i] = one(i)
            continue
        results[indices[0]] = template.meta
        states_out[indices[0]].copy_(template.states)
        sigmas_out[indices[0]].copy_(template.sigmas)
        if len(indices) == 1:
            continue
        try:
            header = json.loads(layout[8:], object_pairs_hook=_unique_keys)
            s_begin, s_end = (int(v) for v in header[STATES_TENSOR]["data_offsets"])
            g_begin, g_end = (int(v) for v in header[SIGMAS_TENSOR]["data_offsets"])
        except (ValueError, TypeError, KeyError, AttributeError):  # not the layout safetensors read: no shortcut
            s_begin = s_end = g_begin = g_end = -1
        states_t, sigmas_t = template.states, template.sigmas
        width = states_t.numel() * states_t.element_size()
        if s_end - s_begin != width or g_end - g_begin != sigmas_t.numel() * 4 or min(s_begin, g_begin) < 0:
            for i in indices[1:]:
                results[i] = one(i)
            continue
        base = len(layout)
        starts = np.fromiter((samples[i][1][TRAJ_MEMBER][0] for i in indices), dtype=np.int64, count=len(indices))
        m = len(indices)
        contiguous = indices[-1] - indices[0] == m - 1  # rows indices[0] .. indices[-1], in order
        rows = slice(indices[0], indices[0] + m) if contiguous else torch.tensor(indices, dtype=torch.long)
        if contiguous and states_t.dtype == torch.float32:
            states = states_out[rows]
            _gather_rows(buf, starts + (base + s_begin), width, states.view(m, -1).view(torch.uint8))
        else:
            raw = torch.empty((m, width), dtype=torch.uint8)
            _gather_rows(buf, starts + (base + s_begin), width, raw)
            states = raw.view(states_t.dtype).view(m, *states_t.shape)
        sig_raw = torch.empty((m, sigmas_t.numel() * 4), dtype=torch.uint8)
        _gather_rows(buf, starts + (base + g_begin), sig_raw.shape[1], sig_raw)
        sigmas = sig_raw.view(torch.float32)
        # the layout must give the template exactly the tensors safetensors gave it
        if not (torch.equal(states[0], states_t) and torch.equal(sigmas[0], sigmas_t)):
            states_out[indices[0]].copy_(states_t)
            for i in indices[1:]:
                results[i] = one(i)
            continue
        # what decode_sample checks on the values (the layout was checked on the template)
        sig = sigmas.to(torch.float64)
        ok = (sig.isfinite() & (sig >= 0.0) & (sig <= 1.0)).all(dim=1)
        ok &= (sig[:, 1:] < sig[:, :-1]).all(dim=1)
        ok &= ((sig - expected_sigmas).abs() <= SIGMA_TOLERANCE).all(dim=1)
        if states.numel():
            # a finite sum means finite values (NaN and +-Inf propagate); a row whose sum is not finite
            # (a non-finite value, or an overflow) is left to decode_sample, which tells them apart
            ok &= states.reshape(m, -1).sum(dim=1, dtype=torch.float32).isfinite()
        if not (contiguous and states_t.dtype == torch.float32):
            states_out[rows] = states.to(torch.float32)
        sigmas_out[rows] = sigmas
        ok_rows = ok.tolist()
        for j, i in enumerate(indices):
            if j == 0:
                continue
            meta = None
            if ok_rows[j]:
                key, spans = samples[i]
                start, size = spans[META_MEMBER]
                meta = _fast_meta(key, bytes(data[start : start + size]), card, class_card)
            results[i] = meta if meta is not None else one(i)
    return results  # type: ignore[return-value]


_COMMON_CLASS_META = ("class_id", "guidance", "index", "seed")  # sorted, as canonical JSON stores them


def _common_class_meta_ok(key: str, meta: dict[str, Any], card: DatasetCard) -> bool:
    """True when ``meta`` (fresh from ``json.loads``) is exactly the pipeline's class-conditioned
    metadata and passes every check :func:`_validated_meta` and :func:`_check_meta_against_card`
    make (key, sorted plain JSON, index/seed ranges, finite guidance the card allows, class id in
    range), without changing it. False means: run those checks."""
    if tuple(meta) != _COMMON_CLASS_META:
        return False
    class_id, guidance, index, seed = meta["class_id"], meta["guidance"], meta["index"], meta["seed"]
    num_classes = card.conditioning.num_classes
    return (type(index) is int and 0 <= index <= MAX_INDEX and type(seed) is int and 0 <= seed <= MAX_SEED
            and type(class_id) is int and num_classes is not None and 0 <= class_id < num_classes
            and type(guidance) is float and math.isfinite(guidance) and card.solver.guidance_allows(guidance)
            and key == f"{index:0{KEY_DIGITS}d}")


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_META_DECODER = json.JSONDecoder(parse_constant=_reject_json_constant)
