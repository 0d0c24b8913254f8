"""The per-shard pass: stream one shard once, hashing it while its tar is walked safely.

Every mode: size and sha256 of the stored bytes, tar structure, unsafe members (reported, never
decoded), sample keys against the recorded index range and count, seeds and conditions from the
small JSON members. ``--deep`` (on a fraction of the samples): every check of the format on each
sample's tensors and metadata, plus the tensor statistics. Replay targets are always decoded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.torch
import torch

from .._fields import MAX_SEED, parse_json_object
from ..card import SIGMA_TOLERANCE, DatasetCard
from ..errors import CorpusFormatError, SchemaError, UnsafeMemberError
from ..limits import MAX_SAMPLE_JSON_BYTES
from ..manifest import ShardCommit
from ..record import (
    KEY_DIGITS,
    META_MEMBER,
    TORCH_DTYPES,
    TRAJ_MEMBER,
    SampleRecord,
    check_record_against_card,
    sample_key,
)
from ..shard import iter_shard_members
from ._index import missing_ranges, ranges_text, spans_text
from ._io import CorpusStore, HashingReader, StorageReadError, SymlinkRefused, is_transient
from ._stats import ConditionStats, TrajectoryStats
from .problems import Problem

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
EXAMPLES = 4


@dataclass
class ReplaySample:
    shard_id: str
    key: str
    index: int
    seed: int
    guidance: float
    meta: dict[str, Any]
    states: torch.Tensor
    path: str | None = None


@dataclass
class ShardContext:
    card: DatasetCard | None
    deep: bool
    sample_fraction: float
    seed: int
    seed_rule: Callable[[int], int] | None
    replay_keys: dict[str, set[str]] = field(default_factory=dict)
    attempts: int = 3


@dataclass
class ShardResult:
    entry: ShardCommit
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int | None = None
    sha256: str | None = None
    complete: bool = False
    samples_in_tar: int = 0
    samples_deep: int = 0
    indices: Any = field(default_factory=list)
    """Global indices of the sample keys in the tar (an int64 array once the shard is done)."""
    seeds: Any = field(default_factory=list)
    """Seeds from the samples' metadata (an int64 array once the shard is done)."""
    traj: TrajectoryStats | None = None
    cond: ConditionStats = field(default_factory=ConditionStats)
    replay: list[ReplaySample] = field(default_factory=list)


class _Aggregate:
    """Per-sample problems of one shard, folded per kind into one line each."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[int, list[str], str]] = {}

    def add(self, kind: str, key: str, detail: str) -> None:
        count, keys, first = self._items.get(kind, (0, [], detail))
        if len(keys) < EXAMPLES:
            keys.append(key)
        self._items[kind] = (count + 1, keys, first if count else detail)

    def problems(self, shard_id: str, path: str) -> list[Problem]:
        out = []
        for kind, (count, keys, first) in self._items.items():
            if count == 1:
                detail = f"sample {keys[0]}: {first}"
            else:
                more = ", …" if count > len(keys) else ""
                detail = f"{count} samples ({', '.join(keys)}{more}); first: sample {keys[0]}: {first}"
            out.append(Problem(kind, shard_id, detail, path))
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def inspect_sample(
    key: str, members: dict[str, bytes], card: DatasetCard | None
) -> tuple[list[tuple[str, str]], tuple[torch.Tensor, dict[str, Any]] | None]:
    """Every format check on one sample, each failure as (kind, detail); plus (states, meta) when the
    sample is fully valid. Only the two format members are ever looked at (safetensors and JSON)."""
    found: list[tuple[str, str]] = []
    meta: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    if META_MEMBER not in members:
        found.append(("decode_error", f"missing member {key}.{META_MEMBER}"))
    else:
        try:
            meta = parse_json_object(bytes(members[META_MEMBER]), where=f"{key}.{META_MEMBER}",
                                     max_bytes=MAX_SAMPLE_JSON_BYTES)
        except CorpusFormatError as exc:
            found.append(("decode_error", str(exc)))
    if TRAJ_MEMBER not in members:
        found.append(("decode_error", f"missing member {key}.{TRAJ_MEMBER}"))
    else:
        try:
            tensors = safetensors.torch.load(bytes(members[TRAJ_MEMBER]))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for corrupt buffers
            found.append(("decode_error", f"{key}.{TRAJ_MEMBER} is not a valid safetensors buffer: {exc}"))
    if meta is not None:
        _check_meta(key, meta, card, found)
    states = sigmas = None
    if tensors is not None:
        names = set(tensors)
        if names != {"states", "sigmas"}:
            found.append(("decode_error", f"{key}.{TRAJ_MEMBER} must hold exactly tensors ['sigmas', 'states']; "
                                          f"found {sorted(names)}"))
        states, sigmas = tensors.get("states"), tensors.get("sigmas")
    if states is not None:
        _check_states(states, card, found)
    if sigmas is not None:
        _check_sigmas(sigmas, states, card, found)
    if found or states is None or sigmas is None or meta is None:
        return found, None
    try:  # the format's own reader must agree: nothing the trainer would reject passes the audit
        record = SampleRecord(key=key, states=states, sigmas=sigmas, meta=meta)
        if card is not None:
            check_record_against_card(record, card)
    except CorpusFormatError as exc:
        return [("record_invalid", str(exc))], None
    return [], (states, meta)


def _check_meta(key: str, meta: dict[str, Any], card: DatasetCard | None, found: list[tuple[str, str]]) -> None:
    for name in ("index", "seed", "guidance"):
        if name not in meta:
            found.append(("metadata_missing", f"metadata has no {name!r} field"))
    if "index" in meta:
        index = meta["index"]
        if not _is_int(index) or not 0 <= index < 10**KEY_DIGITS:
            found.append(("metadata_invalid", f"metadata 'index' must be an int in [0, 1e10), found {index!r}"))
        elif sample_key(index) != key:
            found.append(("metadata_invalid", f"key {key!r} is not sample_key(index) = {sample_key(index)!r}"))
    if "seed" in meta and (not _is_int(meta["seed"]) or not 0 <= meta["seed"] <= MAX_SEED):
        found.append(("metadata_invalid", f"metadata 'seed' must be an int in [0, 2**63-1], found {meta['seed']!r}"))
    if "guidance" in meta:
        g = meta["guidance"]
        if not _is_number(g) or not math.isfinite(float(g)):
            found.append(("metadata_invalid", f"metadata 'guidance' must be a finite number, found {g!r}"))
        elif card is not None and not card.solver.guidance_allows(float(g)):
            found.append(("metadata_invalid", f"guidance {g} is outside the card's solver.guidance "
                                              f"{card.solver.to_dict()['guidance']}"))
    if card is None:
        return
    cond = card.conditioning
    if cond.kind == "class":
        if "class_id" not in meta:
            found.append(("metadata_missing", "metadata has no 'class_id' (the card's conditioning is 'class')"))
        elif not _is_int(meta["class_id"]) or not 0 <= meta["class_id"] < (cond.num_classes or 0):
            found.append(("metadata_invalid", f"class_id {meta['class_id']!r} is not in [0, {cond.num_classes})"))
    elif cond.kind == "prompt" and "prompt_id" not in meta and "prompt" not in meta:
        found.append(("metadata_missing", "metadata has neither 'prompt_id' nor 'prompt' (the card's conditioning "
                                          "is 'prompt')"))


def _check_states(states: torch.Tensor, card: DatasetCard | None, found: list[tuple[str, str]]) -> None:
    name = _DTYPE_NAMES.get(states.dtype)
    if card is not None and name != card.dtype:
        found.append(("dtype_mismatch", f"states dtype {str(states.dtype).removeprefix('torch.')}, the card says "
                                        f"{card.dtype}"))
    elif name is None:
        found.append(("dtype_mismatch", f"states dtype {str(states.dtype).removeprefix('torch.')} is not one of "
                                        f"{sorted(TORCH_DTYPES)}"))
    if card is not None and tuple(states.shape) != card.states_shape:
        found.append(("shape_mismatch", f"states shape {list(states.shape)}, the card's "
                                        f"[len(saved_sigmas), *sample_shape] is {list(card.states_shape)}"))
    elif card is None and (states.ndim < 2 or states.shape[0] < 2):
        found.append(("shape_mismatch", f"states shape {list(states.shape)} is not [K, *sample_shape] with K >= 2"))
    if states.dtype.is_floating_point:
        finite = torch.isfinite(states)
        if not bool(finite.all()):
            bad = ~finite
            nan = int(torch.isnan(states).sum())
            per_state = bad.reshape(states.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if states.ndim else []
            found.append(("non_finite", f"states hold {int(bad.sum())} non-finite value(s) ({nan} NaN) of "
                                        f"{states.numel()}, in state(s) {per_state[:8]}"))


def _check_sigmas(sigmas: torch.Tensor, states: torch.Tensor | None, card: DatasetCard | None,
                  found: list[tuple[str, str]]) -> None:
    if sigmas.dtype != torch.float32:
        found.append(("dtype_mismatch", f"sigmas dtype {str(sigmas.dtype).removeprefix('torch.')}, the format "
                                        "stores float32"))
    k = states.shape[0] if states is not None and states.ndim else None
    if card is not None:
        want = card.saved_sigmas
        got = sigmas.to(torch.float64).flatten().tolist() if sigmas.dtype.is_floating_point else None
        if sigmas.ndim != 1 or got is None or len(got) != len(want):
            found.append(("sigma_mismatch", f"sigmas shape {list(sigmas.shape)}, the card saves {len(want)} sigmas"))
        else:
            bad = [i for i, (a, b) in enumerate(zip(got, want)) if not abs(a - b) <= SIGMA_TOLERANCE]
            if bad:
                i = bad[0]
                found.append(("sigma_mismatch", f"sigmas[{i}] = {got[i]:.7g} but the card's saved_sigmas[{i}] = "
                                                f"{want[i]:.7g} ({len(bad)} of {len(want)} differ)"))
    elif k is not None and (sigmas.ndim != 1 or sigmas.shape[0] != k):
        found.append(("sigma_mismatch", f"sigmas shape {list(sigmas.shape)} does not match the {k} states"))


def _deep_selected(ctx: ShardContext, shard_id: str):
    if not ctx.deep:
        return lambda _key: False
    if ctx.sample_fraction >= 1.0:
        return lambda _key: True
    rng = random.Random(f"trajflow-audit:{ctx.seed}:{shard_id}")
    return lambda _key: rng.random() < ctx.sample_fraction


_INTEGRITY = ("size_mismatch", "sha256_mismatch", "tar_corrupt")
CONFIRM_READS = 2
"""Extra reads of a shard whose bytes disagree with its record, before the disagreement is reported."""


def check_shard(store: CorpusStore, entry: ShardCommit, ctx: ShardContext) -> ShardResult:
    """Check one shard; nothing raises. A shard whose bytes do not match its record is read again (up to
    ``CONFIRM_READS`` more times) before that is reported, so a transfer glitch (a flipped or cut
    response) is not taken for a defect of the stored object."""
    result = _check_with_retries(store, entry, ctx)
    for _ in range(CONFIRM_READS):
        if not any(p.kind in _INTEGRITY for p in result.problems):
            return result
        again = _check_with_retries(store, entry, ctx)
        if again.sha256 is not None:  # a read that failed outright keeps what the earlier one saw
            result = again
    return result


def _check_with_retries(store: CorpusStore, entry: ShardCommit, ctx: ShardContext) -> ShardResult:
    """One full check of the shard; transient read errors restart it (bounded)."""
    last: BaseException | None = None
    for attempt in range(max(1, ctx.attempts)):
        if attempt:
            time.sleep(min(4.0, 0.5 * 2 ** (attempt - 1)))  # a dropped stream: read the shard again
        try:
            return _check_once(store, entry, ctx)
        except FileNotFoundError:
            result = ShardResult(entry)
            result.problems.append(Problem("shard_missing", entry.shard_id,
                                           f"{entry.path} disappeared while the audit was reading it", entry.path))
            return result
        except (StorageReadError, OSError) as exc:
            last = exc
            if isinstance(exc, OSError) and not is_transient(exc):
                break
        except Exception as exc:  # noqa: BLE001 - one shard's surprise must not stop the audit
            result = ShardResult(entry)
            result.problems.append(Problem("audit_error", entry.shard_id,
                                           f"unexpected {type(exc).__name__} while auditing {entry.path}: {exc}",
                                           entry.path))
            return result
    result = ShardResult(entry)
    if isinstance(last, SymlinkRefused):
        result.problems.append(Problem("symlink_refused", entry.shard_id, str(last), entry.path))
        return result
    result.problems.append(Problem("read_error", entry.shard_id,
                                   f"{entry.path} could not be read: {type(last).__name__}: {last}", entry.path))
    return result


def _check_once(store: CorpusStore, entry: ShardCommit, ctx: ShardContext) -> ShardResult:
    sid, path, card = entry.shard_id, entry.path, ctx.card
    result = ShardResult(entry)
    if card is not None:
        result.traj = TrajectoryStats(card.saved_sigmas, card.stages)
    agg = _Aggregate()
    unsafe: list[UnsafeMemberError] = []
    keys: list[str] = []
    selected = _deep_selected(ctx, sid)
    replay_keys = ctx.replay_keys.get(sid, set())
    tar_error: str | None = None
    dup_key: str | None = None
    handle = store.open(path)
    try:
        reader = HashingReader(handle)
        try:
            for key, members in iter_shard_members(reader, sid, collect_unsafe=unsafe):
                keys.append(key)
                _sample(result, agg, ctx, key, members, selected(key) or key in replay_keys, key in replay_keys)
        except UnsafeMemberError as exc:  # not raised with collect_unsafe, kept for safety
            unsafe.append(exc)
        except SchemaError as exc:
            if "appears again" in str(exc):
                dup_key = str(exc)
            else:
                tar_error = str(exc)
        except CorpusFormatError as exc:
            tar_error = str(exc)
        reader.drain()
    finally:
        try:
            handle.close()
        except Exception:  # noqa: BLE001 - closing a read-only handle is best effort
            pass
    result.bytes_read, result.sha256 = reader.count, reader.hexdigest()
    result.indices = np.asarray(result.indices, dtype=np.int64)  # bounded memory on huge corpora
    result.seeds = np.asarray(result.seeds, dtype=np.int64)
    result.samples_in_tar = len(keys)
    problems = result.problems
    if reader.count != entry.num_bytes:
        problems.append(Problem("size_mismatch", sid, f"{path} holds {reader.count} bytes, recorded num_bytes is "
                                                       f"{entry.num_bytes}", path))
    if result.sha256 != entry.sha256:
        problems.append(Problem("sha256_mismatch", sid, f"{path} has sha256 {result.sha256[:16]}…, recorded "
                                                         f"{entry.sha256[:16]}…: the bytes changed after commit", path))
    if tar_error is not None:
        problems.append(Problem("tar_corrupt", sid, f"{tar_error} (after {len(keys)} complete samples)", path))
    if dup_key is not None:
        problems.append(Problem("duplicate_sample_key", sid, dup_key, path))
    for err in unsafe:
        problems.append(Problem("unsafe_member", sid, f"member {err.member!r}: {err.reason}; not decoded", path))
    result.complete = tar_error is None and dup_key is None
    if result.complete:
        _check_keys(result, keys)
    problems.extend(agg.problems(sid, path))
    return result


def _check_keys(result: ShardResult, keys: list[str]) -> None:
    e = result.entry
    got = {int(k) for k in keys if k.isdigit() and len(k) == KEY_DIGITS}
    odd = [k for k in keys if not (k.isdigit() and len(k) == KEY_DIGITS)]
    missing = missing_ranges(e.first_index, e.last_index, got)  # never materialises a recorded range
    extra = sorted(v for v in got if not e.first_index <= v <= e.last_index)
    parts = []
    if missing:
        parts.append(f"missing indices {spans_text(missing)}")
    if extra:
        parts.append(f"unexpected indices {ranges_text(extra)}")
    if odd:
        parts.append(f"keys that are not sample_key(index): {odd[:EXAMPLES]}")
    if len(keys) != e.num_samples:
        result.problems.append(Problem("count_mismatch", e.shard_id,
                                       f"the tar holds {len(keys)} samples, recorded num_samples is {e.num_samples}"
                                       + (f" ({'; '.join(parts)})" if parts else ""), e.path))
    elif parts:
        result.problems.append(Problem("index_mismatch", e.shard_id,
                                       f"sample keys are not the recorded range {e.first_index}..{e.last_index}: "
                                       + "; ".join(parts), e.path))


def _sample(result: ShardResult, agg: _Aggregate, ctx: ShardContext, key: str, members: dict[str, bytes],
            deep: bool, replay: bool) -> None:
    if key.isdigit() and len(key) == KEY_DIGITS:
        result.indices.append(int(key))
    meta = None
    if META_MEMBER in members:
        try:
            meta = parse_json_object(bytes(members[META_MEMBER]), where=key, max_bytes=MAX_SAMPLE_JSON_BYTES)
        except CorpusFormatError:
            meta = None
    if meta is not None:
        result.cond.add(meta)
        seed = meta.get("seed")
        if _is_int(seed) and 0 <= seed <= MAX_SEED:
            result.seeds.append(seed)
            index = meta.get("index")
            if ctx.seed_rule is not None and _is_int(index) and index >= 0:
                want = ctx.seed_rule(index)
                if seed != want:
                    agg.add("seed_mismatch", key, f"seed {seed}, the card's seed_rule gives {want} for index {index}")
    if not deep:
        return
    result.samples_deep += 1
    found, valid = inspect_sample(key, members, ctx.card)
    for kind, detail in found:
        agg.add(kind, key, detail)
    if valid is None:
        return
    states, meta = valid
    if result.traj is not None:
        result.traj.add(states)
    if replay:
        result.replay.append(ReplaySample(result.entry.shard_id, key, int(meta["index"]), int(meta["seed"]),
                                          float(meta["guidance"]), meta, states.clone(), result.entry.path))
