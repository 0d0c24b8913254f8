"""Generation throughput: the full pipeline (1 worker actor) vs a bare loop of the same solves.

Both sides solve the same trajectories (same teacher, seeds, batches, solver grid, torch thread
count). The pipeline additionally packs deterministic tars, hashes, uploads, reads back to verify,
writes commit records and the manifest, all through Ray. Prints one JSON object; the ratio
pipeline/bare is the figure of merit (target >= 0.9 on CPU with latent10).

    python benchmarks/generate_throughput.py                       # latent10, CPU
    python benchmarks/generate_throughput.py --teacher diffusers:/models/sd3 --device cuda ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch


def bare_loop(cfg, threads: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) to solve every trajectory of the plan in one
    process, no I/O."""
    from flowcore.solvers import seeded_noise, solve_teacher
    from pipeline.worker import make_plan, resolve_teacher

    torch.set_num_threads(threads)
    teacher = resolve_teacher(cfg.teacher, cfg.storage_options, device)
    plan = make_plan(cfg, teacher, None)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for n in range(plan.num_shards):
        specs = plan.shard_samples(n)
        for s in range(0, len(specs), cfg.batch_size):
            batch = specs[s:s + cfg.batch_size]
            noise = seeded_noise([b.seed for b in batch], teacher.sample_shape, torch.float32, device)
            cond = None if batch[0].class_id is None else torch.tensor([b.class_id for b in batch], device=device)
            g = torch.tensor([b.guidance for b in batch], device=device)
            traj = solve_teacher(teacher, noise, cfg.grid, cond=cond, guidance=g, method=cfg.solver,
                                 capture_sigmas=cfg.saved)
            traj.states_BKX.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.thread_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="gmm:latent10")
    ap.add_argument("--num-trajectories", type=int, default=8192)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--num-steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--guidance", default="1.5:4.5")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="corpus URL for the pipeline run (default: a temp dir)")
    args = ap.parse_args()

    import ray

    from pipeline.config import GenerateConfig
    from pipeline.driver import run_generation

    tmp = tempfile.mkdtemp(prefix="tf-bench-")
    out = args.out or os.path.join(tmp, "corpus")
    cfg = GenerateConfig(teacher=args.teacher, out=out, num_trajectories=args.num_trajectories,
                         shard_size=args.shard_size, num_steps=args.num_steps, batch_size=args.batch_size,
                         guidance=args.guidance, cpus_per_worker=args.threads,
                         gpus_per_worker=1 if args.device.startswith("cuda") else 0, progress=False)
    load_before = os.getloadavg()[0]  # other work on the machine slows both sides, not equally
    bare_before = bare_loop(cfg, args.threads, args.device)
    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
    try:
        summary = run_generation(cfg)  # includes actor start, card, uploads + read-back, manifest
    finally:
        ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    bare_after = bare_loop(cfg, args.threads, args.device)  # bracket the pipeline run: machine drift cancels
    bare_s = (bare_before[0] + bare_after[0]) / 2
    bare_cpu_s = (bare_before[1] + bare_after[1]) / 2
    bare_tps = args.num_trajectories / bare_s
    # steady state: from the first worker being up (teacher loaded) to the manifest written
    pipe_tps = summary.steady_trajectories_per_second
    print(json.dumps({
        "benchmark": "generate_throughput",
        "teacher": args.teacher, "device": args.device, "threads": args.threads,
        "num_trajectories": args.num_trajectories, "shard_size": args.shard_size, "num_steps": args.num_steps,
        "batch_size": args.batch_size, "bare_loop_traj_per_s": round(bare_tps, 1),
        "pipeline_traj_per_s": round(pipe_tps, 1), "ratio_pipeline_over_bare": round(pipe_tps / bare_tps, 3),
        "pipeline_seconds": round(summary.seconds, 2), "pipeline_startup_seconds": round(summary.startup_seconds, 2),
        "pipeline_traj_per_s_including_startup": round(summary.trajectories_per_second, 1),
        "bare_seconds": round(bare_s, 2), "pipeline_worker_solve_seconds": round(summary.solve_seconds, 2),
        # CPU seconds the solving thread got: wall above CPU means the core was shared (other load)
        "bare_cpu_seconds": round(bare_cpu_s, 2), "pipeline_worker_solve_cpu_seconds": round(summary.solve_cpu_seconds, 2),
        "committer_seconds_per_shard": round(summary.commit_seconds / max(summary.committed_now, 1), 3),
        "committer_cpu_seconds_per_shard": round(summary.commit_cpu_seconds / max(summary.committed_now, 1), 3),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }))


if __name__ == "__main__":
    main()
