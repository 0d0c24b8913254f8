"""Private helpers that type-check JSON-shaped values and raise errors naming the field.

``where`` names the document (e.g. ``"dataset card (dataset.json)"``) and ``field`` the dotted
path inside it (e.g. ``"solver.num_steps"``); both appear in every message.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import CorpusFormatError, SchemaError, UnsupportedSchemaVersion
from .limits import MAX_JSON_DEPTH, json_depth_exceeds
from .version import SUPPORTED_SCHEMA_VERSIONS

MAX_SEED = 2**63 - 1
"""Seeds are stored as Parquet int64, so they live in [0, 2**63 - 1]."""


def hash64(*parts: object) -> int:
    """The first 8 bytes (big-endian) of sha256(":".join(map(str, parts))): a 64-bit hash of ``parts``."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def seed63(*parts: object) -> int:
    """``hash64(*parts) & MAX_SEED``: the project's one seed hash (a stored contract: the generator's sample
    seeds, ``sha256('trajflow-seed:{base_seed}:{index}')[:8] & (2**63-1)``, are ``seed63("trajflow-seed",
    base_seed, index)``; the trainer's order and rollout seeds are seed63 of their own parts)."""
    return hash64(*parts) & MAX_SEED


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _wrong_type(where: str, field: str, expected: str, value: object) -> SchemaError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return SchemaError(f"{where}: field {field!r} must be {expected}, found {_type_name(value)} {shown}")


def check_keys(
    obj: Mapping[str, Any],
    *,
    where: str,
    prefix: str,
    required: Iterable[str],
    optional: Iterable[str] = (),
) -> None:
    """Raise SchemaError naming the first missing required key or the first unknown key."""
    required = tuple(required)
    allowed = set(required) | set(optional)
    for name in required:
        if name not in obj:
            raise SchemaError(f"{where}: missing field {prefix + name!r}")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise SchemaError(
            f"{where}: unknown field {prefix + unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; allowed fields: {', '.join(prefix + a for a in sorted(allowed))}"
        )


def expect_int(
    value: Any, *, where: str, field: str, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An int (never a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(where, field, "an integer", value)
    if minimum is not None and value < minimum:
        raise SchemaError(f"{where}: field {field!r} must be >= {minimum}, found {value}")
    if maximum is not None and value > maximum:
        raise SchemaError(f"{where}: field {field!r} must be <= {maximum}, found {value}")
    return int(value)


def expect_float(value: Any, *, where: str, field: str) -> float:
    """A finite real number (int or float, never a bool), returned as float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(where, field, "a number", value)
    result = float(value)
    if not math.isfinite(result):
        raise SchemaError(f"{where}: field {field!r} must be finite, found {result}")
    return result


def expect_str(value: Any, *, where: str, field: str, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise _wrong_type(where, field, "a string", value)
    if nonempty and not value:
        raise SchemaError(f"{where}: field {field!r} must be a non-empty string")
    return value


def expect_choice(value: Any, choices: Iterable[str], *, where: str, field: str) -> str:
    choices = tuple(choices)
    text = expect_str(value, where=where, field=field)
    if text not in choices:
        raise SchemaError(f"{where}: field {field!r} must be one of {list(choices)}, found {text!r}")
    return text


def expect_dict(value: Any, *, where: str, field: str) -> dict[str, Any]:
    """A JSON object with string keys, normalised through a JSON round trip (no NaN, no tuples)."""
    if not isinstance(value, Mapping):
        raise _wrong_type(where, field, "an object", value)
    try:
        return json.loads(canonical_json(dict(value)))
    except (TypeError, ValueError) as exc:
        raise SchemaError(
            f"{where}: field {field!r} must hold plain JSON values with string keys: {exc}"
        ) from None


def expect_list(value: Any, *, where: str, field: str, nonempty: bool = True) -> list[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _wrong_type(where, field, "a list", value)
    if nonempty and len(value) == 0:
        raise SchemaError(f"{where}: field {field!r} must be a non-empty list")
    return list(value)


def expect_float_list(value: Any, *, where: str, field: str) -> tuple[float, ...]:
    items = expect_list(value, where=where, field=field)
    return tuple(expect_float(v, where=where, field=f"{field}[{i}]") for i, v in enumerate(items))


def expect_int_list(value: Any, *, where: str, field: str, minimum: int | None = None) -> tuple[int, ...]:
    items = expect_list(value, where=where, field=field)
    return tuple(
        expect_int(v, where=where, field=f"{field}[{i}]", minimum=minimum) for i, v in enumerate(items)
    )


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys and no NaN/Inf: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def pretty_json(obj: Any) -> str:
    """The on-storage form of JSON documents: sorted keys, indent 2, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(data: str | bytes, *, where: str, max_bytes: int | None = None,
                      max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse a JSON object; unparseable bytes, more than ``max_bytes`` (None: no size limit) or
    nesting deeper than ``max_depth`` -> CorpusFormatError, a non-object -> SchemaError."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if max_bytes is not None and size > max_bytes:
        raise CorpusFormatError(f"{where}: {size} bytes, more than the {max_bytes}-byte limit for this document; "
                                "it was not parsed")
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise CorpusFormatError(f"{where}: JSON nested deeper than the {max_depth}-level limit") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorpusFormatError(f"{where}: not valid JSON: {exc}") from None
    if json_depth_exceeds(obj, max_depth):
        raise CorpusFormatError(f"{where}: JSON nested deeper than the {max_depth}-level limit")
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: must be a JSON object, found {_type_name(obj)}")
    return obj


def check_schema_version(value: Any, *, where: str) -> int:
    """A supported schema_version, else UnsupportedSchemaVersion naming found vs supported."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnsupportedSchemaVersion(where, value, SUPPORTED_SCHEMA_VERSIONS)
    return int(value)
