"""`trajflow pool up|status|down`, and the pool a training run with --ota-ratio uses."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator

POOL_EPILOG = """\
examples:
  ray start --head                                   # or use a running cluster: --address ray://HEAD:10001
  trajflow pool up --teacher gmm:latent10 --replicas 2
  trajflow pool status
  trajflow train --data s3://bucket/latent10 --out s3://bucket/runs/r2 --ota-ratio 0.25 --address auto
  trajflow pool down

The pool is a Ray Serve application (request batching; Serve replaces replicas that die). Replicas take
one GPU each when the cluster has GPUs (--gpus-per-replica), else they run on CPU.
"""


def add_pool_parser(sub) -> None:
    p = sub.add_parser("pool", help="the live teacher pool for online trajectory alignment (Ray Serve)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=POOL_EPILOG,
                       description="Start, inspect or stop a named, long-lived pool of teacher replicas on a Ray "
                                   "cluster. Training runs with --ota-ratio request rollouts from it.")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--address", default="auto",
                   help="Ray cluster to use (default auto: the cluster started on this machine by `ray start`)")
    p.add_argument("--name", default=None, help="pool name (default trajflow-pool)")
    p.add_argument("--teacher", help="teacher SPEC (up): gmm:latent10, gmm:FILE.json, flownet:URL, ...")
    p.add_argument("--replicas", type=int, default=1, help="teacher replicas (up; default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests merged into one solve (default 16)")
    p.add_argument("--storage-options", type=_json_object, help="fsspec options for a remote flownet teacher")
    p.add_argument("--resolution", type=int, default=None,
                   help="a diffusers teacher's image size in pixels: the corpus's (its card's run.resolution)")
    p.add_argument("--teacher-dtype", default=None,
                   help="a diffusers teacher's dtype: the corpus's (its card's run.teacher_dtype)")
    p.add_argument("--json", action="store_true", help="print status as JSON")
    p.set_defaults(func=cmd_pool)


def _json_object(text: str) -> dict:
    from trajflow.args import json_object_arg

    return json_object_arg(text)


def _print_status(st: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    print(f"pool {st['name']}: {st['status']}, {st['running_replicas']} running replicas "
          f"{st.get('replica_states', {})}")
    if st.get("replicas"):
        print(f"  rollouts {st['rollouts']}, {st['samples_per_s']:.0f} samples/s, {st['inflight']} requests in flight")
        for rid, r in sorted(st["replicas"].items()):
            print(f"  replica {rid}: {r['rollouts']} rollouts, {r['samples_per_s']:.0f} samples/s, "
                  f"{r['inflight']} in flight, last report {r['last_report_s_ago']:.0f} s ago")


def cmd_pool(args: argparse.Namespace) -> int:
    from pipeline import pool
    from trajflow.args import UsageError

    name = args.name or pool.DEFAULT_POOL
    if args.action == "up":
        if not args.teacher:
            raise UsageError("pool up needs --teacher SPEC")
        if args.replicas < 1 or args.max_batch_size < 1:
            raise UsageError("--replicas and --max-batch-size must be >= 1")
        from models.spec import parse_teacher_spec

        try:
            parse_teacher_spec(args.teacher)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        pool.connect(args.address)
        if args.action == "up":
            st = pool.pool_up(args.teacher, name=name, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                              cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                              storage_options=args.storage_options, teacher_dtype=args.teacher_dtype,
                              resolution=args.resolution)
            _print_status(st, args.json)
        elif args.action == "status":
            st = pool.pool_status(name)
            _print_status(st, args.json)
            return 0 if st["status"] == "RUNNING" else 1
        else:
            print(f"pool {name}: {'stopped' if pool.pool_down(name) else 'was not running'}")
    except pool.PoolError as e:
        print(f"trajflow pool: error: {e}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def rollout_teacher_for(cfg, address: str | None, pool_name: str | None, replicas: int) -> Iterator[object]:
    """The RolloutTeacher of a training run: None without OTA; the named pool on ``address``; or, with no
    address, a pool started on an embedded local Ray for the duration of the run."""
    if cfg.ota_ratio <= 0:
        yield None
        return
    from pipeline import pool
    from trainer.data import open_corpus
    from trainer.students import check_run, student_class_for

    card = open_corpus(cfg.data, cfg.storage_options).card
    # the student family's refusals and the batch split, before any pool is started or reached (the
    # Trainer checks the same again with the machine's defaults)
    check_run(card, cfg.resolved(student_class_for(card), cuda=False, bf16_supported=False))
    name = pool_name or pool.DEFAULT_POOL
    if address:
        pool.connect(address)
        client = pool.PoolClient(name, timeout_s=cfg.ota_timeout)
        try:
            yield client
        finally:
            client.close()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("with several training processes, start the pool on a Ray cluster (`trajflow pool up`) "
                         "and pass --address")
    import ray

    from models.registry import teacher_spec_for_card

    with tempfile.TemporaryDirectory() as tmp:
        from storage_schemas.locations import LocationPolicy

        policy = LocationPolicy(cfg.data, cfg.allow_teacher_locations)  # the pool loads what the card names
        spec = teacher_spec_for_card(card, tmp, check_location=lambda loc: policy.check(loc, "the teacher"))
        started = not ray.is_initialized()
        if started:
            ray.init(namespace=pool.NAMESPACE, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            pool.pool_up(spec, name=name, replicas=replicas, storage_options=cfg.storage_options,
                         teacher_dtype=card.run.get("teacher_dtype"), resolution=card.run.get("resolution"))
            client = pool.PoolClient(name, timeout_s=cfg.ota_timeout)
            try:
                yield client
            finally:
                client.close()
        finally:
            with contextlib.suppress(Exception):
                pool.pool_down(name)
            if started:
                from ray import serve

                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()
