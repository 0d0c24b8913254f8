"""Issue 25, findings 6, 10, 11 and 12: every number a flag takes is checked before anything is written.

- Every float flag of every command is finite (F6): ``--lr inf``, ``--grad-clip nan``, ``--ota-timeout nan``... exit 2
  with one line, and the dataclasses (TrainConfig, GenerateConfig) raise ValueError for Python callers.
- Every integer flag is bounded (F10): ``generate --num-trajectories 1000000000000``, ``--num-steps 1e9``,
  ``train --stream-partitions 1e9``, ``eval --num-samples 1e9``, ``sample --steps 1e8`` exit 2 within seconds, with
  one line naming the bound, nothing under --out and no large allocation.
- ``--out`` is not empty, not ``--data`` and not inside it (F11); ``eval --steps 0`` exits 2 (F12).

The flag tests walk the real parser (every subcommand, every action), so a flag added later is covered too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trajflow.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    """(command name, its subparser) for every `trajflow` subcommand."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices.items())


def _typed_actions():
    """(command, --flag, action) of every option that converts its value."""
    out = []
    for cmd, p in _commands():
        for a in p._actions:
            if a.option_strings and a.type is not None:
                out.append((cmd, a.option_strings[-1], a))
    return out


def _kind(action) -> str | None:
    """What an option's value is, found by converting a sample: "float", "int", "floats", "ints" or None."""
    for sample in ("3", "0.5"):
        try:
            v = action.type(sample)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
        if isinstance(v, bool):
            return None
        if isinstance(v, float):
            return "float"
        if isinstance(v, int):
            return "int"
        if isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
            return "floats"
        if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
            return "ints"
    return None


NUMERIC = [(c, f, a) for c, f, a in _typed_actions() if _kind(a)]
FLOATS = [(c, f, a) for c, f, a in NUMERIC if _kind(a) in ("float", "floats")]
INTS = [(c, f, a) for c, f, a in NUMERIC if _kind(a) in ("int", "ints")]


def test_the_walk_sees_the_flags_of_the_finding():
    names = {(c, f) for c, f, _ in NUMERIC}
    for expected in [("train", "--lr"), ("train", "--grad-clip"), ("train", "--alpha"), ("train", "--fm-weight"),
                     ("train", "--disc-lr"), ("train", "--adv-weight"), ("train", "--ota-timeout"),
                     ("train", "--ota-ratio"), ("train", "--ema-decay"), ("generate", "--shift"),
                     ("generate", "--num-trajectories"), ("generate", "--num-steps"), ("train", "--stream-partitions"),
                     ("eval", "--num-samples"), ("eval", "--steps"), ("sample", "--steps"), ("pool", "--replicas"),
                     ("audit", "--replay"), ("demo", "--num-trajectories"), ("make-tiny-sd3", "--seed")]:
        assert expected in names, expected
    assert len(FLOATS) >= 15 and len(INTS) >= 45


def _refused(action, text: str) -> str | None:
    try:
        action.type(text)
    except (argparse.ArgumentTypeError, ValueError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("cmd, flag, action", FLOATS, ids=[f"{c} {f}" for c, f, _ in FLOATS])
def test_every_float_flag_refuses_non_finite_values(cmd, flag, action):
    for bad in ("nan", "inf", "-inf", "NaN", "1e400"):
        text = bad if _kind(action) == "float" else f"0.5,{bad}"
        msg = _refused(action, text)
        assert msg and "finite" in msg and "\n" not in msg, (cmd, flag, text, msg)
    assert _refused(action, "0.5") is None


@pytest.mark.parametrize("cmd, flag, action", INTS, ids=[f"{c} {f}" for c, f, _ in INTS])
def test_every_integer_flag_has_a_bound(cmd, flag, action):
    huge = str(10**30)
    text = huge if _kind(action) == "int" else f"1,{huge}"
    msg = _refused(action, text)
    assert msg and ("at most" in msg or "in [" in msg) and "\n" not in msg, (cmd, flag, msg)
    bound = getattr(action.type, "bounds", None)
    assert bound is not None and bound[1] < 2**64, (cmd, flag, bound)


def test_guidance_must_be_finite_numbers():
    (gen,) = [p for c, p in _commands() if c == "generate"]
    (guidance,) = [a for a in gen._actions if "--guidance" in a.option_strings]
    for bad in ("nan", "inf", "1:nan", "-inf:2", "1:1e999"):
        assert _refused(guidance, bad), bad
    assert guidance.type("1.5:4.5") == "1.5:4.5" and guidance.type("3") == "3"


# -- the command line, end to end (subprocesses: exit status, stderr, what was written, peak memory) ------------


#: runs the command as its only child and writes the child's peak RSS (KiB) to the file named by argv[1]
_MEASURE = ("import resource, subprocess, sys\n"
            "rc = subprocess.call(sys.argv[2:])\n"
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
            "sys.exit(rc)\n")


def _cli(*argv: str, cwd=None, timeout=120) -> tuple[subprocess.CompletedProcess, float, int]:
    """(result, seconds, peak RSS in bytes) of `python -m trajflow ARGV` in a fresh process."""
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        rss = os.path.join(tmp, "rss")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _MEASURE, rss, sys.executable, "-m", "trajflow", *argv],
                           capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        seconds = time.perf_counter() - t0
        peak = int(Path(rss).read_text()) * 1024
    return r, seconds, peak


def _rc(argv: list[str]) -> int:
    """main()'s exit status, argparse's SystemExit included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("argv, bound", [
    (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "1000000000000", "--shard-size", "1"],
     "--num-trajectories"),
    (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "64", "--num-steps", "1000000000"],
     "--num-steps"),
    (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "64", "--shard-size", "1000000000"],
     "--shard-size"),
    (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "64", "--stages", "1000000000"], "--stages"),
    (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "64", "--batch-size", "1000000000000"],
     "--batch-size"),
])
def test_generate_refuses_unbounded_counts_fast_and_writes_nothing(tmp_path, argv, bound):
    out = tmp_path / "huge"
    r, seconds, _ = _cli(*argv, "--out", str(out), "--no-progress", timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r)
    assert bound in line and ("at most" in line or "in [" in line), line
    assert not out.exists()
    assert seconds < 30, seconds


def test_generate_of_a_terabyte_of_shards_stays_small(tmp_path):
    """Within each flag's bound, the plan itself (N / shard-size shards) is bounded before anything is written or
    allocated: 10**10 trajectories in shards of 1 are 10**10 shards."""
    out = tmp_path / "many"
    r, seconds, peak = _cli("generate", "--teacher", "gmm:latent10", "--num-trajectories", "10000000000",
                            "--shard-size", "1", "--out", str(out), "--no-progress", timeout=60)
    assert r.returncode == 2 and "shards" in _one_line(r), r.stderr[-2000:]
    assert not out.exists() and seconds < 30 and peak < 1.5 * 2**30, (seconds, peak)


def test_a_config_file_is_held_to_the_same_bounds(tmp_path):
    for values, word in [({"num_trajectories": 10**12, "shard_size": 1}, "num-trajectories"),
                         ({"num_trajectories": 64, "num_steps": 10**9}, "num-steps"),
                         ({"num_trajectories": 64, "guidance": "nan"}, "guidance"),
                         ({"num_trajectories": 64, "cpus_per_worker": float("inf")}, "cpus-per-worker")]:
        cfg = tmp_path / "gen.json"
        cfg.write_text(json.dumps({"teacher": "gmm:latent10", "out": str(tmp_path / "c"), **values},
                                  allow_nan=True))
        assert _rc(["generate", "--config", str(cfg)]) == 2, values
        assert not (tmp_path / "c").exists()
        del word


def test_generate_config_refuses_non_finite_and_unbounded_values():
    from pipeline.config import GenerateConfig

    base = dict(teacher="gmm:latent10", out="memory://x", num_trajectories=64, shard_size=32)
    for bad in [dict(guidance=float("nan")), dict(guidance=(1.0, float("inf"))), dict(guidance="1:nan"),
                dict(shift=float("inf")), dict(gpus_per_worker=float("nan")), dict(cpus_per_worker=float("nan")),
                dict(saved_sigmas=(1.0, float("nan"), 0.0)), dict(num_trajectories=10**12),
                dict(num_trajectories=10**10, shard_size=1), dict(num_steps=10**9), dict(shard_size=10**9),
                dict(batch_size=10**9), dict(num_workers=10**9), dict(stages=(10**9,)),
                dict(max_retries=10**9), dict(resolution=10**9), dict(validation_trajectories=10**13)]:
        with pytest.raises(ValueError):
            GenerateConfig(**{**base, **bad})
    GenerateConfig(**base)


def test_train_config_refuses_non_finite_and_unbounded_values():
    from trainer.config import TrainConfig

    base = dict(data="memory://c", out="memory://r")
    for name in ("lr", "grad_clip", "alpha", "fm_weight", "disc_lr", "adv_weight", "ota_timeout", "ota_ratio",
                 "ema_decay", "weight_decay", "lora_alpha"):
        for bad in (float("nan"), float("inf")):
            extra = {"lora_rank": 4} if name == "lora_alpha" else {}
            with pytest.raises(ValueError, match=name.replace("_", "-")):
                TrainConfig(**base, **extra, **{name: bad})
    with pytest.raises(ValueError, match="adv-step-probs"):
        TrainConfig(**base, adv_step_probs=(0.5, float("nan")))
    for name in ("max_steps", "batch_size", "stream_partitions", "shuffle_buffer", "num_workers", "checkpoint_every",
                 "log_every", "eval_every", "warmup_steps", "prompt_cache_size", "ota_prefetch", "disc_blocks",
                 "student_width", "student_depth", "teacher_fit_steps", "gradient_accumulation_steps", "lora_rank"):
        with pytest.raises(ValueError, match=name.replace("_", "-")):
            TrainConfig(**base, **{name: 10**12})
    with pytest.raises(ValueError, match="steps-per-stage"):
        TrainConfig(**base, stages=(8, 4), steps_per_stage=(10, 10**12))
    with pytest.raises(ValueError, match="stages"):
        TrainConfig(**base, stages=(10**9,))
    for name in ("data", "out"):
        with pytest.raises(ValueError, match=f"--{name}"):
            TrainConfig(**{**base, name: ""})
    TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from fixtures import make_gmm_corpus as make_corpus

    return make_corpus(str(tmp_path_factory.mktemp("flags") / "corpus"), 64, 32, stages=(8, 4))


def _tree(root: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in Path(root).rglob("*")}


TRAIN = ("--stages", "4", "--batch-size", "16", "--max-steps", "3", "--eval-every", "0", "--num-workers", "0",
         "--no-progress", "--init", "scratch", "--student-width", "16", "--student-depth", "1")


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--grad-clip", "nan"], ["--alpha", "nan"],
                                   ["--adv-weight", "0.1", "--fm-weight", "nan"], ["--disc-lr", "-inf"],
                                   ["--adv-weight", "nan"], ["--ota-ratio", "0.5", "--ota-timeout", "nan"],
                                   ["--ema-decay", "nan"], ["--lora-alpha", "inf"], ["--adv-step-probs", "0.5,nan"],
                                   ["--stream-partitions", "1000000000"], ["--max-steps", "100000000000000"],
                                   ["--batch-size", "1000000000"], ["--shuffle-buffer", "1000000000000"]],
                         ids=lambda f: " ".join(f))
def test_train_refuses_bad_numbers_before_writing(corpus, tmp_path, capsys, flags):
    out = tmp_path / "run"
    assert _rc(["train", "--data", corpus, "--out", str(out), *TRAIN, *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and flags[-2] in err[0], err
    assert not out.exists()


def test_train_inf_lr_end_to_end(corpus, tmp_path):
    out = tmp_path / "nan_run"
    r, seconds, _ = _cli("train", "--data", corpus, "--out", str(out), *TRAIN, "--lr", "inf")
    assert r.returncode == 2 and "--lr" in _one_line(r) and "finite" in _one_line(r)
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--student", "{run}", "--num-samples", "1000000000"], "--num-samples"),
    (["eval", "--student", "{run}", "--steps", "0"], "--steps"),
    (["eval", "--student", "{run}", "--steps", "-2"], "--steps"),
    (["eval", "--student", "{run}", "--steps", "1,100000000"], "--steps"),
    (["eval", "--student", "{run}", "--teacher-steps", "1000000000"], "--teacher-steps"),
    (["sample", "--student", "{run}", "--prompt", "x", "--steps", "100000000", "--out", "{tmp}/png"], "--steps"),
    (["sample", "--student", "{run}", "--prompt", "x", "--num-images", "1000000000", "--out", "{tmp}/png"],
     "--num-images"),
    (["pool", "up", "--teacher", "gmm:latent10", "--replicas", "1000000000"], "--replicas"),
    (["audit", "{run}", "--replay", "1000000000000"], "--replay"),
    (["demo", "--out", "{tmp}/demo", "--num-trajectories", "1000000000000"], "--num-trajectories"),
])
def test_other_commands_refuse_unbounded_counts(tmp_path, capsys, argv, flag):
    argv = [a.format(run=str(tmp_path / "run"), tmp=str(tmp_path)) for a in argv]
    assert _rc(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and flag in err[0] and ("at most" in err[0] or "in [" in err[0]), err
    assert sorted(os.listdir(tmp_path)) == []


def test_eval_steps_zero_end_to_end(tmp_path):
    r, _, _ = _cli("eval", "--student", str(tmp_path / "run"), "--steps", "0")
    assert r.returncode == 2 and "--steps" in _one_line(r)


def test_sample_steps_end_to_end(tmp_path):
    r, seconds, peak = _cli("sample", "--student", str(tmp_path / "run"), "--prompt", "x", "--steps", "100000000",
                            "--out", str(tmp_path / "png"))
    assert r.returncode == 2 and "--steps" in _one_line(r)
    assert not (tmp_path / "png").exists() and peak < 1.5 * 2**30


# -- F11: --out is not empty, not --data and not inside it -------------------------------------------------------


def test_out_location_check_normalises():
    from trajflow.args import UsageError, check_out_location

    cwd = os.getcwd()
    same_or_inside = [("/d/c", "/d/c"), ("/d/c", "/d/c/"), ("/d/c/", "/d/c"), ("/d/c", "file:///d/c"),
                      ("file:///d/c", "/d/c/runs/r1"), ("/d/c", "/d//c/./runs/../x"), ("/d/c", "file:/d/c/r"),
                      ("c", os.path.join(cwd, "c", "r")), (os.path.join(cwd, "c"), "./c/"),
                      ("s3://b/c", "s3://b/c"), ("s3://b/c", "s3://b/c/"), ("s3://b/c", "s3://b/c/runs/r1"),
                      ("s3://b/c/", "S3://b//c/r"), ("s3://b/c", "s3a://b/c/r"), ("gs://b/c", "gcs://b/c/r"),
                      ("memory://c", "memory://c/r"), ("s3://b/c", "s3://b/x/../c/r")]
    for data, out in same_or_inside:
        with pytest.raises(UsageError, match="--out"):
            check_out_location(out, data)
    for data, out in [("/d/c", "/d/c2"), ("/d/c", "/d/runs/r1"), ("s3://b/c", "s3://b/c2/r"),
                      ("s3://b/c", "gs://b/c/r"), ("s3://b/c", "s3://other/c"), ("/d/c/r", "/d/c")]:
        check_out_location(out, data)
    for out in ("", " "):
        with pytest.raises(UsageError, match="empty"):
            check_out_location(out, "/d/c")


def test_out_link_into_data_is_inside(tmp_path):
    from trajflow.args import UsageError, check_out_location

    (tmp_path / "c").mkdir()
    os.symlink(tmp_path / "c", tmp_path / "alias")
    with pytest.raises(UsageError):
        check_out_location(str(tmp_path / "alias" / "r"), str(tmp_path / "c"))


@pytest.mark.parametrize("out", ["{data}", "{data}/", "{data}/runs/r1", "file://{data}", "{data}/./checkpoints/.."])
def test_train_into_the_corpus_is_refused(corpus, tmp_path, capsys, out):
    before = _tree(corpus)
    assert _rc(["train", "--data", corpus, "--out", out.format(data=corpus), *TRAIN]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--out" in err[0] and "--data" in err[0], err
    assert _tree(corpus) == before


def test_train_into_the_corpus_by_a_relative_path_end_to_end(corpus, tmp_path):
    parent, name = os.path.split(corpus)
    before = _tree(corpus)
    r, _, _ = _cli("train", "--data", corpus, "--out", os.path.join(name, "runs", "r1"), *TRAIN, cwd=parent)
    assert r.returncode == 2 and "--out" in _one_line(r), r.stderr[-2000:]
    assert _tree(corpus) == before


def test_empty_out_is_refused(corpus, tmp_path):
    r, _, _ = _cli("train", "--data", corpus, "--out", "", *TRAIN, cwd=tmp_path)
    assert r.returncode == 2 and "--out" in _one_line(r)
    assert os.listdir(tmp_path) == []
    for argv in (["generate", "--teacher", "gmm:latent10", "--num-trajectories", "8", "--out", ""],
                 ["sample", "--student", str(tmp_path), "--prompt", "x", "--out", ""],
                 ["demo", "--out", ""], ["make-tiny-sd3", ""], ["train", "--data", "", "--out", str(tmp_path / "r")]):
        assert _rc(argv) == 2, argv
    assert os.listdir(tmp_path) == []


def test_bounds_are_finite_numbers():
    from trajflow import args

    for name, (lo, hi) in args.INT_BOUNDS.items():
        assert hi is not None and hi < 2**64 and (lo is None or lo <= hi), name
    assert not math.isnan(args.finite_float("1.5"))


def test_the_configs_hold_the_same_ceilings_as_the_flags():
    """A --config file or a Python caller meets the ceilings the command line has (one number per setting)."""
    from pipeline.config import LIMITS as GENERATE_LIMITS
    from pipeline.config import MAX_SHARDS
    from trainer.config import LIMITS as TRAIN_LIMITS
    from trajflow import args

    def flag_ceiling(command: str, dest: str) -> int:
        return (args.INT_BOUNDS.get(f"{command}.{dest}") or args.INT_BOUNDS[dest])[1]

    for name, limit in GENERATE_LIMITS.items():
        assert flag_ceiling("generate", name) == limit, name
    for name, limit in TRAIN_LIMITS.items():
        assert abs(flag_ceiling("train", name) - limit) <= 1, name  # seed: +-2**62 both
    assert MAX_SHARDS == args.MAX_SHARDS
    assert {d for c, _, a in INTS if c in ("generate", "train") for d in [a.dest]} - set(GENERATE_LIMITS) - set(
        TRAIN_LIMITS) <= {"base_seed", "classes", "pool_replicas"}
