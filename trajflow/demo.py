"""`trajflow demo`: the main job on embedded defaults (local Ray, local files, built-in teachers).

Today it runs the parts of the product that exist end to end: generate authentic teacher
trajectory corpora for the built-in ``latent10`` and ``ring2d`` GMM teachers on an embedded Ray
cluster, audit them against their manifests, plot the ring2d trajectories and write
``DIR/report.md`` and ``DIR/metrics.json``. Re-running reuses what is already committed.
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


def run_demo(args) -> int:
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.driver import GenerationFailed, run_generation

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"corpora": {}}
    print(f"trajflow demo -> {out}")
    print("[1/3] starting an embedded local Ray cluster")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        for i, (name, settings) in enumerate(DEMO_CORPORA.items(), 1):
            n = args.num_trajectories if name == "latent10" else max(256, args.num_trajectories // 2)
            print(f"[2/3] generating corpus {i}/{len(DEMO_CORPORA)}: {name} ({n} trajectories, {settings['teacher']})")
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
    print("[3/3] auditing the corpora against their manifests")
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
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    lines = ["# trajflow demo report", "",
             "Authentic teacher ODE trajectories generated on an embedded Ray cluster, committed as WebDataset "
             "shards with a Parquet manifest, then audited.", "",
             "| corpus | shards | trajectories | audit | steady traj/s |", "|---|---|---|---|---|"]
    for name, info in metrics["corpora"].items():
        lines.append(f"| {name} | {info['shards']} | {info['trajectories']} | "
                     f"{'clean' if info['audit']['ok'] else 'problems'} | {info['steady_traj_per_s']} |")
    lines += ["", f"![ring2d trajectories]({png.name})", "", f"Total time: {metrics['seconds']} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"done in {metrics['seconds']} s: {out / 'report.md'}, {out / 'metrics.json'}, {png}")
    return 0 if all_ok else 1
