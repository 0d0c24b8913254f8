"""Step time with OTA mixing from the live teacher pool vs no OTA (same run, same corpus and student).

    python benchmarks/ota_step_time.py                        # --ota-ratio 0.25 (fresh and student) vs 0
    python benchmarks/ota_step_time.py --steps 300 --width 512

The pool is the real Ray Serve deployment (1 replica, 1 CPU thread) on an embedded local Ray; the
trainer is the real Trainer (1 torch thread, so the replica has a core to itself: "spare capacity").
Each configuration trains --steps optimizer steps at the same total batch; the first --skip steps
are excluded (start-up); the three configurations are interleaved over --cycles and the medians compared. Prints one JSON object; target: ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_run(corpus: str, out: str, args, ratio: float, mode: str, client) -> dict:
    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    cfg = TrainConfig(data=corpus, out=out, stages=(8, 4), max_steps=args.steps, batch_size=args.batch_size,
                      init="scratch", student_width=args.width, student_depth=args.depth, progress=False,
                      log_every=1, checkpoint_every=10**6, num_workers=1, ota_ratio=ratio, ota_mode=mode,
                      resume=False, ota_prefetch=2)
    t = Trainer(cfg, client if ratio > 0 else None).build()
    try:
        t.train()
        stats = dict(t.part("online").stats) if t.part("online") is not None else {}
    finally:
        t.close()
    rows = [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("eval")]  # training steps only
    # wall time between consecutive logged steps (log_every=1), start-up excluded
    stamps = [r["time"] for r in rows[args.skip:]]
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ota_ratio": ratio, "ota_mode": mode, "step_ms_median": 1000 * sorted(times)[len(times) // 2],
            "step_ms_mean": 1000 * sum(times) / len(times), **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=20, help="first steps not timed")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--trajectories", type=int, default=4096)
    ap.add_argument("--cycles", type=int, default=2, help="interleaved repetitions of the three configurations")
    args = ap.parse_args()
    import logging

    import ray
    import torch

    logging.getLogger("ray").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from pipeline import pool
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    tmp = tempfile.mkdtemp(prefix="ota-bench-")
    corpus = generate_in_process(GenerateConfig(
        teacher="gmm:latent10", out=os.path.join(tmp, "latent10"), num_trajectories=args.trajectories,
        shard_size=512, num_steps=32, stages=(8, 4), guidance=2.0, validation_trajectories=0, progress=False))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        pool.pool_up("gmm:latent10", name="ota-bench", replicas=1, cpus_per_replica=1)
        client = pool.PoolClient("ota-bench")
        # configurations interleaved over --cycles, so machine drift hits every configuration alike
        results = []
        for cycle in range(args.cycles):
            for ratio, mode in ((0.0, "none"), (0.25, "fresh"), (0.25, "student")):
                r = timed_run(corpus, os.path.join(tmp, f"{mode}-{cycle}"), args, ratio, mode if ratio else "fresh",
                              client)
                results.append({**r, "config": mode, "cycle": cycle})
        client.close()
        pool.pool_down("ota-bench")
    finally:
        ray.shutdown()
    def median_of(config):
        v = sorted(r["step_ms_median"] for r in results if r["config"] == config)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    base = median_of("none")
    out = {
        "benchmark": "ota_step_time", "results": results, "baseline_step_ms_median": base,
        "ratio_fresh": median_of("fresh") / base, "ratio_student": median_of("student") / base,
        "ratio_per_cycle": [{m: next(r["step_ms_median"] for r in results if r["cycle"] == c and r["config"] == m) /
                             next(r["step_ms_median"] for r in results if r["cycle"] == c and r["config"] == "none")
                             for m in ("fresh", "student")} for c in range(args.cycles)],
        "target": "ratio <= 1.1",
        "config": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "torch": torch.__version__},
        "command": "python benchmarks/ota_step_time.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
