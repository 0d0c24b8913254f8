"""Methods compared at an equal training budget on a GMM teacher (used by the demo and benchmarks).

Every method is a ``TrainConfig`` recipe run by the real trainer on the same corpus, with the same
optimizer steps x batch size, student architecture and initialisation; only the window source, the
stages, the loss and the extra terms differ:

  2-rectified-flow   one global window (noise -> the teacher's endpoint), points on the whole
                     segment, plain MSE (Liu et al.'s 2-RF on offline noise/endpoint pairs)
  perflow            PeRFlow-style: 4 windows, each starting at the interpolation of a *real* sample
                     and noise, the teacher solving the window from there (online, ota-ratio 1), MSE
  ota-windows        4 windows from the corpus's authentic teacher states, points at window starts, MSE
  +progressive       ... with progressive stages 8 -> 4
  +aligned-v         ... and aligned v-prediction (alpha = 1)
  +online-fresh      ... and 25% online rollouts from fresh noise
  +online-student    ... and 25% online rollouts started where the student's own few-step sampler is
  +adversarial       ... and adversarial distillation on trajectory states
  trajflow           the student's own 4-step solve trained end to end from the stored noise to the teacher's
                     endpoint (objective "unrolled"): a 4-step student
  trajflow-2step     the same for 2 steps (stages 2): a 2-step student
  +progressive-unrolled  trajflow after an 8-window stage (stages 8 -> 4)
  +online-unrolled   trajflow + 25% online rollouts started at the student's own states

trajflow's students are evaluated at their own step count only (``STUDENT_STEPS``); the other methods,
trained for any step count, at every requested one.

Teachers are reported on the corrected grid (``few_step_sigmas``) and on diffusers' default grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: TrainConfig overrides of each method (the budget and architecture come from the profile). Every baseline
#: names its objective: the GMM solver student's own default ("unrolled") would otherwise change what they are.
METHODS: dict[str, dict[str, Any]] = {
    "2-rectified-flow": dict(stages=(1,), window_points="segment", alpha=0.0, objective="windows"),
    "perflow": dict(stages=(4,), window_points="segment", alpha=0.0, ota_ratio=1.0, ota_mode="perflow",
                    objective="windows"),
    "ota-windows": dict(stages=(4,), window_points="start", alpha=0.0, objective="windows"),
    "+progressive": dict(stages=(8, 4), window_points="start", alpha=0.0, objective="windows"),
    "+aligned-v": dict(stages=(8, 4), window_points="start", alpha=1.0, objective="windows"),
    "+online-fresh": dict(stages=(8, 4), window_points="start", alpha=1.0, ota_ratio=0.25, ota_mode="fresh",
                          objective="windows"),
    "+online-student": dict(stages=(8, 4), window_points="start", alpha=1.0, ota_ratio=0.25, ota_mode="student",
                            objective="windows"),
    "+adversarial": dict(stages=(8, 4), window_points="start", alpha=1.0, ota_ratio=0.25, ota_mode="student",
                         adv_weight=0.05, fm_weight=0.5, objective="windows"),
    # trajflow's students, one per step count (ProReflow-II's "a student per step count"): the student's own
    # few-step solve trained end to end from the stored noise to the teacher's endpoint (objective
    # "unrolled"). One stage, no online or adversarial term: with 3 seeds on digits and latent10, progressive
    # stages and student-started OTA on top of it had no measurable benefit, OTA cost latent10's coupling
    # error and SWD, and the adversarial term cost both metrics at 4 steps (docs/benchmarks.md)
    "trajflow": dict(stages=(4,), window_points="start", alpha=1.0, objective="unrolled"),
    "trajflow-2step": dict(stages=(2,), window_points="start", alpha=1.0, objective="unrolled"),
    "+progressive-unrolled": dict(stages=(8, 4), window_points="start", alpha=1.0, objective="unrolled"),
    "+online-unrolled": dict(stages=(4,), window_points="start", alpha=1.0, objective="unrolled", ota_ratio=0.25,
                             ota_mode="student"),
}
#: methods whose student is trained for one step count (its last stage, the solve the unrolled objective trains):
#: evaluated at that count only
STUDENT_STEPS: dict[str, int] = {name: r["stages"][-1] for name, r in METHODS.items() if r.get("objective") == "unrolled"}
METHOD_SETS = {
    "all": list(METHODS),
    "ablation": ["perflow", "ota-windows", "+progressive", "+aligned-v", "+online-fresh", "+online-student",
                 "+adversarial", "trajflow", "+progressive-unrolled", "+online-unrolled"],
    "quality": ["2-rectified-flow", "perflow", "+aligned-v", "trajflow-2step", "trajflow"],
    "demo": ["2-rectified-flow", "perflow", "trajflow-2step", "trajflow"],
}


@dataclass
class Profile:
    """Training budget and student of a comparison (equal for every method)."""

    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-4
    warmup_steps: int = 50
    student_width: int = 256
    student_depth: int = 3
    teacher_fit_steps: int = 3000
    ema_decay: float = 0.995


PROFILES = {"latent10": Profile(), "ring2d": Profile(steps=800, lr=1e-3, student_width=128, teacher_fit_steps=2000),
            # the digits testbed: the student is the teacher's architecture (MLP 256 x 3), started from its weights;
            # a short budget so that a 3-seed quality run takes minutes on 2 CPU cores
            "digits": Profile(steps=300, batch_size=128, lr=3e-4, warmup_steps=20, ema_decay=0.99)}


def resolve_methods(spec: str) -> list[str]:
    """'all' | 'ablation' | 'quality' | 'demo' | comma-separated method names."""
    if spec in METHOD_SETS:
        return list(METHOD_SETS[spec])
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)} or a set "
                         f"({', '.join(METHOD_SETS)})")
    return names


def train_method(name: str, corpus: str, run_dir: Path, profile: Profile, *, rollout_teacher=None, seed: int = 0,
                 progress: bool = True):
    """Train (or reuse) one method's student; returns (EMA student net, summary dict)."""
    from models.flownet import load_flow_net
    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    recipe = METHODS[name]
    cfg = TrainConfig(data=corpus, out=str(run_dir), max_steps=profile.steps, batch_size=profile.batch_size,
                      lr=profile.lr, warmup_steps=profile.warmup_steps, student_width=profile.student_width,
                      student_depth=profile.student_depth, teacher_fit_steps=profile.teacher_fit_steps,
                      ema_decay=profile.ema_decay, seed=seed, num_workers=0, progress=progress,
                      checkpoint_every=max(profile.steps, 1), log_every=10, **recipe)
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("out", "progress")}, sort_keys=True,
                     default=str)
    run_dir = run_dir.with_name(f"{run_dir.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}")
    cfg.out = str(run_dir)  # one directory per recipe + budget: other settings never resume this run
    done = run_dir / "done.json"
    if done.exists() and json.loads(done.read_text()).get("config") == key:  # re-running reuses finished work
        net, _ = load_flow_net(run_dir / "student" / "student.safetensors")
        return net, {**json.loads(done.read_text())["summary"], "run_dir": str(run_dir)}
    if cfg.ota_ratio > 0 and rollout_teacher is None:
        raise ValueError(f"method {name} needs a rollout teacher (pool client or LocalRollout)")
    trainer = Trainer(cfg, rollout_teacher if cfg.ota_ratio > 0 else None)
    trainer.build()
    try:
        last = trainer.train()
        trainer.export_student()
        # the exported student (the best validation weights by default), as a re-run that reuses this run loads it
        net, _ = load_flow_net(run_dir / "student" / "student.safetensors")
        online = trainer.part("online")
        ota = dict(online.stats) if online is not None else {}
    finally:
        trainer.close()
    samples = profile.steps * trainer.cfg.corpus_batch_size * (0 if cfg.ota_ratio >= 1 else 1) + ota.get("ota_samples", 0)
    summary = {"steps": trainer.step, "training_samples": samples, "last_loss": last.get("loss"), "run_dir": str(run_dir),
               **ota}
    done.write_text(json.dumps({"config": key, "summary": summary}))
    return net, summary


#: the metrics of each testbed's evaluation, and whether lower is better
GMM_METRICS = {"coupling_error": True, "swd": True, "nll_per_dim": True, "class_accuracy": False}
DIGITS_METRICS = {"coupling_error": True, "frechet_distance": True, "class_accuracy": False}
#: one component added at a time: (component, method without it, method with it)
ABLATION_STEPS = [
    ("authentic OTA windows instead of PeRFlow-style noised real starts", "perflow", "ota-windows"),
    ("progressive stages 8 -> 4", "ota-windows", "+progressive"),
    ("aligned v-prediction (alpha 1)", "+progressive", "+aligned-v"),
    ("online rollouts from fresh noise (25%)", "+aligned-v", "+online-fresh"),
    ("online rollouts started at the student's own states (25%)", "+aligned-v", "+online-student"),
    ("adversarial distillation on trajectory states", "+online-student", "+adversarial"),
    ("the student's unrolled 4-step solve instead of its 4 windows", "ota-windows", "trajflow"),
    ("progressive stages 8 -> 4 before the unrolled solve", "trajflow", "+progressive-unrolled"),
    ("online rollouts at the student's own states (25%), unrolled student", "trajflow", "+online-unrolled"),
]


def t_interval(values, confidence: float = 0.95) -> dict[str, Any]:
    """Mean and the two-sided Student-t interval of the mean over independent values (seeds).

    Returns {"mean", "low", "high", "half_width", "n", "std"}; with one value the interval is undefined
    (low = high = None)."""
    import math

    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": 1, "std": None}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n, "std": std}


def verdict(diff: dict[str, Any], lower_is_better: bool) -> str:
    """'helps' / 'hurts' when the interval of (with - without) excludes zero, else 'no measurable effect'."""
    if diff["low"] is None:
        return "no interval (one seed)"
    if diff["low"] > 0 or diff["high"] < 0:
        better = (diff["high"] < 0) == lower_is_better
        return "helps" if better else "hurts"
    return "no measurable effect"


def table_rows(report: dict[str, Any], method: str, kind: str, metrics=None) -> list[dict[str, Any]]:
    """Flatten one evaluation report (evaluate_gmm / evaluate_digits) into rows {method, steps, <metrics>}."""
    keys = tuple(metrics or GMM_METRICS)
    rows = []
    for k, q in report[kind].items():
        steps = int(k.split("_")[0])
        name = method
        if kind == "teacher":
            name = "teacher (diffusers default grid)" if "default_grid" in k else "teacher (corrected grid)"
        rows.append({"method": name, "steps": steps, **{m: q.get(m) for m in keys}})
    return rows


def aggregate_seeds(per_seed: dict[int, list[dict[str, Any]]], metrics) -> list[dict[str, Any]]:
    """Rows of several seeds -> one row per (method, steps): the mean, ``ci`` {metric: [low, high]}, ``values``."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for rows in per_seed.values():
        for r in rows:
            c = cells.setdefault((r["method"], r["steps"]), {m: [] for m in metrics})
            for m in metrics:
                if r.get(m) is not None:
                    c[m].append(float(r[m]))
    out = []
    for (method, steps), c in cells.items():
        row: dict[str, Any] = {"method": method, "steps": steps, "seeds": max(len(v) for v in c.values())}
        row["ci"], row["values"] = {}, {}
        for m, vals in c.items():
            if not vals:
                row[m] = None
                continue
            t = t_interval(vals)
            row[m] = t["mean"]
            row["ci"][m] = None if t["low"] is None else [t["low"], t["high"]]
            row["values"][m] = vals
        out.append(row)
    return out


def ablation_effects(result: dict[str, Any]) -> list[dict[str, Any]]:
    """For each component of ``ABLATION_STEPS`` whose two methods were run: the paired (same seed) difference
    with - without, its 95% t-interval over seeds and the verdict, per step count and metric."""
    metrics = result["metrics"]
    per = result["per_seed_rows"]
    val: dict[tuple[str, int, int], dict[str, Any]] = {}
    for seed, rows in per.items():
        for r in rows:
            val[(r["method"], r["steps"], int(seed))] = r
    seeds = sorted(int(s) for s in per)
    out = []
    for component, base, with_ in ABLATION_STEPS:
        for steps in result["steps"]:
            if not all((m, steps, s) in val for m in (base, with_) for s in seeds):
                continue
            for m, lower in metrics.items():
                diffs = [val[(with_, steps, s)][m] - val[(base, steps, s)][m] for s in seeds
                         if val[(with_, steps, s)].get(m) is not None and val[(base, steps, s)].get(m) is not None]
                if not diffs:
                    continue
                d = t_interval(diffs)
                out.append({"component": component, "without": base, "with": with_, "steps": steps, "metric": m,
                            "mean_difference": d["mean"], "ci": None if d["low"] is None else [d["low"], d["high"]],
                            "seeds": d["n"], "lower_is_better": lower, "verdict": verdict(d, lower)})
    return out


def compare(corpus: str, run_root: Path, methods: list[str], profile: Profile, *, shift: float, guidance: float,
            rollout_teacher=None, num_samples: int = 2000, steps=(1, 2, 4), progress: bool = True,
            log=print, seeds=(0,)) -> dict[str, Any]:
    """Train every method with every seed (reusing finished runs) on the same corpus and evaluate all of them
    and the teacher (once: it does not depend on the seed).

    ``rows`` are one per (method, steps): the teacher's (evaluated once: no interval), then each method's mean
    over seeds with ``ci`` (95% t-interval per metric, None for one seed) and ``values`` (per seed);
    ``per_seed_rows`` keeps every seed's method rows. GMM teachers are evaluated by
    ``evaluation.gmm.evaluate_gmm`` (exact metrics), the digits testbed by ``evaluation.digits.evaluate_digits``.
    ``training``/``reports`` hold the first seed's summary/report per method (``training_by_seed``: all)."""
    from trainer.data import open_corpus
    from trainer.teacher import teacher_from_card

    seeds = tuple(int(s) for s in seeds) or (0,)
    teacher = teacher_from_card(open_corpus(corpus).card, root=corpus)
    digits = callable(getattr(teacher, "decode", None))
    metrics = DIGITS_METRICS if digits else GMM_METRICS
    if digits:
        from evaluation.digits import evaluate_digits as evaluate

        extra = {"keep_samples": True}
    else:
        from evaluation.gmm import evaluate_gmm as evaluate

        extra = {}
    steps = tuple(int(s) for s in steps)
    rep = evaluate(None, teacher, shift=shift, guidance=guidance, steps=steps, num_samples=num_samples,
                   teacher_steps=(*steps, 32), default_grid_steps=steps, **extra)
    teacher_rows = table_rows(rep, "teacher", "teacher", metrics)
    grids: dict[str, Any] = dict(rep.pop("grid_samples", {}))
    reports: dict[str, Any] = {"teacher": rep["teacher"]}
    summaries: dict[str, Any] = {}
    by_seed: dict[str, dict[int, Any]] = {}
    per_seed: dict[int, list[dict[str, Any]]] = {s: [] for s in seeds}
    total = len(methods) * len(seeds)
    for i, name in enumerate(methods):
        for j, seed in enumerate(seeds):
            log(f"  method {i * len(seeds) + j + 1}/{total}: {name} (seed {seed})")
            run_dir = run_root / (name.lstrip("+") + (f"-seed{seed}" if seed else ""))
            net, summary = train_method(name, corpus, run_dir, profile, rollout_teacher=rollout_teacher, seed=seed,
                                        progress=progress)
            by_seed.setdefault(name, {})[seed] = summary
            own = (STUDENT_STEPS[name],) if name in STUDENT_STEPS else steps
            r = evaluate(net, teacher, shift=shift, guidance=guidance, steps=own, num_samples=num_samples,
                         teacher_steps=(), default_grid_steps=(), **extra)
            samples = r.pop("grid_samples", {})
            if j == 0:
                summaries[name], reports[name] = summary, r["student"]
                grids.update({f"{name} {k.split()[-1]}": v for k, v in samples.items() if k.startswith("student ")})
            per_seed[seed] += table_rows(r, name, "student", metrics)
    # the teacher's rows do not depend on the training seed: evaluated once, no interval
    teacher_cells = [{**r, "seeds": None, "ci": {}, "values": {}} for r in teacher_rows]
    out = {"rows": teacher_cells + aggregate_seeds(per_seed, metrics), "per_seed_rows": per_seed,
           "teacher_rows": teacher_rows, "seeds": list(seeds),
           "metrics": metrics, "steps": list(steps), "training": summaries, "training_by_seed": by_seed,
           "reports": reports, "profile": profile.__dict__, "shift": shift, "guidance": guidance,
           "num_samples": num_samples, "testbed": "digits" if digits else "gmm"}
    if digits:
        out["classifier"] = rep["classifier"]
        out["grid_samples"] = grids  # tensors: pop before printing JSON (write_sample_grid draws them)
    return out


#: trajflow's student for each step count
TRAJFLOW_STUDENTS: dict[int, str] = {4: "trajflow", 2: "trajflow-2step"}


def _trajflow_row(by: dict, n: int):
    """trajflow's row at ``n`` steps: its student trained for n steps where one was run, else trajflow's."""
    return by.get((TRAJFLOW_STUDENTS.get(n, "trajflow"), n)) or by.get(("trajflow", n))


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The quality targets, on the means over seeds, each trajflow student at its own step count (2 and 4).
    trajflow beats the teacher's own n steps (corrected grid) on coupling error and the distribution metric
    (GMM: SWD, digits: Frechet distance), and beats PeRFlow-style and 2-rectified flow on both at 2 and 4 steps
    (where those methods were run). GMM also: trajflow's 4-step SWD within 1.05x of the teacher's 32 steps."""
    by = {(r["method"], r["steps"]): r for r in result["rows"]}
    out: dict[str, Any] = {}
    dist = "frechet_distance" if result.get("testbed") == "digits" else "swd"
    short = "fd" if dist == "frechet_distance" else "swd"
    t32, tf4 = by.get(("teacher (corrected grid)", 32)), _trajflow_row(by, 4)
    if dist == "swd" and t32 and tf4:
        out["trajflow_4_swd_over_teacher_32_swd"] = tf4["swd"] / t32["swd"]
        out["trajflow_4_swd_within_1.05x_teacher_32"] = tf4["swd"] <= 1.05 * t32["swd"]
    for n in (2, 4):
        tf, tn = _trajflow_row(by, n), by.get(("teacher (corrected grid)", n))
        if tf is None:
            continue
        for m, name in (("coupling_error", "coupling"), (dist, short)):
            if tn is not None:
                out[f"trajflow_{n}_beats_teacher_{n}_{name}"] = tf[m] < tn[m]
            for base in ("perflow", "2-rectified-flow"):
                if (base, n) in by:
                    out[f"trajflow_beats_{base}_{name}_at_{n}"] = tf[m] < by[(base, n)][m]
    return out


def _cell(r: dict[str, Any], m: str, fmt: str) -> str:
    v = r.get(m)
    if v is None:
        return ""
    ci = (r.get("ci") or {}).get(m)
    if ci:
        return f"{v:{fmt}} ± {(ci[1] - ci[0]) / 2:{fmt}}"
    return f"{v:{fmt}}"


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as Markdown: mean ± half-width of the 95% interval where several seeds were run."""
    if result.get("testbed") == "digits":
        cols = [("coupling error", "coupling_error", ".4f"), ("FD", "frechet_distance", ".2f"),
                ("class acc", "class_accuracy", ".3f")]
    else:
        cols = [("coupling error", "coupling_error", ".4f"), ("SWD", "swd", ".4f"), ("NLL/dim", "nll_per_dim", ".3f"),
                ("class acc", "class_accuracy", ".3f")]
    lines = ["| method | steps | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(_cell(r, m, f) for _, m, f in cols) + " |")
    return "\n".join(lines)


def markdown_effects(effects: list[dict[str, Any]]) -> str:
    lines = ["| component | steps | metric | difference (with - without) | 95% interval | verdict |",
             "|---|---|---|---|---|---|"]
    for e in effects:
        ci = "" if e["ci"] is None else f"[{e['ci'][0]:.4f}, {e['ci'][1]:.4f}]"
        lines.append(f"| {e['component']} | {e['steps']} | {e['metric']} | {e['mean_difference']:+.4f} | {ci} | "
                     f"{e['verdict']} |")
    return "\n".join(lines)
