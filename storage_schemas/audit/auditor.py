"""``audit_corpus``: find every defect a corpus can have, and say plainly where it is.

Order of work:

1. list every object under the root (one listing);
2. read the dataset card, the manifest (leniently: bad rows and duplicates are reported, not
   raised) and every commit record (in parallel);
3. corpus-level checks on the records alone: plan, index ranges and gaps, duplicates, fingerprints,
   manifest vs commit records, missing shards, orphans;
4. the shard pass: a thread pool streams each shard once (at most ``workers`` shards open at a
   time, each read through a bounded buffer), hashing it while its tar is walked; ``--deep``
   decodes and checks the samples (a ``sample_fraction`` of them) and gathers statistics;
5. corpus-wide duplicate keys and seeds from what the tars really hold;
6. ``--replay N``: re-solve N random samples with the recorded teacher and compare.
"""

from __future__ import annotations

import math
import random
import sys
import time
from bisect import bisect_right
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from ..errors import CorpusFormatError
from ..layout import DATASET_CARD, MANIFEST, shard_number
from ..limits import MAX_CARD_BYTES, MAX_COMMIT_BYTES
from ..manifest import ShardCommit
from ..record import sample_key
from ..split import manifest_split_ids, split_disagreement
from ._index import (
    CorpusIndex,
    card_summary,
    check_entries,
    choose_entries,
    commit_files,
    find_orphans,
    ranges_text,
    read_card,
    read_commit,
    read_manifest,
    seed_rule_of,
)
from ._io import CorpusStore, StorageReadError, SymlinkRefused
from ._shards import ReplaySample, ShardContext, ShardResult, check_shard
from ._stats import ConditionStats, TrajectoryStats, shard_size_stats
from .problems import PROBLEM_KINDS, AuditReport, Problem

DEFAULT_WORKERS = 8
_KIND_ORDER = {k: i for i, k in enumerate(PROBLEM_KINDS)}


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled or total == 0,
                dynamic_ncols=True, leave=False)


def _fatal(report: AuditReport, reason: str, t0: float) -> AuditReport:
    report.fatal, report.fatal_reason = True, reason
    report.seconds = time.perf_counter() - t0
    return report


def audit_corpus(
    url: str,
    *,
    deep: bool = False,
    replay: int = 0,
    sample_fraction: float = 1.0,
    storage_options: dict[str, Any] | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: bool = False,
    seed: int = 0,
    replay_teacher: str | None = None,
    replay_device: str | None = None,
    attempts: int = 4,
) -> AuditReport:
    """Audit the corpus at ``url`` (an fsspec URL or a local path) and return an :class:`AuditReport`.

    Args:
        deep: decode and check every sample (see ``sample_fraction``), and gather trajectory statistics.
        replay: re-solve this many randomly chosen samples with the recorded teacher and compare.
        sample_fraction: with ``deep``, the fraction of samples decoded (0 < F <= 1; chosen per
            sample, reproducibly from ``seed``). Hashes, sizes and tar members are always checked in full.
        storage_options: fsspec options (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        workers: shards checked in parallel (and so at most this many open at once).
        progress: a tqdm progress bar on stderr.
        seed: seeds the choice of replayed and sampled samples.
        replay_teacher: a local teacher SPEC to replay with instead of the card's (its fingerprint
            must still equal the card's).
        replay_device: torch device for replay (default: cuda when available, else cpu).

    Raises:
        ValueError: bad arguments (the CLI turns these into exit status 2).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the corpus URL must be a non-empty string")
    if not (0.0 < float(sample_fraction) <= 1.0):
        raise ValueError(f"sample fraction must be in (0, 1], got {sample_fraction}")
    if int(replay) < 0:
        raise ValueError(f"replay count must be >= 0, got {replay}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    report = AuditReport(url=url)
    report.checks = {"deep": bool(deep), "sample_fraction": float(sample_fraction) if deep else None,
                     "replay": int(replay), "seed": int(seed), "workers": int(workers)}
    try:
        store = CorpusStore(url, storage_options, attempts=attempts)
    except Exception as exc:  # noqa: BLE001 - bad URL, unknown protocol, missing driver
        return _fatal(report, f"cannot open {url}: {type(exc).__name__}: {exc}", t0)
    try:
        listing = store.listing()
    except StorageReadError as exc:
        return _fatal(report, f"cannot list {url}: {exc}", t0)
    if not listing:
        if store.root_is_file():
            return _fatal(report, f"{url} is a single object, not a corpus root (a directory or prefix)", t0)
        return _fatal(report, f"nothing at {url}: no such corpus (or no permission to list it)", t0)

    index = CorpusIndex(listing)
    _read_documents(store, index, workers, progress)
    if index.card is None and not index.manifest_present and not index.commit_files:
        what = "no dataset card" if not index.card_present else "an unreadable dataset card"
        reasons = "; ".join(p.detail for p in index.problems)
        return _fatal(report, f"{url} holds {what}, no manifest and no commit records: there is nothing to audit"
                              + (f" ({reasons})" if reasons and index.card_present else ""), t0)
    choose_entries(index)
    check_entries(index)
    _check_split(index)
    find_orphans(index)
    card = index.card
    report.card = card_summary(card)
    problems: list[Problem] = list(index.problems)

    # --- the shard pass -------------------------------------------------------------------
    tasks = _unique_entries([e for e in index.entries if e.path in listing])
    ctx = ShardContext(card=card, deep=deep, sample_fraction=float(sample_fraction), seed=int(seed),
                       seed_rule=seed_rule_of(card), attempts=max(1, attempts - 1))
    if replay and card is not None:
        ctx.replay_keys = _choose_replay(tasks, int(replay), int(seed))
    results = _run_shards(store, tasks, ctx, workers, progress)
    for r in results:
        problems.extend(r.problems)
    for pair, problem in _duplicates_in_data(results):
        declared = index.declared_pairs.get(pair)
        if declared is not None and declared in problems:
            problems.remove(declared)  # the data says more than the records
        problems.append(problem)

    # --- replay -----------------------------------------------------------------------------
    replay_stats = None
    if replay:
        if card is None:
            report.notes.append("replay unavailable: the dataset card could not be read, so the teacher, solver and "
                                "saved sigmas are unknown")
        else:
            from ._replay import replay as run_replay

            chosen = sum(len(v) for v in ctx.replay_keys.values())
            samples: list[ReplaySample] = [s for r in results for s in r.replay]
            samples.sort(key=lambda s: s.index)
            if len(samples) < chosen:
                report.notes.append(f"{chosen - len(samples)} of the {chosen} samples chosen for replay could not be "
                                    "decoded (see the problems) and were not replayed")
            found, replay_stats, notes = run_replay(card, samples, override=replay_teacher, device=replay_device,
                                                    root=url)
            problems.extend(found)
            report.notes.extend(notes)

    # --- statistics and notes ---------------------------------------------------------------
    report.stats = _stats(index, results, card, replay_stats)
    if deep and card is None:
        report.notes.append("deep checks ran without a readable card: shapes, dtype, sigmas and conditions could not "
                            "be compared with it")
    if deep and sample_fraction < 1.0:
        report.notes.append(f"--sample-fraction {sample_fraction:g}: {report.stats['samples']['deep_checked']} of "
                            f"{report.stats['samples']['in_tars']} samples were decoded and checked; hashes, sizes "
                            "and tar members were checked for every shard")
    if not deep:
        report.notes.append("samples were not decoded (run with --deep to check every sample and to get trajectory "
                            "statistics)")
    unique_ids = {e.shard_id for e in index.entries}
    report.num_shards = len(unique_ids)
    report.num_samples = sum(e.num_samples for e in _unique_entries(index.entries))
    report.problems = _sorted(problems)
    report.seconds = time.perf_counter() - t0
    return report


def _check_split(index: CorpusIndex) -> None:
    """The manifest's copy of the validation split (``trajflow.split``) is valid JSON and agrees with the
    card's: ``storage_schemas.split``, the check the trainer makes too (``manifest_invalid`` otherwise)."""
    if not index.manifest_present or not index.manifest_usable:
        return
    try:
        ids = manifest_split_ids(raw=index.manifest_split)
    except CorpusFormatError as exc:
        index.add("manifest_invalid", None, f"{exc}: the validation split is unknown", MANIFEST)
        return
    if index.card is not None:
        problem = split_disagreement(index.card, ids)
        if problem is not None:
            index.add("manifest_invalid", None, problem, MANIFEST)


def _read_documents(store: CorpusStore, index: CorpusIndex, workers: int, progress: bool) -> None:
    listing = index.listing
    if DATASET_CARD in listing:
        try:
            # (a card over its size limit is refused by DatasetCard.from_json: read only one byte more)
            read_card(index, store.cat(DATASET_CARD, max_bytes=MAX_CARD_BYTES))
        except (StorageReadError, FileNotFoundError, SymlinkRefused) as exc:
            index.card_present = True
            index.add("card_invalid", None, f"{DATASET_CARD} could not be read: {exc}", DATASET_CARD)
    else:
        read_card(index, None)
    if MANIFEST in listing:
        try:
            read_manifest(index, store.cat(MANIFEST))
        except (StorageReadError, FileNotFoundError, SymlinkRefused) as exc:
            index.manifest_present = True
            index.add("manifest_invalid", None, f"{MANIFEST} could not be read: {exc}", MANIFEST)
    files = commit_files(listing)
    index.commit_files = len(files)

    def fetch(rel: str) -> tuple[str, bytes | None, str | None]:
        try:
            return rel, store.cat(rel, max_bytes=MAX_COMMIT_BYTES), None
        except (StorageReadError, FileNotFoundError, SymlinkRefused) as exc:
            return rel, None, str(exc)

    if not files:
        return
    bar = _progress(len(files), "commit records", "rec", progress and len(files) > 64)
    with ThreadPoolExecutor(max_workers=max(1, min(workers * 2, 32))) as pool:
        for rel, data, error in pool.map(fetch, files):
            read_commit(index, rel, data, error)
            bar.update(1)
    bar.close()


def _unique_entries(entries: list[ShardCommit]) -> list[ShardCommit]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for e in entries:
        key = (e.shard_id, e.path, e.sha256, e.num_bytes, e.num_samples, e.first_index, e.last_index, e.seed)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _choose_replay(tasks: list[ShardCommit], n: int, seed: int) -> dict[str, set[str]]:
    total = sum(e.num_samples for e in tasks)
    if not total or n <= 0:
        return {}
    starts, acc = [], 0
    for e in tasks:
        starts.append(acc)
        acc += e.num_samples
    chosen: dict[str, set[str]] = defaultdict(set)
    for pos in random.Random(f"trajflow-replay:{seed}").sample(range(total), min(n, total)):
        i = bisect_right(starts, pos) - 1
        e = tasks[i]
        chosen[e.shard_id].add(sample_key(e.first_index + pos - starts[i]))
    return dict(chosen)


def _run_shards(store: CorpusStore, tasks: list[ShardCommit], ctx: ShardContext, workers: int,
                progress: bool) -> list[ShardResult]:
    """Check shards in a bounded thread pool: at most ``workers`` shards are open at any time."""
    results: list[ShardResult] = []
    if not tasks:
        return results
    bar = _progress(len(tasks), "audit shards", "shard", progress)
    found = 0
    queue = iter(tasks)
    in_flight: set[Future] = set()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def fill() -> None:
            while len(in_flight) < workers:
                entry = next(queue, None)
                if entry is None:
                    return
                in_flight.add(pool.submit(check_shard, store, entry, ctx))

        fill()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in done:
                in_flight.discard(fut)
                result = fut.result()
                results.append(result)
                found += len(result.problems)
                bar.update(1)
                bar.set_postfix(problems=found, refresh=False)
            fill()
    bar.close()
    results.sort(key=lambda r: (shard_number(r.entry.shard_id), r.entry.path))
    return results


def _duplicates_in_data(results: list[ShardResult]) -> list[tuple[tuple[str, str, str], Problem]]:
    """Sample keys and seeds stored more than once across the corpus (from the tars themselves), as
    ((kind, later shard, earlier shard), problem)."""
    out: list[tuple[tuple[str, str, str], Problem]] = []
    for kind, attr in (("duplicate_sample_key", "indices"), ("duplicate_seed", "seeds")):
        values = [np.asarray(getattr(r, attr), dtype=np.int64) for r in results]
        if not values:
            continue
        owners = np.concatenate([np.full(len(v), i, dtype=np.int64) for i, v in enumerate(values)])
        flat = np.concatenate(values)
        if flat.size == 0:
            continue
        uniq, counts = np.unique(flat, return_counts=True)
        dup = uniq[counts > 1]
        if dup.size == 0:
            continue
        mask = np.isin(flat, dup)
        groups: dict[int, list[int]] = defaultdict(list)
        for value, owner in zip(flat[mask].tolist(), owners[mask].tolist()):
            groups[value].append(owner)
        pairs: dict[tuple[int, int], list[int]] = defaultdict(list)
        for value, owner_list in groups.items():
            ordered = sorted(owner_list, key=lambda i: (shard_number(results[i].entry.shard_id), i))
            first = ordered[0]
            for other in ordered[1:]:
                pairs[(other, first)].append(value)
        for (later_i, earlier_i), vals in sorted(pairs.items()):
            later, earlier = results[later_i].entry, results[earlier_i].entry
            same = later_i == earlier_i
            if kind == "duplicate_sample_key":
                where = "twice in this shard" if same else f"also stored in {earlier.shard_id}"
                detail = f"{len(vals)} sample key(s) {where}: indices {ranges_text(vals)}"
            else:
                where = "twice in this shard" if same else f"also used in {earlier.shard_id}"
                shown = ", ".join(str(v) for v in sorted(vals)[:3]) + (", …" if len(vals) > 3 else "")
                detail = f"{len(vals)} seed(s) {where} ({shown})"
            out.append(((kind, later.shard_id, earlier.shard_id), Problem(kind, later.shard_id, detail, later.path)))
    return out


def _stats(index: CorpusIndex, results: list[ShardResult], card, replay_stats) -> dict[str, Any]:
    traj = TrajectoryStats(card.saved_sigmas, card.stages) if card is not None else None
    cond = ConditionStats()
    for r in results:
        if traj is not None and r.traj is not None:
            traj.merge(r.traj)
        cond.merge(r.cond)
    sizes = [r.bytes_read if r.bytes_read is not None else r.entry.num_bytes for r in results]
    samples = [r.samples_in_tar if r.complete else r.entry.num_samples for r in results]
    conditions, guidance = cond.to_dict(card.conditioning.kind if card is not None else None)
    return {
        "card": card_summary(card),
        "source": index.source,
        "objects": {"count": len(index.listing), "bytes": int(sum(max(0, s) for s in index.listing.values()))},
        "shards": shard_size_stats(sizes, samples),
        "samples": {
            "recorded": sum(e.num_samples for e in _unique_entries(index.entries)),
            "in_tars": sum(r.samples_in_tar for r in results),
            "deep_checked": sum(r.samples_deep for r in results),
            "trajectory_stats_from": traj.count if traj is not None else 0,
        },
        "norms_per_sigma": traj.norms() if traj is not None else [],
        "straightness": traj.straightness() if traj is not None and traj.count else [],
        "conditions": conditions,
        "guidance": guidance,
        "replay": replay_stats,
    }


def _sorted(problems: list[Problem]) -> list[Problem]:
    def key(p: Problem):
        if p.shard is None:
            return (0, 0, _KIND_ORDER.get(p.kind, 99))
        try:
            n = shard_number(p.shard)
        except Exception:  # noqa: BLE001 - a problem may name an invalid id
            n = math.inf
        return (1, n, _KIND_ORDER.get(p.kind, 99))

    return sorted(problems, key=key)
