"""Quality at an equal training budget: methods x seeds x steps {1, 2, 4} x metrics, with 95% intervals.

    python benchmarks/quality.py                                   # latent10, the quality method set, 3 seeds
    python benchmarks/quality.py --teacher digits:8x8              # the digits testbed (curved, real images)
    python benchmarks/quality.py --teacher gmm:/path/spec.json     # any GMM spec (models.gmm.GMMSpec JSON)
    python benchmarks/quality.py --methods all --steps 1500        # every method of trajflow.compare
    python benchmarks/ablation.py                                   # the ablation set (same harness)

Every method is trained with every seed (``--seeds``, default 3) on the same corpus; each cell reports the
mean over seeds and a 95% Student-t interval (``ci``; Markdown: mean +- half-width). With two methods that
differ by one component (``trajflow.compare.ABLATION_STEPS``) the JSON's ``effects`` give the paired
difference per seed, its interval and a verdict: "helps" / "hurts" only where the interval excludes zero,
"no measurable effect" otherwise. On the digits testbed the metrics are those of ``evaluation.digits``
(coupling error, Frechet distance in a classifier's feature space, class accuracy) and a PNG grid of
samples per method and step count is written next to the runs (``grid_png``).

It generates a corpus with the real pipeline (embedded Ray, resumable), trains every method with the
real trainer on that corpus at the same optimizer steps x batch size (reusing finished runs), and
evaluates each against the exact GMM: coupling error vs the teacher's high-accuracy endpoint, sliced
Wasserstein distance to the true mixture, exact NLL per dimension, class accuracy. Online methods
get rollouts from an in-process teacher thread (``--pool`` uses the live Ray Serve pool instead).
Prints one JSON object: the table rows, the targets, training summaries, the command and machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None, default_methods: str = "quality"):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="gmm:latent10",
                    help="gmm:PRESET, gmm:FILE.json or the digits testbed digits:8x8 (default gmm:latent10)")
    ap.add_argument("--methods", default=default_methods,
                    help=f"a set (all, ablation, quality, demo) or comma-separated names (default {default_methods})")
    ap.add_argument("--trajectories", type=int, help="corpus size (default 8192; digits: 2048)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per method (default 3; 1 = no intervals)")
    ap.add_argument("--steps", type=int, help="optimizer steps of every method (default: the teacher's profile)")
    ap.add_argument("--batch-size", type=int, help="samples per step of every method (default 256)")
    ap.add_argument("--width", type=int, help="student width of every method (default: the teacher's profile)")
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG weight of the corpus (class-conditional GMMs)")
    ap.add_argument("--shift", type=float, default=1.0, help="time shift of the grids (default 1.0)")
    ap.add_argument("--num-samples", type=int, help="evaluation samples (default 2000; digits: 1000)")
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/trajflow/bench"),
                    help="where corpora and runs are kept (re-runs reuse them)")
    ap.add_argument("--pool", action="store_true", help="serve rollouts from a Ray Serve pool on an embedded Ray")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None, default_methods: str = "quality") -> dict:
    args = parse_args(argv, default_methods)
    import torch

    from models.registry import build_teacher
    from models.spec import parse_teacher_spec
    from trajflow.compare import (
        PROFILES,
        Profile,
        ablation_effects,
        check_targets,
        compare,
        markdown_effects,
        markdown_table,
        resolve_methods,
    )

    try:
        spec = parse_teacher_spec(args.teacher)
        if spec.kind not in ("gmm", "digits"):
            raise ValueError("quality.py needs a GMM teacher (gmm:PRESET or gmm:FILE.json: exact metrics) or the "
                             "digits testbed (digits:8x8)")
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        methods = resolve_methods(args.methods)
        teacher = build_teacher(args.teacher)  # a bad spec fails here, before any work
    except (ValueError, OSError) as e:
        sys.exit(f"quality.py: error: {e}")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    t0 = time.perf_counter()
    name = Path(spec.target).stem if spec.target.endswith(".json") else spec.target
    if spec.kind == "digits":
        name = "digits"
    import copy

    profile = copy.deepcopy(PROFILES.get(name, Profile()))
    if args.trajectories is None:
        args.trajectories = 2048 if spec.kind == "digits" else 8192
    if args.num_samples is None:
        args.num_samples = 1000 if spec.kind == "digits" else 2000
    if args.steps:
        profile.steps = args.steps
    if args.batch_size:
        profile.batch_size = args.batch_size
    if args.width:
        profile.student_width = args.width
    guidance = args.guidance if teacher.num_classes else 1.0
    key = hashlib.sha256(json.dumps([teacher.fingerprint(), args.trajectories, guidance, args.shift]).encode()).hexdigest()[:10]
    root = Path(args.out) / f"{name}-{key}"
    corpus = root / "corpus"
    progress = not args.no_progress

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import ray

    from pipeline.config import GenerateConfig
    from pipeline.driver import run_generation

    log(f"corpus: {args.trajectories} trajectories of {args.teacher} -> {corpus}")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        spec_arg = args.teacher if not spec.target.endswith(".json") else f"gmm:{Path(spec.target).resolve()}"
        gen = GenerateConfig(teacher=spec_arg, out=str(corpus), num_trajectories=args.trajectories,
                             shard_size=512, num_steps=32, stages=(8, 4), guidance=guidance, shift=args.shift,
                             progress=progress)
        run_generation(gen)
        rollout = None
        if args.pool:
            import tempfile

            from models.registry import teacher_spec_for_card
            from pipeline import pool
            from trainer.data import open_corpus

            tmp = tempfile.mkdtemp()
            pool.pool_up(teacher_spec_for_card(open_corpus(str(corpus)).card, tmp), replicas=1)
            rollout = pool.PoolClient()
        else:
            from flowcore.rollout import LocalRollout

            rollout = LocalRollout(build_teacher(spec_arg))
        result = compare(str(corpus), root / "runs", methods, profile, shift=args.shift, guidance=guidance,
                         rollout_teacher=rollout, num_samples=args.num_samples, progress=progress, log=log,
                         seeds=tuple(range(args.seeds)))
        rollout.close()
    finally:
        ray.shutdown()
    grid_png = None
    if result.get("grid_samples"):
        from evaluation.digits import write_sample_grid

        grid_png = write_sample_grid(list(result.pop("grid_samples").items()), root / f"samples-{'-'.join(methods)}.png"
                                     if len(methods) <= 4 else root / "samples.png",
                                     title="digits testbed: samples per method and step count (seed 0)")
    effects = ablation_effects(result)
    out = {
        "benchmark": "ablation" if default_methods == "ablation" else "quality", "teacher": args.teacher,
        "methods": methods, "trajectories": args.trajectories, "seeds": result["seeds"],
        "interval": "95% Student-t over seeds", "rows": result["rows"], "effects": effects,
        "targets": check_targets(result), "training": result["training"],
        "training_by_seed": result["training_by_seed"],
        "classifier": result.get("classifier"), "grid_png": grid_png,
        "profile": result["profile"], "shift": args.shift, "guidance": guidance, "num_samples": args.num_samples,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(result) + "\n" + (
            "\n" + markdown_effects(effects) + "\n" if effects else ""))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
