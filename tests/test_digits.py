"""The digits testbed (digits:8x8): a deterministic, cached, curved teacher that works through generate ->
audit --replay -> train -> eval; and the confidence-interval code of trajflow.compare on known data.

Fits use a small budget through the SPEC (``digits:8x8:fit=N``) and a per-test cache ($TRAJFLOW_CACHE)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIT = 150  # a small fit budget: the fitted teacher is still a real flow net fitted to the real images


def _cli(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "trajflow", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("trajflow-cache")
    old = os.environ.get("TRAJFLOW_CACHE")
    os.environ["TRAJFLOW_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TRAJFLOW_CACHE", None)
    else:
        os.environ["TRAJFLOW_CACHE"] = old


def test_spec_parsing_and_errors():
    from models.digits import DEFAULT_FIT_STEPS, digits_fit_steps
    from models.spec import parse_teacher_spec

    s = parse_teacher_spec("digits:8x8")
    assert (s.kind, s.target, s.variant, str(s)) == ("digits", "8x8", None, "digits:8x8")
    assert str(parse_teacher_spec("digits:8x8:fit=300")) == "digits:8x8:fit=300"
    assert digits_fit_steps(s) == DEFAULT_FIT_STEPS and digits_fit_steps("digits:8x8:fit=300") == 300
    with pytest.raises(ValueError, match="unknown digits testbed"):
        parse_teacher_spec("digits:16x16")
    for bad in ("digits:8x8:fit=0", "digits:8x8:fit=abc", "digits:8x8:steps=3", "digits:8x8:fit=10000000"):
        with pytest.raises(ValueError, match="fit=N"):
            digits_fit_steps(bad)


def test_teacher_is_deterministic_and_cached(cache, tmp_path):
    from models.digits import cached_net_path
    from models.registry import build_teacher

    spec = f"digits:8x8:fit={FIT}"
    first = build_teacher(spec)
    path = cached_net_path(FIT)
    assert path.is_file() and path.parent.parent == cache
    assert not list(path.parent.glob("*.part*")), "the atomic write left a temporary file"
    mtime = path.stat().st_mtime_ns
    again = build_teacher(spec)  # reused from the cache: the file is not rewritten
    assert path.stat().st_mtime_ns == mtime
    assert again.fingerprint() == first.fingerprint()
    # a fresh fit with the same seed into another cache gives the same weights, hence the same fingerprint
    os.environ["TRAJFLOW_CACHE"] = str(tmp_path / "other")
    try:
        refit = build_teacher(spec)
        assert cached_net_path(FIT) != path and cached_net_path(FIT).is_file()
    finally:
        os.environ["TRAJFLOW_CACHE"] = str(cache)
    assert refit.fingerprint() == first.fingerprint()
    # the card's record rebuilds it (kind flownet, the testbed SPEC in its config)
    from models.registry import teacher_from_config

    cfg = json.loads(json.dumps(first.config()))
    assert cfg["kind"] == "flownet" and cfg["testbed"]["spec"] == spec
    assert teacher_from_config("flownet", cfg, {"teacher_spec": spec}).fingerprint() == first.fingerprint()
    # a different budget is another teacher
    assert build_teacher("digits:8x8:fit=20").fingerprint() != first.fingerprint()


def _straightness(teacher, n=128, steps=32, guidance=2.0):
    """Mean chord / path length of the teacher's Euler trajectories from seeded noise (1 = straight)."""
    from flowcore.schedules import shifted_sigmas
    from flowcore.solvers import seeded_noise, solve_teacher

    noise = seeded_noise(list(range(n)), teacher.sample_shape)
    cls = torch.arange(n) % 10
    tr = solve_teacher(teacher, noise, shifted_sigmas(steps, 1.0), cond=cls, guidance=guidance)
    X = tr.states_BKX.reshape(n, tr.states_BKX.shape[1], -1).double()
    path = (X[:, 1:] - X[:, :-1]).norm(dim=-1).sum(1)
    chord = (X[:, -1] - X[:, 0]).norm(dim=-1)
    return float((chord / path).mean())


def test_testbed_trajectories_are_curved_compared_with_latent10(cache):
    from models.registry import build_teacher

    digits = _straightness(build_teacher(f"digits:8x8:fit={FIT}"))
    latent10 = _straightness(build_teacher("gmm:latent10"))
    assert digits < latent10 - 0.02, (digits, latent10)


def test_teacher_samples_are_digits_of_the_asked_class(cache):
    """The (briefly fitted) teacher's 32-step samples, decoded, are mostly recognised as the class asked for."""
    from evaluation.digits import digits_classifier
    from flowcore.schedules import few_step_sigmas
    from flowcore.solvers import seeded_noise, solve_teacher
    from models.registry import build_teacher

    teacher = build_teacher(f"digits:8x8:fit={FIT}")
    clf, info = digits_classifier()
    assert info["held_out_accuracy"] > 0.9 and info["held_out_images"] == 359
    clf2, info2 = digits_classifier()  # cached: the same weights
    assert info2 == info and all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(),
                                                                    clf2.state_dict().values(), strict=True))
    cls = torch.arange(200) % 10
    x = solve_teacher(teacher, seeded_noise(list(range(200)), teacher.sample_shape), few_step_sigmas(32, 1.0),
                      cond=cls, guidance=2.0).final
    with torch.no_grad():
        acc = float((clf(teacher.decode(x)).argmax(1) == cls).double().mean())
    assert acc > 0.5, acc


@pytest.mark.slow
def test_spec_round_trip_generate_audit_replay_train_eval(cache, tmp_path):
    env = {**os.environ, "TRAJFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    corpus, run = tmp_path / "corpus", tmp_path / "run"
    spec = f"digits:8x8:fit={FIT}"
    r = _cli("generate", "--teacher", spec, "--num-trajectories", "64", "--shard-size", "32", "--num-steps", "8",
             "--stages", "4", "--guidance", "2.0", "--out", str(corpus), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((corpus / "dataset.json").read_text())
    assert card["teacher"]["kind"] == "flownet" and card["run"]["teacher_spec"] == spec
    assert card["conditioning"]["kind"] == "class" and card["sample_shape"] == [1, 8, 8]

    r = _cli("audit", str(corpus), "--deep", "--replay", "4", "--json", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    audit = json.loads(r.stdout)
    assert audit["ok"] and audit["checks"]["replay"] == 4
    assert audit["stats"]["straightness"]

    r = _cli("train", "--data", str(corpus), "--out", str(run), "--stages", "4", "--max-steps", "4",
             "--batch-size", "16", "--num-workers", "0", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "student" / "student.safetensors").is_file()
    from models.flownet import load_flow_net

    # a student that starts as its (flow-net) teacher trains its own unrolled solve by default
    assert load_flow_net(run / "student" / "student.safetensors")[1]["objective"] == "unrolled"
    from trajflow.demo import _corpus_straightness

    assert 0.5 < _corpus_straightness(corpus) < 0.99  # the stored trajectories are curved (the demo prints it)

    png = tmp_path / "grid.png"
    r = _cli("eval", "--student", str(run), "--steps", "1,2,4", "--num-samples", "60", "--json", "--grid", str(png),
             env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["testbed"] == "digits:8x8" and 0.9 < rep["classifier"]["held_out_accuracy"] <= 1.0
    for n in (1, 2, 4):
        for key in (f"{n}_steps", f"{n}_steps_diffusers_default_grid"):
            q = rep["teacher"][key]
            assert q["coupling_error"] >= 0 and q["frechet_distance"] >= 0 and 0 <= q["class_accuracy"] <= 1
        q = rep["student"][f"{n}_steps"]
        assert all(math.isfinite(q[m]) for m in ("coupling_error", "frechet_distance", "class_accuracy"))
    assert rep["teacher"]["32_steps"]["coupling_error"] < rep["teacher"]["1_steps"]["coupling_error"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _cli("eval", "--student", str(run), "--steps", "2,4", "--num-samples", "40", env=env)
    assert r.returncode == 0 and "classifier held-out accuracy" in r.stdout and "student 4 steps" in r.stdout


# -- confidence intervals (trajflow.compare) on known data -------------------------------------------------------

def test_t_interval_on_known_data():
    from trajflow.compare import t_interval

    t = t_interval([1.0, 2.0, 3.0])  # mean 2, sample std 1, t_{0.975, 2} = 4.302653
    assert t["n"] == 3 and t["mean"] == pytest.approx(2.0) and t["std"] == pytest.approx(1.0)
    assert t["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert t["low"] == pytest.approx(2.0 - 4.302653 / math.sqrt(3), rel=1e-5)
    t5 = t_interval([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])  # std 2.138090, t_{0.975, 7} = 2.364624
    assert t5["half_width"] == pytest.approx(2.364624 * 2.138090 / math.sqrt(8), rel=1e-5)
    assert t_interval([1.0, 1.0, 1.0])["half_width"] == 0.0
    one = t_interval([0.5])
    assert one["mean"] == 0.5 and one["low"] is None and one["high"] is None
    with pytest.raises(ValueError):
        t_interval([])


def test_verdicts_need_an_interval_that_excludes_zero():
    from trajflow.compare import t_interval, verdict

    assert verdict(t_interval([-0.03, -0.02, -0.025]), lower_is_better=True) == "helps"
    assert verdict(t_interval([-0.03, -0.02, -0.025]), lower_is_better=False) == "hurts"
    assert verdict(t_interval([0.03, 0.02, 0.025]), lower_is_better=True) == "hurts"
    assert verdict(t_interval([-0.03, 0.02, 0.001]), lower_is_better=True) == "no measurable effect"
    assert verdict(t_interval([-0.01]), lower_is_better=True) == "no interval (one seed)"


def test_aggregate_and_ablation_effects_on_constructed_rows():
    """Rows of 3 seeds -> mean and t-interval per cell; paired effects per component with verdicts."""
    from trajflow.compare import (
        DIGITS_METRICS,
        ablation_effects,
        aggregate_seeds,
        markdown_effects,
        markdown_table,
    )

    base = {0: 0.50, 1: 0.40, 2: 0.45}
    per_seed = {}
    for s in (0, 1, 2):
        per_seed[s] = [
            {"method": "teacher (corrected grid)", "steps": 4, "coupling_error": 0.3, "frechet_distance": 10.0,
             "class_accuracy": 1.0},
            # +progressive: always 0.02 better than ota-windows on coupling (paired), FD noise around equal
            {"method": "ota-windows", "steps": 4, "coupling_error": base[s], "frechet_distance": 10.0 + s,
             "class_accuracy": 0.9},
            {"method": "+progressive", "steps": 4, "coupling_error": base[s] - 0.02 - 0.001 * s,
             "frechet_distance": 10.0 + (1, -1, 0.5)[s] + s, "class_accuracy": 0.9},
        ]
    rows = aggregate_seeds(per_seed, DIGITS_METRICS)
    cell = next(r for r in rows if r["method"] == "ota-windows")
    assert cell["seeds"] == 3 and cell["coupling_error"] == pytest.approx(0.45)
    lo, hi = cell["ci"]["coupling_error"]
    assert lo == pytest.approx(0.45 - 4.302653 * 0.05 / math.sqrt(3), rel=1e-5) and hi > 0.45
    assert cell["values"]["coupling_error"] == [0.50, 0.40, 0.45]
    result = {"metrics": DIGITS_METRICS, "per_seed_rows": per_seed, "steps": [4], "rows": rows, "testbed": "digits"}
    effects = {(e["component"].split()[0], e["metric"]): e for e in ablation_effects(result)}
    coupling = effects[("progressive", "coupling_error")]
    assert coupling["mean_difference"] == pytest.approx(-0.021) and coupling["verdict"] == "helps"
    assert effects[("progressive", "frechet_distance")]["verdict"] == "no measurable effect"
    assert effects[("progressive", "class_accuracy")]["verdict"] == "no measurable effect"  # zero-width at zero
    assert all(e["seeds"] == 3 for e in effects.values())
    assert "±" in markdown_table(result) and "helps" in markdown_effects(list(effects.values()))


def test_targets_take_each_trajflow_student_at_its_own_step_count():
    """check_targets compares trajflow's 2-step student at 2 steps and its 4-step student at 4 (never another
    unrolled method's row), against the teacher's own steps and each baseline that was run."""
    from trajflow.compare import check_targets

    def row(method, steps, ce, fd):
        return {"method": method, "steps": steps, "coupling_error": ce, "frechet_distance": fd}

    rows = [row("teacher (corrected grid)", 2, 0.5, 20.0), row("teacher (corrected grid)", 4, 0.3, 6.0),
            row("unrolled", 4, 0.9, 90.0), row("trajflow", 4, 0.2, 5.0), row("trajflow-2step", 2, 0.25, 4.0),
            row("2-rectified-flow", 2, 0.3, 3.0), row("2-rectified-flow", 4, 0.25, 6.0)]
    t = check_targets({"rows": rows, "testbed": "digits"})
    assert t["trajflow_4_beats_teacher_4_coupling"] and t["trajflow_4_beats_teacher_4_fd"]
    assert t["trajflow_2_beats_teacher_2_coupling"] and t["trajflow_2_beats_teacher_2_fd"]
    assert t["trajflow_beats_2-rectified-flow_coupling_at_2"] and not t["trajflow_beats_2-rectified-flow_fd_at_2"]
    assert t["trajflow_beats_2-rectified-flow_fd_at_4"]
    assert not any("perflow" in k for k in t)  # not run: no target
