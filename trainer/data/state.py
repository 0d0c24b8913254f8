"""The resume state of a stream: :class:`StreamState`, O(1) in size and JSON-able."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import ORDERS

STATE_VERSION = 2
"""Version 2 adds ``order`` and ``partitions``; a version-1 state is read as ``order="global"``."""


class StreamStateMismatch(ValueError):
    """A saved :class:`StreamState` does not belong to this corpus / seed / order algorithm."""


@dataclass(frozen=True)
class StreamState:
    """Everything needed to resume exactly: O(1) in size, JSON-able, valid for any world size.

    ``cursor`` counts the global positions of ``epoch`` consumed by all ranks together (ranks move
    in lockstep). ``order`` and ``partitions`` name the order algorithm and its canonical partitions
    (0 for the global order). ``order_digest`` (optional) fingerprints the epoch's order to catch an
    RNG change.
    """

    corpus_fingerprint: str
    seed: int
    epoch: int
    cursor: int
    order_digest: str = ""
    order: str = "global"
    partitions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "corpus_fingerprint": self.corpus_fingerprint, "seed": self.seed,
                "epoch": self.epoch, "cursor": self.cursor, "order_digest": self.order_digest,
                "order": self.order, "partitions": self.partitions}

    @classmethod
    def from_dict(cls, obj: Any) -> StreamState:
        if isinstance(obj, StreamState):
            return obj
        if not isinstance(obj, dict):
            raise StreamStateMismatch(f"a stream state must be a dict, found {type(obj).__name__}")
        version = obj.get("version")
        if version not in (1, STATE_VERSION) or isinstance(version, bool):
            raise StreamStateMismatch(
                f"stream state version {version!r} is not supported (this trajflow reads 1 and {STATE_VERSION})"
            )
        fields = [("corpus_fingerprint", str), ("seed", int), ("epoch", int), ("cursor", int)]
        if version == STATE_VERSION:
            fields += [("order", str), ("partitions", int)]
        for name, kind in fields:
            value = obj.get(name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise StreamStateMismatch(f"stream state field {name!r} must be {kind.__name__}, found {value!r}")
        if obj["epoch"] < 0 or obj["cursor"] < 0 or obj["seed"] < 0:
            raise StreamStateMismatch(f"stream state has a negative seed, epoch or cursor: {obj}")
        digest = obj.get("order_digest", "")
        if not isinstance(digest, str):
            raise StreamStateMismatch(f"stream state field 'order_digest' must be str, found {digest!r}")
        known = {"version", "corpus_fingerprint", "seed", "epoch", "cursor", "order_digest"}
        if version == STATE_VERSION:
            known |= {"order", "partitions"}
        unknown = set(obj) - known
        if unknown:
            raise StreamStateMismatch(f"stream state has unknown field(s) {sorted(unknown)}")
        order, partitions = obj.get("order", "global"), obj.get("partitions", 0)
        if order not in ORDERS:
            raise StreamStateMismatch(f"stream state field 'order' must be one of {ORDERS}, found {order!r}")
        if (order == "partitioned") != (partitions >= 1) or partitions < 0:
            raise StreamStateMismatch(f"stream state has order {order!r} with partitions {partitions}")
        return cls(obj["corpus_fingerprint"], obj["seed"], obj["epoch"], obj["cursor"], digest, order, partitions)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> StreamState:
        return cls.from_dict(json.loads(text))
