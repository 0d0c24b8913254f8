"""Generation throughput: the full pipeline (1 worker actor) vs a bare loop of the same solves.

Both sides solve the same trajectories (same teacher, seeds, batches, solver grid, torch thread
count). The pipeline additionally packs deterministic tars, hashes, uploads, reads back to verify,
writes commit records and the manifest, all through Ray. Prints one JSON object; the ratio
pipeline/bare is the figure of merit (target >= 0.9 on CPU with latent10).

    python benchmarks/generate_throughput.py                       # latent10, CPU
    python benchmarks/generate_throughput.py --teacher diffusers:/models/sd3 --prompts prompts.jsonl \\
        --resolution 1024 --teacher-dtype bfloat16 --guidance 7 --num-steps 28 --stages 4 \\
        --batch-size 8 --shard-size 64 --num-trajectories 256 --device cuda
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
    process, no I/O and no Ray: the worker class's own ``solve_states`` (noise, prompt encoding with
    its per-shard cache, the solve, the copy to host), called directly."""
    from pipeline.worker import GenerationWorker

    worker = GenerationWorker(cfg.to_dict(), device=device)  # sets the torch thread count from cpus_per_worker
    torch.set_num_threads(threads)
    t0, cpu0 = time.perf_counter(), time.thread_time()
    for n in range(worker.plan.num_shards):
        worker.solve_states(n)
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
    ap.add_argument("--prompts", help="prompt file (.jsonl/.parquet) for prompt-conditioned diffusers teachers")
    ap.add_argument("--resolution", type=int, help="image side in pixels (diffusers teachers)")
    ap.add_argument("--teacher-dtype", help="teacher network dtype, e.g. bfloat16 on GPUs")
    ap.add_argument("--shift", type=float, help="sigma-grid shift (default: the teacher's scheduler shift, else 1)")
    ap.add_argument("--stages", default="8,4,2", help="window stages, finest first")
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
                         guidance=args.guidance, cpus_per_worker=args.threads, prompts=args.prompts,
                         resolution=args.resolution, teacher_dtype=args.teacher_dtype, shift=args.shift,
                         stages=tuple(int(x) for x in args.stages.split(",")),
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
        "teacher": args.teacher, "device": args.device, "threads": args.threads, "prompts": args.prompts,
        "resolution": args.resolution, "teacher_dtype": args.teacher_dtype,
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
