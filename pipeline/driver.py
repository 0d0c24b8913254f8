"""The generation driver: Ray at the edge.

The driver writes (or checks) the dataset card, works out which shards still lack a commit record,
wraps ``GenerationWorker`` as GPU actors and runs its own ``ray.wait`` loop: it hands out shard
numbers (two in flight per actor, so uploads overlap solves), replaces actors that die, retries a
failed shard a bounded number of times, and fails the job with a clear message past that. At the
end it writes ``manifest.parquet`` from the commit records (finalize).

Re-running the same command resumes: committed shards are skipped. A different config against an
existing corpus is refused (the card's fingerprint differs).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from pipeline.config import GenerateConfig
from pipeline.storage import ObjectStore, describe_options
from storage_schemas import (
    COMMITS_DIR,
    DATASET_CARD,
    MANIFEST,
    SHARDS_DIR,
    CorpusFormatError,
    DatasetCard,
    ShardCommit,
    commit_relpath,
    manifest_to_parquet_bytes,
    shard_id,
    shard_relpath,
)

log = logging.getLogger(__name__)
IN_FLIGHT_PER_WORKER = 2
MAX_UNCOMMITTED_PER_WORKER = 4


def created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"trajflow {version('trajflow')}"
    except PackageNotFoundError:
        return "trajflow (source checkout)"


class GenerationFailed(RuntimeError):
    """The job cannot finish: a shard failed past its retries, or the corpus refuses this config."""


class ShardsLost(GenerationFailed):
    """Committed shards whose objects are missing or differ from their commit records.

    ``lost``: {shard_id: why}. The driver regenerates them; :func:`finalize` raises it rather than
    write a manifest that names them."""

    def __init__(self, url: str, lost: dict[str, str], vanished: list[str] | None = None):
        self.url = url
        self.lost = dict(lost)
        self.vanished = list(vanished or [])
        shown = "; ".join(f"{sid}: {why}" for sid, why in sorted(self.lost.items())[:3])
        more = f" (and {len(self.lost) - 3} more)" if len(self.lost) > 3 else ""
        parts = [f"{len(self.lost)} committed shard(s) are missing or damaged on storage: {shown}{more}"] \
            if self.lost else []
        if self.vanished:
            parts.append(f"{', '.join(self.vanished)} vanished right after being written")
        super().__init__(f"{url}: " + "; ".join(parts))


@dataclass
class GenerationSummary:
    url: str
    num_shards: int
    num_samples: int
    committed_now: int
    skipped: int
    retries: int
    actors_replaced: int
    seconds: float
    trajectories_per_second: float
    #: seconds until the first worker was up (teacher loaded), included in ``seconds``
    startup_seconds: float = 0.0
    #: worker seconds spent solving (summed over shards committed now)
    solve_seconds: float = 0.0
    #: CPU seconds of the solving thread in those solves (less than solve_seconds when the core
    #: was shared with other processes)
    solve_cpu_seconds: float = 0.0
    #: committer seconds (wall, and CPU of the committing thread) spent packing, uploading,
    #: verifying and recording the shards committed now (summed)
    commit_seconds: float = 0.0
    commit_cpu_seconds: float = 0.0
    #: committed shards found missing or damaged on storage (at resume or at finalize) and regenerated
    regenerated: int = 0
    #: committer actors that died and were replaced
    committers_replaced: int = 0

    @property
    def steady_trajectories_per_second(self) -> float:
        """Throughput after the first worker started: what a long run sustains."""
        return self.trajectories_per_second * self.seconds / max(self.seconds - self.startup_seconds, 1e-9)

    def line(self) -> str:
        return (f"generated {self.url}: {self.num_shards} shards / {self.num_samples} trajectories "
                f"({self.committed_now} committed now, {self.skipped} already committed), "
                f"{self.retries} retries, {self.actors_replaced} workers replaced, "
                + (f"{self.committers_replaced} committers replaced, " if self.committers_replaced else "")
                + (f"{self.regenerated} lost or damaged shards regenerated, " if self.regenerated else "")
                + f"{self.seconds:.1f}s, {self.trajectories_per_second:.1f} traj/s")


def build_card(cfg: GenerateConfig, described: dict[str, Any], prompts_sha: str | None) -> DatasetCard:
    num_classes = described["num_classes"]
    if cfg.prompts:
        conditioning = {"kind": "prompt"}
    elif num_classes is not None:
        conditioning = {"kind": "class", "num_classes": num_classes}
    else:
        conditioning = {"kind": "none"}
    guidance = cfg.guidance if isinstance(cfg.guidance, float) else {"min": cfg.guidance[0], "max": cfg.guidance[1]}
    run = {
        "num_trajectories": cfg.num_trajectories,
        "shard_size": cfg.shard_size,
        "base_seed": cfg.base_seed,
        "batch_size": cfg.batch_size,
        "teacher_spec": cfg.teacher,
        "classes": described["classes"],
        "prompts": None if not cfg.prompts else {"url": cfg.prompts, "sha256": prompts_sha},
        "shift": cfg.shift,
        "resolution": cfg.resolution,
        "teacher_dtype": cfg.teacher_dtype,
        "seed_rule": "sha256('trajflow-seed:{base_seed}:{index}')[:8] & (2**63-1)",
        "guidance_rule": "fixed, or min + (max-min) * sha256('trajflow-guidance:{base_seed}:{index}')[:8] / 2**64 "
                         "rounded to 1e-6",
        "class_rule": "classes[index % len(classes)]",
    }
    if cfg.validation_shards:  # the last shards of the plan; absent (old corpora, 0): all shards train
        run["validation_shards"] = cfg.validation_shards
    return DatasetCard(
        teacher=described["teacher"],
        solver={"name": cfg.solver, "num_steps": cfg.num_steps, "sigmas": list(cfg.grid), "guidance": guidance},
        saved_sigmas=list(cfg.saved),
        sample_shape=described["sample_shape"],
        dtype=cfg.dtype,
        conditioning=conditioning,
        run=run,
        created_by=created_by(),
        stages=list(cfg.stages) if cfg.saved_sigmas is None else None,
    )


def _card_diff(old: DatasetCard, new: DatasetCard) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    out = []
    for k in sorted(set(a) | set(b)):
        if k == "created_by":
            continue
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out += [f"{k}.{kk}" for kk in sorted(set(a[k]) | set(b[k])) if a[k].get(kk) != b[k].get(kk)]
            else:
                out.append(k)
    return out


def _check_card(store: ObjectStore, card: DatasetCard) -> None:
    """The stored card must be this run's (same fingerprint): else GenerationFailed naming what differs."""
    try:
        existing = DatasetCard.from_json(store.read_bytes(DATASET_CARD))
    except FileNotFoundError:
        raise GenerationFailed(f"{store.url}/{DATASET_CARD} disappeared while it was being checked; "
                               "re-run the same command") from None
    except CorpusFormatError as e:
        raise GenerationFailed(f"{store.url} holds an unreadable dataset card: {e}") from None
    if existing.fingerprint() != card.fingerprint():
        diff = ", ".join(_card_diff(existing, card)) or "content"
        raise GenerationFailed(
            f"{store.url} already holds a corpus generated with a different config (differs in: {diff}). "
            "Use a new --out, or re-run with the original settings to resume."
        )


def ensure_card(store: ObjectStore, card: DatasetCard) -> bool:
    """Create the card with create-only semantics, or check the one there. True if created now.

    Of two runs racing on one root, exactly one creates it (a conditional PUT on object storage,
    an exclusive create locally); the other reads the winner's card and, for a different config,
    fails with the "different config" error."""
    if store.create_only(DATASET_CARD, card.to_json().encode()):
        return True
    _check_card(store, card)
    return False


def verify_commits(store: ObjectStore, commits: dict[str, ShardCommit], *,
                   sha256: bool = False) -> dict[str, str]:
    """{shard_id: why} for every commit record whose shard object is missing, not at the planned
    path, or of another size than recorded (and with ``sha256``, of another sha256). One listing of
    ``shards/`` (plus one read per shard with ``sha256``)."""
    sizes = store.sizes(SHARDS_DIR) if commits else {}
    bad: dict[str, str] = {}
    for sid, c in sorted(commits.items()):
        expected = shard_relpath(sid)
        if c.path != expected:
            bad[sid] = f"its record names {c.path!r}, not {expected!r}"
            continue
        name = expected.rsplit("/", 1)[-1]
        if name not in sizes:
            bad[sid] = f"{expected} is missing"
        elif sizes[name] != c.num_bytes:
            bad[sid] = f"{expected} holds {sizes[name]} bytes, its record says {c.num_bytes}"
        elif sha256:
            try:
                got = store.sha256(expected)
            except FileNotFoundError:
                bad[sid] = f"{expected} is missing"
                continue
            if got != c.sha256:
                bad[sid] = f"{expected} has sha256 {got[:12]}..., its record says {c.sha256[:12]}..."
    return bad


def drop_commits(store: ObjectStore, lost: dict[str, str]) -> None:
    """Remove the commit records of ``lost`` shards (logged, naming why), so that a run killed
    before regenerating them does not trust them again either."""
    for sid, why in sorted(lost.items()):
        log.warning("committed shard %s is not on storage as recorded (%s): regenerating it", sid, why)
        store.remove(commit_relpath(sid))


def prepare_corpus(store: ObjectStore, card: DatasetCard, *, verify_sha256: bool = False,
                   lost: dict[str, str] | None = None) -> dict[str, ShardCommit]:
    """Write the card (create-only), or check an existing one; return the commit records already
    there that carry this card's fingerprint *and* whose shard object is on storage as recorded
    (size; with ``verify_sha256`` also sha256). The records of missing or damaged shards are removed
    (their shards are regenerated) and reported in ``lost`` when a dict is given."""
    fp = card.fingerprint()
    ensure_card(store, card)
    committed: dict[str, ShardCommit] = {}
    for name in store.list(COMMITS_DIR):
        if not name.endswith(".json"):
            continue
        try:
            commit = ShardCommit.from_json(store.read_bytes(f"{COMMITS_DIR}/{name}"))
        except (CorpusFormatError, FileNotFoundError) as e:
            log.warning("ignoring unreadable commit record %s: %s (its shard will be regenerated)", name, e)
            continue
        if commit.card_fingerprint == fp and name == f"{commit.shard_id}.json":
            committed[commit.shard_id] = commit
    bad = verify_commits(store, committed, sha256=verify_sha256)
    if bad:  # an earlier manifest names them too: until they are regenerated, the corpus is not final
        store.remove(MANIFEST)
    drop_commits(store, bad)
    for sid in bad:
        del committed[sid]
    if lost is not None:
        lost.update(bad)
    return committed


def finalize(store: ObjectStore, card: DatasetCard, commits: dict[str, ShardCommit], *,
             verify_sha256: bool = False) -> None:
    """Write manifest.parquet from the commit records of every planned shard, after checking that
    the card is there (recreated if missing: it is deterministic from the config) and that every
    shard is on storage as its record says; then check again that nothing vanished meanwhile.

    The manifest is written atomically (temporary file + rename locally, one PUT on object storage).
    A commit record missing on storage for a shard whose object is intact is rewritten.

    Raises:
        ShardsLost: shards missing or damaged (their records are removed; regenerate and call again).
        GenerationFailed: the card there is another config's.
    """
    bad = verify_commits(store, commits, sha256=verify_sha256)
    if bad:
        store.remove(MANIFEST)  # (one from an earlier finalize would name them)
        drop_commits(store, bad)
        raise ShardsLost(store.url, bad)
    if ensure_card(store, card):
        log.warning("%s/%s was missing at finalize: rewrote it", store.url, DATASET_CARD)
    records = set(store.list(COMMITS_DIR))
    for sid, c in sorted(commits.items()):
        if f"{sid}.json" not in records:
            log.warning("commit record of %s was missing at finalize (its shard is intact): rewrote it", sid)
            store.write_bytes(commit_relpath(sid), c.to_json().encode())
    data = manifest_to_parquet_bytes(commits.values(), validation=card.validation_shard_ids)
    store.write_atomic(MANIFEST, data)
    # storage can lose objects at any time (an outage, a wiped bucket): check once more after writing
    bad = verify_commits(store, commits)
    vanished = [] if store.exists(DATASET_CARD) else [DATASET_CARD]
    try:
        if store.size(MANIFEST) != len(data):
            vanished.append(MANIFEST)
    except FileNotFoundError:
        vanished.append(MANIFEST)
    if bad or vanished:
        store.remove(MANIFEST)  # never leave a manifest naming what is not there
        drop_commits(store, bad)
        raise ShardsLost(store.url, bad, vanished)


def _prompts_sha(cfg: GenerateConfig) -> str | None:
    """sha256 of the run's prompt file (recorded on the card), None without prompts."""
    if not cfg.prompts:
        return None
    from pipeline.prompts import load_prompts

    return load_prompts(cfg.prompts, cfg.storage_options)[1]


def generate_in_process(cfg: GenerateConfig) -> str:
    """Generate ``cfg``'s corpus in this process, without Ray: one ``GenerationWorker`` solves and commits
    every planned shard, then the manifest is finalized, exactly as ``run_generation`` would write them
    (the same card, shards and manifest bytes). For tests, benchmarks and small local corpora; returns
    ``cfg.out``."""
    from pipeline.worker import GenerationWorker

    worker = GenerationWorker(cfg.to_dict())
    card = build_card(cfg, worker.describe(), _prompts_sha(cfg))
    store = ObjectStore(cfg.out, cfg.storage_options)
    prepare_corpus(store, card)
    commits = {}
    for k in range(cfg.num_shards):
        row = worker.process_shard(k, card.fingerprint())
        commit = ShardCommit(**{key: v for key, v in row.items() if not key.startswith("_")})
        commits[commit.shard_id] = commit
    finalize(store, card, commits)
    return cfg.out


def _root_error(e: BaseException) -> str:
    """The original exception line of a Ray task / actor-creation error (its last 'XxxError: ...'
    line), without the remote traceback; the whole text when there is no such line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray"):
        return f"{type(cause).__name__}: {cause}"
    lines = [ln.strip() for ln in str(e).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return found[-1] if found else str(e)


def _committer_died(e: BaseException, committer: Any) -> bool:
    """Whether a failed commit call failed because the committer actor itself is dead or unreachable
    (not because its argument, the solve, failed: that error names the worker actor)."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(e, RayTaskError) or not isinstance(e, RayActorError):
        return False
    actor_id = getattr(e, "actor_id", None)
    try:
        own = committer._actor_id.hex()
    except AttributeError:
        return True
    return actor_id is None or actor_id == own


def _ensure_ray(address: str | None):
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # "local": always an embedded cluster, never an unrelated `ray start` one on this machine
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return ray


def run_generation(cfg: GenerateConfig, *, worker_env: dict[str, str] | None = None,
                   run_name: str | None = None, start_timeout_s: float = 600.0) -> GenerationSummary:
    """Generate (or resume) the corpus described by ``cfg`` on a Ray cluster.

    ``worker_env``: extra environment variables for the worker actors (e.g. credentials that the
    cluster's nodes do not have). ``run_name``: prefix of the workers' actor names (namespace
    "trajflow"), so operators can find them. ``start_timeout_s``: how long to wait for the first
    worker to be placed (GPUs may need an autoscaler) before failing with a clear message.
    """
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from pipeline.worker import GenerationWorker, ShardCommitter

    t_start = time.perf_counter()
    store = ObjectStore(cfg.out, cfg.storage_options)
    ray = _ensure_ray(cfg.address)
    gpus = cfg.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    have_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and have_gpus < gpus * cfg.num_workers:
        log.warning("%d workers x %s GPUs requested but the cluster has %s GPUs now; workers that cannot be "
                    "placed wait for capacity (autoscaler) and get no work meanwhile", cfg.num_workers, gpus,
                    have_gpus)
    prompts_sha = _prompts_sha(cfg)
    env = {"OMP_NUM_THREADS": str(max(1, int(cfg.cpus_per_worker))), **(worker_env or {})}
    run_name = run_name or f"gen-{uuid.uuid4().hex[:8]}"
    actor_count = 0

    def new_actor():
        nonlocal actor_count
        actor_count += 1
        return ray.remote(GenerationWorker).options(
            num_gpus=gpus, num_cpus=cfg.cpus_per_worker, max_restarts=0,
            name=f"trajflow-{run_name}-worker-{actor_count}", namespace="trajflow",
            runtime_env={"env_vars": env},
        ).remote(config_dict)

    committer_count = 0

    def new_committer():
        # I/O bound (pack, hash, upload, read back): no CPU reservation, two uploads at a time
        nonlocal committer_count
        committer_count += 1
        return ray.remote(ShardCommitter).options(
            num_cpus=0, max_restarts=0, max_concurrency=2, name=f"trajflow-{run_name}-committer-{committer_count}",
            namespace="trajflow", runtime_env={"env_vars": env},
        ).remote(cfg.out, cfg.storage_options)

    config_dict = cfg.to_dict()
    actors = [new_actor() for _ in range(cfg.num_workers)]
    # committers start with the workers: their start-up (imports) overlaps the teacher load instead
    # of competing with the first solves for CPU
    committers = [new_committer() for _ in range(max(1, cfg.num_workers))]
    # the first worker to start describes the teacher (fingerprint, shapes) for the dataset card
    starting = {a.describe.remote(): a for a in actors}
    described = None
    ready: list[Any] = []
    deadline = time.monotonic() + start_timeout_s
    while described is None:
        done, _ = ray.wait(list(starting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            for a in actors + committers:
                ray.kill(a)
            raise GenerationFailed(
                f"no worker could be placed within {start_timeout_s:.0f}s ({gpus} GPU(s) and "
                f"{cfg.cpus_per_worker} CPU(s) each; the cluster has {ray.cluster_resources()})")
        actor = starting.pop(done[0])
        try:
            described = ray.get(done[0])
            ready.append(actor)
        except (RayTaskError, RayActorError) as e:
            if not starting:
                for a in actors + committers:
                    ray.kill(a)
                raise GenerationFailed(f"the workers could not start teacher {cfg.teacher!r}: {_root_error(e)}") from None
            actors.remove(actor)
    # the committers need no GPU and were started alongside: wait (bounded) until they are up too.
    # One that failed to start is replaced when its first commit fails (see the loop below).
    ray.wait([c.pid.remote() for c in committers], num_returns=len(committers),
             timeout=max(0.0, deadline - time.monotonic()))
    startup_s = time.perf_counter() - t_start
    try:
        card = build_card(cfg, described, prompts_sha)
        fp = card.fingerprint()
        lost_at_start: dict[str, str] = {}
        committed = prepare_corpus(store, card, verify_sha256=cfg.verify_sha256, lost=lost_at_start)
    except BaseException:
        for a in actors + committers:
            ray.kill(a)
        raise
    planned = [shard_id(n) for n in range(cfg.num_shards)]
    pending = deque(n for n in range(cfg.num_shards) if planned[n] not in committed)
    skipped = cfg.num_shards - len(pending)
    attempts: dict[int, int] = {}
    retries = replaced = committers_replaced = 0
    regenerated = len(lost_at_start)
    done_samples = sum(c.num_samples for c in committed.values())
    # shard n: worker.solve_for_commit(n) -> (payload ref, status ref); committer.commit(payload ref, fp).
    # The driver waits on the small status ref only: the states never pass through it.
    solving: dict[Any, tuple[int, Any]] = {}  # status ref -> (shard, worker)
    committing: dict[Any, tuple[int, Any, Any]] = {}  # commit ref -> (shard, payload ref, committer)
    status_of: dict[Any, Any] = {}  # payload ref -> status ref
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.num_trajectories, initial=done_samples, unit="traj", desc="generate",
                   dynamic_ncols=True, smoothing=0.1)
        bar.set_postfix(shards=f"{len(committed)}/{cfg.num_shards}", retries=0)
    log.info("generating %d shards into %s (%d already committed; storage options %s)",
             len(pending), cfg.out, skipped, describe_options(cfg.storage_options))

    def outstanding(worker) -> int:
        return sum(1 for _, w in solving.values() if w is worker) + sum(
            1 for _, pref, _ in committing.values()
            if status_of.get(pref) not in solving and worker_of.get(pref) is worker)

    worker_of: dict[Any, Any] = {}  # payload ref -> worker, kept until the shard is committed

    def commit_via(sref, n):
        committer = committers[n % len(committers)]
        committing[committer.commit.remote(sref, fp)] = (n, sref, committer)

    def fill():
        for worker in ready:
            # two solves queued per worker keep it busy; at most MAX_UNCOMMITTED solved shards wait on storage
            while pending and sum(1 for _, w in solving.values() if w is worker) < IN_FLIGHT_PER_WORKER \
                    and outstanding(worker) < MAX_UNCOMMITTED_PER_WORKER:
                n = pending.popleft()
                attempts[n] = attempts.get(n, 0) + 1
                pref, iref = worker.solve_for_commit.options(num_returns=2).remote(n)
                solving[iref] = (n, worker)
                worker_of[pref] = worker
                status_of[pref] = iref
                commit_via(pref, n)

    def drop_shard(n):
        """Forget every in-flight ref of shard n (before requeueing it)."""
        for ref, (n2, _) in list(solving.items()):
            if n2 == n:
                del solving[ref]
        for ref, (n2, pref, _) in list(committing.items()):
            if n2 == n:
                del committing[ref]
                worker_of.pop(pref, None)
                status_of.pop(pref, None)

    def lose_worker(worker, why: str):
        nonlocal replaced
        if worker in ready:
            ready.remove(worker)
        if worker in actors:
            actors.remove(worker)
            replaced += 1
            log.warning("worker died (%s); starting a replacement", why)
            fresh = new_actor()
            actors.append(fresh)
            starting[fresh.pid.remote()] = fresh
        lost = sorted({n for n, w in solving.values() if w is worker})
        for n in lost:  # requeue what it was solving; counted against those shards' attempts
            drop_shard(n)
            pending.appendleft(n)

    def give_up_or_requeue(n, why: str):
        if attempts[n] >= cfg.max_retries + 1:
            raise GenerationFailed(
                f"shard {planned[n]} failed {attempts[n]} times; last error: {why}. Committed shards are kept; "
                "fix the cause and re-run the same command to resume.")
        log.warning("shard %s failed (%s); retrying", planned[n], why)
        drop_shard(n)
        pending.appendleft(n)

    committed_now = new_samples = 0
    solve_total = solve_cpu_total = commit_total = commit_cpu_total = 0.0
    finalize_rounds = 0
    try:
        fill()
        while True:
            while solving or committing or (pending and starting):
                waitable = list(solving) + list(committing) + list(starting)
                done, _ = ray.wait(waitable, num_returns=1, timeout=None if (solving or committing) else start_timeout_s)
                if not done:
                    raise GenerationFailed(f"no worker became available within {start_timeout_s:.0f}s")
                ref = done[0]
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        ready.append(actor)
                    except (RayTaskError, RayActorError) as e:
                        lose_worker(actor, f"failed to start: {e}")
                        if replaced > cfg.max_retries * max(1, cfg.num_workers):
                            raise GenerationFailed(f"workers keep failing to start; last error: {e}") from None
                elif ref in solving:
                    n, worker = solving.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as e:  # the worker died (node lost, OOM, killed)
                        retries += 1
                        attempts_n = attempts[n]
                        solving[ref] = (n, worker)  # so lose_worker requeues it with the rest
                        lose_worker(worker, type(e).__name__)
                        if attempts_n >= cfg.max_retries + 1:
                            raise GenerationFailed(
                                f"shard {planned[n]} failed {attempts_n} times (last: its worker died); giving up") from None
                    except RayTaskError as e:
                        retries += 1
                        cause = getattr(e, "cause", None) or e
                        give_up_or_requeue(n, f"{type(cause).__name__}: {cause}")
                elif ref in committing:
                    n, sref, committer = committing.pop(ref)
                    try:
                        result = ray.get(ref)
                    except (RayTaskError, RayActorError) as e:
                        if sref not in worker_of:
                            continue  # the shard was dropped (requeued) meanwhile
                        committer_died = _committer_died(e, committer)
                        if committer_died and committer in committers:  # replace it; the solve is kept
                            committers_replaced += 1
                            if committers_replaced > (cfg.max_retries + 1) * len(committers):
                                raise GenerationFailed(f"committers keep dying ({committers_replaced} replaced); "
                                                       f"last error: {_root_error(e)}") from None
                            ray.kill(committer)  # (an unavailable one must not come back and commit too)
                            committers[committers.index(committer)] = new_committer()
                            log.warning("committer died (%s); starting a replacement", type(e).__name__)
                        if status_of.get(sref) in solving:
                            if not committer_died:
                                continue  # the solve itself failed: handled (or about to be) through its own ref
                            # the solve is still running: hand its (future) result to a live committer
                            retries += 1
                            commit_via(sref, n)
                            continue
                        retries += 1
                        cause = getattr(e, "cause", None) or e
                        if attempts[n] >= cfg.max_retries + 1:
                            raise GenerationFailed(
                                f"shard {planned[n]} could not be committed after {attempts[n]} attempts; last error: "
                                f"{type(cause).__name__}: {cause}. Committed shards are kept; fix the cause and re-run "
                                "the same command to resume.") from None
                        attempts[n] += 1
                        log.warning("committing shard %s failed (%s); retrying the upload", planned[n], cause)
                        commit_via(sref, n)  # the solved shard is still in the object store: no re-solve
                        continue
                    worker_of.pop(sref, None)
                    status_of.pop(sref, None)
                    commit = ShardCommit(**{k: v for k, v in result.items() if not k.startswith("_")})
                    committed[commit.shard_id] = commit
                    committed_now += 1
                    new_samples += commit.num_samples
                    solve_total += float(result.get("_solve_seconds", 0.0))
                    solve_cpu_total += float(result.get("_solve_cpu_seconds", 0.0))
                    commit_total += float(result.get("_commit_seconds", 0.0))
                    commit_cpu_total += float(result.get("_commit_cpu_seconds", 0.0))
                    if bar is not None:
                        bar.update(commit.num_samples)
                if bar is not None:
                    bar.set_postfix(shards=f"{len(committed)}/{cfg.num_shards}", retries=retries)
                fill()
            missing = [s for s in planned if s not in committed]
            if missing:
                raise GenerationFailed(f"shards {missing[:5]} have no commit record after the run")
            try:
                finalize(store, card, {s: committed[s] for s in planned}, verify_sha256=cfg.verify_sha256)
                break
            except ShardsLost as e:  # storage lost objects during the run: regenerate them, then again
                finalize_rounds += 1
                if finalize_rounds > cfg.max_retries + 1:
                    raise GenerationFailed(f"{e}; objects keep vanishing from storage after {finalize_rounds} "
                                           "rounds of regenerating them. Committed shards are kept; fix the "
                                           "storage and re-run the same command to resume.") from None
                log.warning("%s; regenerating (round %d)", e, finalize_rounds)
                for sid in e.lost:
                    if sid in committed:
                        del committed[sid]
                        n = planned.index(sid)
                        attempts[n] = 0
                        pending.append(n)
                        regenerated += 1
                fill()
    except GetTimeoutError as e:
        raise GenerationFailed(f"timed out waiting for workers: {e}") from None
    finally:
        for ref in list(solving) + list(committing):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort; the actors are killed next anyway
                pass
        for a in actors + committers:
            ray.kill(a)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    total = sum(committed[s].num_samples for s in planned)
    return GenerationSummary(cfg.out, cfg.num_shards, total, committed_now, skipped, retries, replaced,
                             seconds, new_samples / max(seconds, 1e-9), startup_s, solve_total, solve_cpu_total,
                             commit_total, commit_cpu_total, regenerated, committers_replaced)
