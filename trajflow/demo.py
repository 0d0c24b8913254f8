"""`trajflow demo`: the main job on embedded defaults (local Ray, local files, built-in teachers).

1. generate authentic teacher trajectory corpora for the digits testbed (``digits:8x8``, a class-conditional
   flow-matching net fitted once to scikit-learn's 8x8 digits: curved trajectories) and the built-in
   ``latent10`` and ``ring2d`` GMM teachers on an embedded Ray cluster (WebDataset shards, commit records,
   Parquet manifest);
2. audit them against their manifests (deep decode + replayed trajectories, straightness per window);
3. the digits testbed at an equal budget, one seed: trajflow's 2-step and 4-step students against
   2-rectified flow and PeRFlow-style, and the teacher's own 2 and 4 steps on both grids (coupling error,
   Frechet distance in a classifier's features, class accuracy, a grid of samples);
4. start the live teacher pool (Ray Serve) on the same embedded cluster and distil ring2d students
   (PeRFlow-style takes its windows online from the pool);
5. evaluate the ring2d students against the exact mixture, plot samples, loss curves and per-window
   straightness, and write ``DIR/report.md`` (the digits table first) and ``DIR/metrics.json``.

Re-running reuses what is done (generation resumes, finished training runs are kept).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEMO_CORPORA = {
    # name: generate settings (beyond --out); digits as benchmarks/quality.py generates it
    "digits": dict(teacher="digits:8x8", shard_size=512, num_steps=32, stages=(8, 4), guidance=2.0),
    "latent10": dict(teacher="gmm:latent10", shard_size=256, num_steps=32, stages=(8, 4, 2), guidance="1.5:4.5"),
    "ring2d": dict(teacher="gmm:ring2d", shard_size=256, num_steps=32, stages=(8, 4, 2), guidance=1.0),
}


def _stored_records(corpus: Path, max_samples: int):
    """(card, the first ``max_samples`` records of a local corpus in manifest order)."""
    from itertools import islice

    from storage_schemas import DatasetCard, iter_shard_samples, manifest_from_parquet_bytes

    card = DatasetCard.from_json((corpus / "dataset.json").read_text())
    rows = manifest_from_parquet_bytes((corpus / "manifest.parquet").read_bytes())
    records = (rec for row in rows
               for rec in iter_shard_samples((corpus / row.path).read_bytes(), row.shard_id, card))
    return card, list(islice(records, max_samples))


def _plot_ring2d(corpus: Path, png: Path, max_samples: int = 400) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    card, records = _stored_records(corpus, max_samples)
    states = [rec.states.float() for rec in records]
    classes = [rec.meta.get("class_id", 0) for rec in records]
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


def _save(fig, png: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def _plot_samples(out: Path, students: dict[str, Any], teacher, shift: float, n: int = 800) -> Path:
    """ring2d samples of each method (rows) at 1/2/4 steps (columns), teacher rows first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from evaluation.gmm import student_velocity_fn
    from flowcore.schedules import few_step_sigmas
    from flowcore.solvers import seeded_noise, solve, solve_teacher
    from models.diffusers.schedulers import diffusers_default_sigmas

    noise = seeded_noise([10**15 + i for i in range(n)], teacher.sample_shape, torch.float64)
    cls = torch.arange(n) % teacher.num_classes if teacher.num_classes else None
    rows: list[tuple[str, Any]] = [
        ("teacher, diffusers grid", lambda k: solve_teacher(teacher, noise, [float(s) for s in diffusers_default_sigmas(
            k, shift)], cond=cls).final),
        ("teacher, corrected grid", lambda k: solve_teacher(teacher, noise, few_step_sigmas(k, shift), cond=cls).final)]
    for name, net in students.items():
        net = net.double().eval()
        rows.append((name, lambda k, net=net: solve(student_velocity_fn(net, cls, None), noise,
                                                    few_step_sigmas(k, shift)).final))
    steps = (1, 2, 4)
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(3.2 * len(steps), 3.0 * len(rows)), sharex=True,
                             sharey=True, squeeze=False)
    for r, (name, sample) in enumerate(rows):
        for c, k in enumerate(steps):
            x = sample(k)
            ax = axes[r][c]
            ax.scatter(x[:, 0], x[:, 1], c=None if cls is None else cls, cmap="tab10", s=2)
            ax.set_title(f"{name}, {k} step{'s' if k > 1 else ''}", fontsize=9)
            ax.set_xlim(-5, 5)
            ax.set_ylim(-5, 5)
            ax.set_aspect("equal")
    return _save(fig, out / "ring2d_samples.png", dpi=90)


def _plot_losses(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        f = run / "logs" / "metrics.jsonl"
        if not f.exists():
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]  # training rows (evaluation rows carry val_* only)
        ax.plot([r["step"] for r in rows], [r.get("reflow_loss", r["loss"]) for r in rows], label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reflow loss (aligned-v or MSE)")
    ax.set_title("training loss per method (ring2d)")
    ax.legend(fontsize=8)
    return _save(fig, out / "loss_curves.png", dpi=100)


def _plot_straightness(out: Path, reports: dict[str, Any], teacher, shift: float, n: int = 2000) -> Path:
    """Teacher trajectory straightness per window (chord / path length on a 256-step solve), and each
    method's 4-step one-jump error per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from flowcore.schedules import few_step_sigmas, shifted_sigmas
    from flowcore.solvers import seeded_noise, solve_teacher

    noise = seeded_noise([10**15 + i for i in range(n)], teacher.sample_shape, torch.float64)
    cls = torch.arange(n) % teacher.num_classes if teacher.num_classes else None
    traj = solve_teacher(teacher, noise, shifted_sigmas(256, shift), cond=cls).states_BKX
    bounds = few_step_sigmas(4, shift)
    grid = traj.new_tensor(shifted_sigmas(256, shift))
    straight = []
    for s0, s1 in zip(bounds, bounds[1:]):
        i0, i1 = int(torch.argmin((grid - s0).abs())), int(torch.argmin((grid - s1).abs()))
        seg = traj[:, i0:i1 + 1].flatten(2)
        chord = (seg[:, -1] - seg[:, 0]).norm(dim=1)
        path = (seg[:, 1:] - seg[:, :-1]).norm(dim=2).sum(dim=1)
        straight.append(float((chord / path.clamp_min(1e-12)).mean()))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{s0:.2f}->{s1:.2f}" for s0, s1 in zip(bounds, bounds[1:])]
    a1.bar(labels, straight, color="tab:gray")
    a1.set_ylim(min(straight) - 0.02, 1.0)
    a1.set_title("teacher trajectory straightness per window\n(chord / path length)")
    for name, rep in reports.items():
        if name != "teacher" and "4_steps" in rep:
            a2.plot(labels, rep["4_steps"]["one_jump_error_per_window"], "o-", label=name)
    any_rep = next((r for k, r in reports.items() if k != "teacher" and "4_steps" in r), None)
    if any_rep is not None:
        a2.plot(labels, any_rep["4_steps"]["teacher_one_jump_error_per_window"], "k--", label="teacher Euler")
    a2.set_yscale("log")
    a2.set_title("one-jump error per window (4 steps)")
    a2.legend(fontsize=8)
    return _save(fig, out / "straightness.png", dpi=100)


def run_demo(args) -> int:
    import ray

    from pipeline.config import GenerateConfig
    from pipeline.driver import GenerationFailed, run_generation

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress = not args.no_progress
    metrics: dict[str, Any] = {"corpora": {}}
    print(f"trajflow demo -> {out}")
    print("[1/6] starting an embedded local Ray cluster")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        for i, (name, settings) in enumerate(DEMO_CORPORA.items(), 1):
            n = args.num_trajectories if name != "ring2d" else max(256, args.num_trajectories // 2)
            print(f"[2/6] generating corpus {i}/{len(DEMO_CORPORA)}: {name} ({n} trajectories, {settings['teacher']})")
            cfg = GenerateConfig(out=str(out / "corpora" / name), num_trajectories=n, progress=progress, **settings)
            try:
                summary = run_generation(cfg)
            except GenerationFailed as e:
                print(f"trajflow demo: generation failed: {e}")
                return 1
            print("      " + summary.line())
            metrics["corpora"][name] = {"url": cfg.out, "shards": summary.num_shards, "trajectories": summary.num_samples,
                                        "generate_seconds": round(summary.seconds, 2),
                                        "steady_traj_per_s": round(summary.steady_trajectories_per_second, 1)
                                        if summary.committed_now else "reused"}
        print("[3/6] auditing the corpora (deep checks, 8 replayed trajectories)")
        from storage_schemas.audit import audit_corpus

        all_ok = True
        for name, info in metrics["corpora"].items():
            report = audit_corpus(info["url"], deep=True, replay=8).to_dict()
            info["audit"] = report
            all_ok &= bool(report["ok"])
            info["chord_over_path"] = _corpus_straightness(Path(info["url"]))
            print(f"      {name}: {'clean' if report['ok'] else 'PROBLEMS'} ({report['num_shards']} shards, "
                  f"{report['num_samples']} samples, {len(report['problems'])} problems; trajectory straightness "
                  f"(chord / path over the saved states) {info['chord_over_path']:.3f})")
        if not all_ok:
            print("trajflow demo: the audit found problems; see metrics.json")
        png_traj = out / "ring2d_trajectories.png"
        _plot_ring2d(out / "corpora" / "ring2d", png_traj)
        print("[4/6] the digits testbed: 2- and 4-step students at an equal budget (one seed)")
        digits = _compare_digits(out, str(out / "corpora" / "digits"), progress)
        print("[5/6] starting the live teacher pool (Ray Serve) for online trajectory alignment")
        import tempfile

        from models.registry import teacher_spec_for_card
        from pipeline import pool
        from trainer.data import open_corpus

        ring = str(out / "corpora" / "ring2d")
        with tempfile.TemporaryDirectory() as tmp:
            st = pool.pool_up(teacher_spec_for_card(open_corpus(ring).card, tmp), name="trajflow-demo-pool",
                              replicas=1, cpus_per_replica=0.5)
            print(f"      pool {st['name']}: {st['status']}, {st['running_replicas']} replica")
            client = pool.PoolClient("trajflow-demo-pool")
            try:
                result = _compare_ring2d(out, ring, client, progress)
            finally:
                client.close()
                pool.pool_down("trajflow-demo-pool")
    finally:
        ray.shutdown()
    metrics["digits"] = {k: v for k, v in digits.items() if k != "grid_samples"}
    metrics["ring2d"] = {k: v for k, v in result.items() if k not in ("students", "teacher_obj")}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    from trajflow.compare import markdown_table

    table = markdown_table(result)
    digits_table = markdown_table(digits)
    dprof = digits["profile"]
    lines = ["# trajflow demo report", "",
             "## The digits testbed: few-step students vs the teacher's own few steps", "",
             f"A class-conditional flow-matching teacher fitted to scikit-learn's 8x8 digits, sampled with "
             f"classifier-free guidance {digits['guidance']}; its trajectories are curved (chord / path "
             f"length of the stored trajectories {metrics['corpora']['digits']['chord_over_path']:.3f}; latent10's "
             f"{metrics['corpora']['latent10']['chord_over_path']:.3f}, ring2d's "
             f"{metrics['corpora']['ring2d']['chord_over_path']:.3f}). Every student: {dprof['steps']} optimizer "
             f"steps x {dprof['batch_size']} samples, the teacher's architecture started from its weights. "
             "trajflow's 2-step and 4-step students are two students, each trained for its own step count "
             "(the student's own unrolled solve from the stored noise to the teacher's stored endpoint) and "
             "reported at that count; 2-rectified flow and "
             "PeRFlow-style are trained once and sampled at every count. Metrics on 1000 samples: coupling "
             "error vs the teacher's 256-step Heun endpoint from the same noise, Frechet distance (FD) in the "
             "features of a small classifier trained on the same images (held-out accuracy "
             f"{digits['classifier']['held_out_accuracy']:.3f}), class accuracy under it. **One training seed** "
             "(`benchmarks/quality.py --teacher digits:8x8` runs 3 and reports intervals; docs/benchmarks.md).",
             "", digits_table, "",
             "Targets: " + ", ".join(f"{k}: {v}" for k, v in digits["targets"].items()), "",
             f"![digits samples]({Path(digits['grid_png']).name})", "",
             "## Corpora", "",
             "Authentic teacher ODE trajectories generated on an embedded Ray cluster, committed as WebDataset "
             "shards with a Parquet manifest, then audited.", "",
             "| corpus | shards | trajectories | audit | straightness (chord / path) | steady traj/s |",
             "|---|---|---|---|---|---|"]
    for name, info in metrics["corpora"].items():
        lines.append(f"| {name} | {info['shards']} | {info['trajectories']} | "
                     f"{'clean' if info['audit']['ok'] else 'problems'} | {info['chord_over_path']:.3f} | "
                     f"{info['steady_traj_per_s']} |")
    prof = result["profile"]
    lines += ["", "## ring2d: few-step students vs the exact teacher", "",
              f"Every student: {prof['steps']} optimizer steps x {prof['batch_size']} samples, MLP width "
              f"{prof['student_width']}, started as the exact mixture (the GMM solver student: a few numbers per "
              "step on top of the teacher's velocity). trajflow's students (2 and 4 steps, each at its own step "
              "count) train their unrolled solve; PeRFlow-style takes all its windows online from the live "
              "pool; all are sampled on `few_step_sigmas`. ring2d's trajectories are nearly "
              "straight, so one global window (2-rectified flow) is already close to enough here; the digits "
              "testbed above is where the windows matter. Metrics against the "
              "exact mixture: coupling error vs the teacher's 256-step Heun endpoint from the same noise, sliced "
              "Wasserstein distance, NLL per dimension, class accuracy.", "", table, "",
              "Targets: " + ", ".join(f"{k}: {v if isinstance(v, bool) else round(v, 3)}"
                                      for k, v in result["targets"].items()), "",
              f"![ring2d trajectories]({png_traj.name})", "", "![samples](ring2d_samples.png)", "",
              "![loss curves](loss_curves.png)", "", "![straightness](straightness.png)", "",
              f"Total time: {metrics['seconds']} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("[6/6] summary")
    print("digits testbed (one seed; each trajflow student at its own step count):")
    print(digits_table)
    print(f"samples: {digits['grid_png']}")
    print("ring2d (metrics vs the exact mixture):")
    print(table)
    print(f"done in {metrics['seconds']} s: {out / 'report.md'}, {out / 'metrics.json'}, PNGs in {out}")
    return 0 if all_ok else 1


def _corpus_straightness(corpus: Path, max_samples: int = 256) -> float:
    """Mean chord / path length of the corpus's stored trajectories over all their saved states (1 = straight):
    the curvature of the whole noise -> sample path, which a few-step student has to make up for."""
    import torch

    ratios: list[float] = []
    for rec in _stored_records(corpus, max_samples)[1]:
        x = rec.states.double().flatten(1)  # [K, D]: the saved states, noise first
        path = float((x[1:] - x[:-1]).norm(dim=1).sum())
        if path > 0:
            ratios.append(float((x[-1] - x[0]).norm()) / path)
    return float(torch.tensor(ratios).mean()) if ratios else float("nan")


def _compare_digits(out: Path, corpus: str, progress: bool) -> dict[str, Any]:
    """The testbed's comparison (``trajflow.compare``, one seed; PeRFlow-style's online windows from an
    in-process teacher) and its sample grid (``DIR/digits_samples.png``)."""
    from evaluation.digits import write_sample_grid
    from flowcore.rollout import LocalRollout
    from trainer.data import open_corpus
    from trainer.teacher import teacher_from_card
    from trajflow.compare import METHOD_SETS, PROFILES, check_targets, compare

    rollout = LocalRollout(teacher_from_card(open_corpus(corpus).card, root=corpus))
    try:
        result = compare(corpus, out / "runs" / "digits", METHOD_SETS["demo"], PROFILES["digits"], shift=1.0,
                         guidance=2.0, rollout_teacher=rollout, num_samples=1000, steps=(2, 4), progress=progress,
                         log=lambda m: print("      " + m.strip(), flush=True))
    finally:
        rollout.close()
    result["targets"] = check_targets(result)
    grids = result.pop("grid_samples", {})
    result["grid_png"] = write_sample_grid(list(grids.items()), out / "digits_samples.png",
                                           title="digits testbed: samples per method and step count (seed 0)")
    return result


def _compare_ring2d(out: Path, corpus: str, rollout_teacher, progress: bool) -> dict[str, Any]:
    from models.flownet import load_flow_net
    from trajflow.compare import METHOD_SETS, PROFILES, check_targets, compare

    methods = METHOD_SETS["demo"]
    shift, guidance = 1.0, 1.0
    result = compare(corpus, out / "runs", methods, PROFILES["ring2d"], shift=shift, guidance=guidance,
                     rollout_teacher=rollout_teacher, num_samples=2000, progress=progress,
                     log=lambda m: print("      " + m.strip(), flush=True))
    result["targets"] = check_targets(result)
    runs = {m: Path(result["training"][m]["run_dir"]) for m in methods}
    students = {m: load_flow_net(r / "student" / "student.safetensors")[0] for m, r in runs.items()}
    from trainer.data import open_corpus
    from trainer.teacher import teacher_from_card

    teacher = teacher_from_card(open_corpus(corpus).card)
    _plot_samples(out, students, teacher, shift)
    _plot_losses(out, runs)
    _plot_straightness(out, result["reports"], teacher, shift)
    return result
