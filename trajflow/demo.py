"""`trajflow demo`: the main job on embedded defaults (local Ray, local files, built-in teachers).

It runs the parts of the product that exist end to end: generate authentic teacher trajectory
corpora for the built-in ``latent10`` and ``ring2d`` GMM teachers on an embedded Ray cluster, audit
them against their manifests (deep checks + replay), distil a 4-step ring2d student with
progressive reflow and aligned-v, evaluate it against the exact teacher, plot trajectories and
samples, and write ``DIR/report.md`` and ``DIR/metrics.json``. Re-running reuses what is done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEMO_CORPORA = {
    # name: generate settings (beyond --out)
    "latent10": dict(teacher="gmm:latent10", shard_size=256, num_steps=32, stages=(8, 4, 2), guidance="1.5:4.5"),
    "ring2d": dict(teacher="gmm:ring2d", shard_size=256, num_steps=32, stages=(8, 4, 2), guidance=1.0),
}


def _plot_ring2d(corpus: Path, png: Path, max_samples: int = 400) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage_schemas import DatasetCard, iter_shard_samples, manifest_from_parquet_bytes

    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    rows = manifest_from_parquet_bytes((corpus / "manifest.parquet").read_bytes())
    states, classes = [], []
    for row in rows:
        for rec in iter_shard_samples((corpus / row.path).read_bytes(), row.shard_id, card):
            states.append(rec.states.float())
            classes.append(rec.meta.get("class_id", 0))
            if len(states) >= max_samples:
                break
        if len(states) >= max_samples:
            break
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10")
    for s, c in zip(states, classes):
        ax.plot(s[:, 0], s[:, 1], "-", color=cmap(c % 10), alpha=0.25, lw=0.7)
        ax.plot(s[-1, 0], s[-1, 1], ".", color=cmap(c % 10), ms=3)
    ax.set_title(f"ring2d: {len(states)} authentic teacher trajectories\n"
                 f"(states at the {card.num_saved_states} saved sigmas, noise -> data)")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _train_and_eval_ring2d(out: Path, progress: bool) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from flowcore.schedules import few_step_sigmas
    from flowcore.solvers import seeded_noise, solve, solve_teacher
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate_gmm, student_velocity_fn
    from trainer.loop import Trainer

    cfg = TrainConfig(data=str(out / "corpora" / "ring2d"), out=str(out / "runs" / "ring2d"), stages=(8, 4),
                      steps_per_stage=(300, 500), batch_size=256, lr=1e-3, student_width=128, teacher_fit_steps=2000,
                      num_workers=0, progress=progress, checkpoint_every=400)
    trainer = Trainer(cfg).build()
    try:
        trainer.train()
        trainer.export_student()
        student = copy_of(trainer.ema)
        teacher = trainer.teacher
    finally:
        trainer.close()
    report = evaluate_gmm(student, teacher, shift=1.0, guidance=1.0, steps=(1, 2, 4), num_samples=2000)
    n = 800
    noise = seeded_noise([10**15 + i for i in range(n)], (2,), torch.float64)
    cls = torch.arange(n) % 8
    x_s = solve(student_velocity_fn(student, cls, None), noise, few_step_sigmas(4), capture_sigmas=[0.0]).final
    x_t = solve_teacher(teacher, noise, few_step_sigmas(32), cond=cls, capture_sigmas=[0.0]).final
    x_t4 = solve_teacher(teacher, noise, few_step_sigmas(4), cond=cls, capture_sigmas=[0.0]).final
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, [("teacher, 32 steps", x_t), ("teacher, 4 steps", x_t4),
                                     ("trajflow student, 4 steps", x_s)]):
        ax.scatter(x[:, 0], x[:, 1], c=cls, cmap="tab10", s=3)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "ring2d_samples.png", dpi=100)
    plt.close(fig)
    return report


def copy_of(net):
    import copy

    return copy.deepcopy(net).double().eval()


def run_demo(args) -> int:
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.driver import GenerationFailed, run_generation

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"corpora": {}}
    print(f"trajflow demo -> {out}")
    print("[1/4] starting an embedded local Ray cluster")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        for i, (name, settings) in enumerate(DEMO_CORPORA.items(), 1):
            n = args.num_trajectories if name == "latent10" else max(256, args.num_trajectories // 2)
            print(f"[2/4] generating corpus {i}/{len(DEMO_CORPORA)}: {name} ({n} trajectories, {settings['teacher']})")
            cfg = GenerateConfig(out=str(out / "corpora" / name), num_trajectories=n,
                                 progress=not args.no_progress, **settings)
            try:
                summary = run_generation(cfg)
            except GenerationFailed as e:
                print(f"trajflow demo: generation failed: {e}")
                return 1
            print("      " + summary.line())
            metrics["corpora"][name] = {"url": cfg.out, "shards": summary.num_shards, "trajectories": summary.num_samples,
                                        "generate_seconds": round(summary.seconds, 2),
                                        "steady_traj_per_s": round(summary.steady_trajectories_per_second, 1)}
    finally:
        ray.shutdown()
    print("[3/4] auditing the corpora (deep checks, 8 replayed trajectories)")
    from trajflow.demo_audit import audit_corpus

    all_ok = True
    for name, info in metrics["corpora"].items():
        report = audit_corpus(info["url"])
        info["audit"] = report
        all_ok &= bool(report["ok"])
        print(f"      {name}: {'clean' if report['ok'] else 'PROBLEMS'} "
              f"({report['num_shards']} shards, {report['num_samples']} samples, {len(report['problems'])} problems)")
    png = out / "ring2d_trajectories.png"
    _plot_ring2d(out / "corpora" / "ring2d", png)
    print("[4/4] distilling a 4-step ring2d student (stages 8,4; aligned-v) and evaluating it")
    metrics["ring2d_student"] = _train_and_eval_ring2d(out, progress=not args.no_progress)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    lines = ["# trajflow demo report", "",
             "Authentic teacher ODE trajectories generated on an embedded Ray cluster, committed as WebDataset "
             "shards with a Parquet manifest, then audited.", "",
             "| corpus | shards | trajectories | audit | steady traj/s |", "|---|---|---|---|---|"]
    for name, info in metrics["corpora"].items():
        lines.append(f"| {name} | {info['shards']} | {info['trajectories']} | "
                     f"{'clean' if info['audit']['ok'] else 'problems'} | {info['steady_traj_per_s']} |")
    ev = metrics["ring2d_student"]
    lines += ["", "## ring2d: 4-step student vs the exact teacher", "",
              "| sampler | coupling error | SWD | class accuracy |", "|---|---|---|---|"]
    for name, q in [("teacher 4 steps, diffusers default grid", ev["teacher"]["4_steps_diffusers_default_grid"]),
                    ("teacher 4 steps, corrected grid", ev["teacher"]["4_steps"]),
                    ("teacher 32 steps", ev["teacher"]["32_steps"])] + \
            [(f"student {k.replace('_', ' ')}", v) for k, v in ev["student"].items()]:
        lines.append(f"| {name} | {q['coupling_error']:.4f} | {q['swd']:.4f} | {q.get('class_accuracy', 0):.3f} |")
    lines += ["", f"![ring2d trajectories]({png.name})", "", "![ring2d samples](ring2d_samples.png)", "",
              f"Total time: {metrics['seconds']} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"done in {metrics['seconds']} s: {out / 'report.md'}, {out / 'metrics.json'}, {png}")
    return 0 if all_ok else 1
