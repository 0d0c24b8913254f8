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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def _checked_meta(meta: Any, *, where: str) -> dict[str, Any]:
    """Validate sample metadata; returns it normalised through JSON (plain dict, guidance float)."""
    where = f"{where} metadata (.json)"
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
        validate_key(self.key)
        where = _where(self.key, None)
        meta = _checked_meta(self.meta, where=where)
        object.__setattr__(self, "meta", meta)
        if self.key != sample_key(meta["index"]):
            raise SchemaError(
                f"{where}: key must be sample_key(index) = {sample_key(meta['index'])!r} for index {meta['index']}"
            )
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
    meta_where = f"{where} metadata (.json)"
    conditioning = card.conditioning
    if conditioning.kind == "class":
        if "class_id" not in record.meta:
            raise SchemaError(f"{meta_where}: missing field 'class_id' (the card's conditioning is 'class')")
        assert conditioning.num_classes is not None
        expect_int(
            record.meta["class_id"],
            where=meta_where,
            field="class_id",
            minimum=0,
            maximum=conditioning.num_classes - 1,
        )
    elif conditioning.kind == "prompt" and "prompt_id" not in record.meta and "prompt" not in record.meta:
        raise SchemaError(
            f"{meta_where}: missing field 'prompt_id' or 'prompt' (the card's conditioning is 'prompt')"
        )
    if not card.solver.guidance_allows(record.guidance):
        raise SchemaError(
            f"{meta_where}: field 'guidance' = {record.guidance} is not allowed by the card's solver.guidance "
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
    meta = parse_json_object(bytes(members[META_MEMBER]), where=f"{where} metadata (.json)")
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
        record = SampleRecord(
            key=key, states=tensors[STATES_TENSOR], sigmas=tensors[SIGMAS_TENSOR], meta=meta
        )
    except (SchemaError, ShapeMismatchError, NonFiniteError) as exc:
        if shard_id is None:
            raise
        raise type(exc)(f"shard {shard_id!r}: {exc}") from None
    if card is not None:
        check_record_against_card(record, card, shard_id=shard_id)
    return record
