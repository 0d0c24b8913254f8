"""The live teacher pool for online trajectory alignment: a Ray Serve deployment and its client.

    trajflow pool up --teacher gmm:latent10 --replicas 2 --address auto
    trajflow pool status
    trajflow pool down

``PoolReplica`` is a plain class (teacher loaded once, batched rollouts; testable without Ray).
``up`` wraps it as a Serve deployment named ``<name>`` with request batching (``serve.batch``
merges concurrent requests of equal grid length into one solve); Serve's controller replaces
replicas that die and health-checks the live ones. Replicas report counts to a small named stats
actor that ``status`` reads (rollouts/s, requests in flight per replica).

``PoolClient`` satisfies ``flowcore.rollout.RolloutTeacher``: ``submit`` returns a
``concurrent.futures.Future`` that resolves to the states or raises (a timeout, a dead replica, a
pool that was taken down) -- it never hangs, so the trainer keeps stepping on the corpus.
Tensors cross as numpy arrays. Prompt-conditioned teachers (diffusers) get the prompt TEXTS of a
request (``cond`` a list of str, sent as ``prompts``); the replica encodes them with its teacher's
own text encoders, once per distinct text of a batched solve, and solves with CFG at the guidance.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from flowcore.rollout import is_prompt_list, teacher_rollout
from pipeline.worker import default_device, resolve_teacher

DEFAULT_POOL = "trajflow-pool"
NAMESPACE = "trajflow"
_DEPLOYMENT = "TeacherPool"


class PoolError(RuntimeError):
    """The pool cannot be reached, started or found."""


# -- the plain worker -------------------------------------------------------------------------------
class PoolReplica:
    """Loads a teacher once and solves batches of rollout requests (see ``flowcore.rollout``)."""

    def __init__(self, teacher_spec: str, storage_options: dict[str, Any] | None = None, device: str | None = None,
                 teacher_dtype: str | None = None, resolution: int | None = None):
        self.spec = teacher_spec
        self.device = device or default_device()
        # a diffusers teacher is the corpus's only at the corpus's dtype and resolution (card.run)
        self.teacher = resolve_teacher(teacher_spec, storage_options, self.device, teacher_dtype, resolution)
        self.rollouts = 0
        self.samples = 0

    def describe(self) -> dict[str, Any]:
        t = self.teacher
        return {"teacher": self.spec, "fingerprint": t.fingerprint(), "sample_shape": list(t.sample_shape),
                "num_classes": t.num_classes, "device": self.device, "pid": os.getpid()}

    @staticmethod
    def _check(req: dict[str, Any]) -> None:
        for key in ("x", "sigmas", "save", "guidance", "method"):
            if key not in req:
                raise ValueError(f"rollout request lacks {key!r}")

    def _group_key(self, req) -> tuple:
        return (req["sigmas"].shape[1], tuple(req["save"]), req["method"], req["cond"] is None,
                req.get("prompts") is None)

    def rollout_many(self, requests: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Solve requests, merging those with equal grid length/save/method into one batched solve."""
        out: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            self._check(req)
            groups.setdefault(self._group_key(req), []).append(i)
        for idx in groups.values():
            reqs = [requests[i] for i in idx]
            x = torch.from_numpy(np.concatenate([r["x"] for r in reqs])).to(self.device)
            sig = torch.from_numpy(np.concatenate([r["sigmas"] for r in reqs]))
            cond = None
            if reqs[0].get("prompts") is not None:  # texts: encoded by teacher_rollout, once per distinct text
                cond = [t for r in reqs for t in r["prompts"]]
            elif reqs[0]["cond"] is not None:
                cond = torch.from_numpy(np.concatenate([r["cond"] for r in reqs])).to(self.device)
            guid = torch.from_numpy(np.concatenate([np.broadcast_to(np.asarray(r["guidance"], np.float32),
                                                                    (len(r["x"]),)) for r in reqs])).to(self.device)
            states = teacher_rollout(self.teacher, x, sig, reqs[0]["save"], cond=cond, guidance=guid,
                                     method=reqs[0]["method"]).float().cpu().numpy()
            start = 0
            for i, r in zip(idx, reqs):
                out[i] = states[start:start + len(r["x"])]
                start += len(r["x"])
            self.rollouts += len(reqs)
            self.samples += len(x)
        return out  # type: ignore[return-value]


# -- stats ----------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class PoolStats:
    """Counts reported by replicas; read by ``pool status``."""

    def __init__(self):
        self.replicas: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def report(self, replica: str, counts: dict[str, Any]) -> None:
        self.replicas[replica] = {**counts, "t": time.time()}

    def snapshot(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "started": self.started, "now": time.time()}


def _stats_name(name: str) -> str:
    return f"{name}-stats"


# -- Ray Serve wrapping -----------------------------------------------------------------------------
def build_app(teacher_spec: str, *, name: str = DEFAULT_POOL, replicas: int = 1, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, max_batch_size: int = 16, storage_options: dict | None = None,
              teacher_dtype: str | None = None, resolution: int | None = None):
    """The Serve application of the pool (not yet running)."""
    from ray import serve

    @serve.deployment(name=_DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=64,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                      health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=2.0)
    class TeacherPoolDeployment:
        def __init__(self, spec: str, opts: dict | None, stats_name: str, dtype: str | None = None,
                     res: int | None = None):
            torch.set_num_threads(max(1, int(os.environ.get("TRAJFLOW_POOL_THREADS", "1"))))
            self.replica = PoolReplica(spec, opts, teacher_dtype=dtype, resolution=res)
            self.stats = ray.get_actor(stats_name, namespace=NAMESPACE)
            self.id = serve.get_replica_context().replica_id.unique_id
            self.inflight = 0
            self.started = time.time()
            self.lock = threading.Lock()

        def describe(self) -> dict[str, Any]:
            return self.replica.describe()

        def _report(self) -> None:
            r = self.replica
            self.stats.report.remote(self.id, {"rollouts": r.rollouts, "samples": r.samples, "inflight": self.inflight,
                                               "started": self.started, "pid": os.getpid()})

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.003)
        async def rollout(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
            # the solve runs off the event loop, so requests keep arriving (and batching) meanwhile
            with self.lock:
                self.inflight += len(requests)
            try:
                return await asyncio.get_running_loop().run_in_executor(None, self.replica.rollout_many, requests)
            finally:
                with self.lock:
                    self.inflight -= len(requests)
                self._report()

    return TeacherPoolDeployment.bind(teacher_spec, storage_options or {}, _stats_name(name), teacher_dtype, resolution)


def _quiet_serve() -> None:
    """Serve logs every deployment event at INFO to the console; keep a user's terminal for progress bars
    (run with -v, i.e. INFO logging, to see them)."""
    import logging

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one running on this machine), unless joined already."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        raise PoolError(f"no Ray cluster at {address or 'auto'} ({e}); start one with `ray start --head` "
                        "or pass --address") from None


def pool_up(teacher_spec: str, *, name: str = DEFAULT_POOL, replicas: int = 1, gpus_per_replica: float | None = None,
            cpus_per_replica: float = 1.0, max_batch_size: int = 16, storage_options: dict | None = None,
            timeout_s: float = 300.0, teacher_dtype: str | None = None, resolution: int | None = None) -> dict[str, Any]:
    """Start (or update) the pool on the connected cluster; returns its status once replicas run.
    ``teacher_dtype`` / ``resolution``: a diffusers teacher's dtype and image size (as in generate)."""
    from ray import serve

    if replicas < 1:
        raise ValueError("a pool needs at least 1 replica")
    _quiet_serve()
    if gpus_per_replica is None:  # GPU workers when the cluster has GPUs, else CPU replicas
        gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    try:
        ray.get_actor(_stats_name(name), namespace=NAMESPACE)
    except ValueError:
        PoolStats.options(name=_stats_name(name), namespace=NAMESPACE, lifetime="detached").remote()
    serve.start(proxy_location="Disabled")
    app = build_app(teacher_spec, name=name, replicas=replicas, gpus_per_replica=gpus_per_replica,
                    cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size, storage_options=storage_options,
                    teacher_dtype=teacher_dtype, resolution=resolution)
    serve.run(app, name=name, route_prefix=None, blocking=False)
    deadline = time.monotonic() + timeout_s
    while True:
        st = pool_status(name)
        if st["status"] == "RUNNING" and st["running_replicas"] >= replicas:
            return st
        if st["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise PoolError(f"pool {name!r} failed to start: {st.get('message') or st['status']}")
        if time.monotonic() > deadline:
            raise PoolError(f"pool {name!r} did not start {replicas} replicas within {timeout_s:.0f} s: {st}")
        time.sleep(0.5)


def pool_status(name: str = DEFAULT_POOL) -> dict[str, Any]:
    """Application status, replica counts by state, and rollouts/s from the replicas' reports."""
    from ray import serve

    apps = serve.status().applications
    if name not in apps:
        return {"name": name, "status": "NOT_RUNNING", "running_replicas": 0, "replicas": {}}
    app = apps[name]
    dep = app.deployments.get(_DEPLOYMENT)
    states = {str(getattr(k, "value", k)): int(v) for k, v in (dep.replica_states if dep else {}).items()}
    out = {"name": name, "status": str(getattr(app.status, "value", app.status)), "message": app.message,
           "running_replicas": states.get("RUNNING", 0), "replica_states": states}
    try:
        snap = ray.get(ray.get_actor(_stats_name(name), namespace=NAMESPACE).snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - status must work even when the stats actor is gone
        snap = {"replicas": {}, "now": time.time()}
    per = {}
    for rid, c in snap["replicas"].items():
        age = max(1e-9, c["t"] - c["started"])
        per[rid] = {"rollouts": c["rollouts"], "samples": c["samples"], "inflight": c["inflight"],
                    "rollouts_per_s": c["rollouts"] / age, "samples_per_s": c["samples"] / age,
                    "last_report_s_ago": snap["now"] - c["t"]}
    out["replicas"] = per
    out["rollouts"] = sum(p["rollouts"] for p in per.values())
    out["samples_per_s"] = sum(p["samples_per_s"] for p in per.values() if p["last_report_s_ago"] < 60)
    out["inflight"] = sum(p["inflight"] for p in per.values() if p["last_report_s_ago"] < 60)
    return out


def pool_down(name: str = DEFAULT_POOL) -> bool:
    """Delete the pool's application and stats actor; False if it was not running."""
    from ray import serve

    running = name in serve.status().applications
    if running:
        serve.delete(name)
    try:
        ray.kill(ray.get_actor(_stats_name(name), namespace=NAMESPACE))
    except ValueError:
        pass
    return running


def replica_actor_names(name: str = DEFAULT_POOL) -> list[str]:
    """Ray actor names of the pool's live replicas (to inspect or kill one)."""
    prefix = f"SERVE_REPLICA::{name}#{_DEPLOYMENT}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


# -- the client -------------------------------------------------------------------------------------
class PoolClient:
    """``flowcore.rollout.RolloutTeacher`` served by the live pool (see module docstring)."""

    def __init__(self, name: str = DEFAULT_POOL, *, timeout_s: float = 60.0, max_inflight: int = 8):
        from ray import serve

        _quiet_serve()
        if name not in serve.status().applications:
            raise PoolError(f"no teacher pool named {name!r} on this Ray cluster; start one with "
                            f"`trajflow pool up --teacher SPEC --name {name}`")
        self.name, self.timeout_s = name, float(timeout_s)
        self.handle = serve.get_app_handle(name)
        info = self.handle.describe.remote().result(timeout_s=timeout_s)
        self.info = info
        self.sample_shape = tuple(info["sample_shape"])
        self.num_classes = info["num_classes"]
        self._threads = cf.ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="pool-client")

    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def _call(self, req: dict[str, Any]) -> torch.Tensor:
        resp = self.handle.rollout.remote(req)
        return torch.from_numpy(np.array(resp.result(timeout_s=self.timeout_s)))

    def submit(self, x_start_BX, sigmas_BS, save, cond=None, guidance=1.0, method="euler") -> cf.Future:
        prompts = None
        if is_prompt_list(cond):  # prompt texts: the replica's teacher encodes them
            prompts, cond = [str(t) for t in cond], None
        elif cond is not None and not isinstance(cond, torch.Tensor):
            raise TypeError("pool rollouts take class ids (a long tensor), prompt texts (a list of str) or None as cond")
        req = {"x": x_start_BX.detach().float().cpu().numpy(),
               "sigmas": torch.as_tensor(sigmas_BS, dtype=torch.float64).cpu().numpy(),
               "save": [int(i) for i in save], "cond": None if cond is None else cond.cpu().numpy(),
               "prompts": prompts,
               "guidance": torch.as_tensor(guidance, dtype=torch.float32).cpu().numpy(), "method": method}
        return self._threads.submit(self._call, req)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
