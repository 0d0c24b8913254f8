"""Argument types and the usage error shared by every `trajflow` subcommand (a leaf: the dispatcher in
``trajflow.cli`` and the command modules import it, it imports none of them)."""

from __future__ import annotations

import argparse
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator

__all__ = ["UsageError", "json_object_arg", "int_list", "float_list", "one_line", "finite_float", "bounded_int",
           "finite_float_list", "bounded_int_list", "guidance_arg", "non_empty", "INT_BOUNDS", "CommandParser",
           "harden_parser", "check_out_location", "location_key"]


class UsageError(Exception):
    """Bad flags or values: exit status 2 with a one-line message."""


def json_object_arg(text: str) -> dict:
    """argparse type: a JSON object (e.g. --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers (unbounded: the parser wraps it in ``bounded_int_list``)."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers (the parser wraps it in ``finite_float_list``)."""
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ------------------------------------------------------------------------------------------------
# numbers: every float flag finite, every integer flag bounded (issue 25, findings 6 and 10)
#
# ``harden_parser`` walks the finished parser once (every subcommand, every action) and gives each numeric
# option its checking type: ``float`` -> ``finite_float``, ``float_list`` -> ``finite_float_list``, ``int`` ->
# ``bounded_int(lo, hi)`` and ``int_list`` -> ``bounded_int_list(lo, hi)`` with the bounds of INT_BOUNDS. An
# integer flag without an entry there is a programming error raised when the parser is built (so the golden
# --help tests catch a new, unbounded flag). argparse reports a refused value as one line and exit status 2
# (``CommandParser.error``) before the command runs, so nothing is written and nothing is allocated.

#: ceilings: far above any real run, low enough that what the command allocates for them stays small
MAX_SHARD_SIZE = 2**16  # trajectories per shard (default 256)
MAX_SHARDS = 2**20  # shards of one corpus: generate plans ~100 bytes per shard (~110 MB at the bound)
MAX_TRAJECTORIES = MAX_SHARDS * MAX_SHARD_SIZE  # 2**36, about 6.9e10 trajectories
MAX_SOLVER_STEPS = 10_000  # ODE solver / sampling steps, and window counts (a stage has at most one per step)
MAX_BATCH = 2**16  # trajectories per solver batch, samples per rank per step, requests per pool batch
MAX_TRAIN_STEPS = 10**9  # optimizer steps (and every "every N steps" interval)
MAX_RESOLUTION = 2**14  # image side in pixels
MAX_EVAL_SAMPLES = 2**20  # samples of one evaluation or audit replay
MAX_IMAGES = 2**16  # images per sampler
#: seeds (torch and numpy take them; the commands add small offsets to them)
SEED = (-(2**62), 2**62)

#: (lowest, highest) value of each integer flag, by "command.dest" or by dest (every command with that dest).
#: lowest None: the command's own configuration checks the minimum (and says what it means), e.g.
#: GenerateConfig for --num-trajectories >= 1; the highest bound is always the parser's (and the config's).
INT_BOUNDS: dict[str, tuple[int | None, int]] = {
    # generate (pipeline.config.GenerateConfig holds the same ceilings, for --config files and Python callers)
    "num_trajectories": (None, MAX_TRAJECTORIES),
    "shard_size": (None, MAX_SHARD_SIZE),
    "validation_trajectories": (None, MAX_TRAJECTORIES),
    "base_seed": (None, 2**62 - 1),
    "num_steps": (None, MAX_SOLVER_STEPS),
    "stages": (None, MAX_SOLVER_STEPS),
    "classes": (0, 2**31 - 1),
    "resolution": (None, MAX_RESOLUTION),
    "batch_size": (None, MAX_BATCH),
    "generate.num_workers": (None, 4096),
    "max_retries": (None, 1000),
    # train (trainer.config.TrainConfig holds the same ceilings)
    "steps_per_stage": (None, MAX_TRAIN_STEPS),
    "max_steps": (None, MAX_TRAIN_STEPS),
    "gradient_accumulation_steps": (None, 2**16),
    "warmup_steps": (None, MAX_TRAIN_STEPS),
    "seed": SEED,
    "checkpoint_every": (None, MAX_TRAIN_STEPS),
    "log_every": (None, MAX_TRAIN_STEPS),
    "eval_every": (None, MAX_TRAIN_STEPS),
    "teacher_fit_steps": (None, MAX_TRAIN_STEPS),
    "student_width": (None, 2**13),
    "student_depth": (None, 128),
    "stream_partitions": (None, 2**16),
    "train.num_workers": (None, 256),
    "shuffle_buffer": (None, 2**20),
    "pool_replicas": (None, 1024),
    "ota_prefetch": (None, 1024),
    "disc_blocks": (None, 64),
    "lora_rank": (None, 2**14),
    "prompt_cache_size": (None, 2**20),
    # eval, sample, pool, audit, demo, make-tiny-*
    "eval.steps": (1, MAX_SOLVER_STEPS),
    "sample.steps": (None, MAX_SOLVER_STEPS),
    "eval.num_samples": (2, MAX_EVAL_SAMPLES),
    "num_images": (None, MAX_IMAGES),
    "teacher_steps": (None, MAX_SOLVER_STEPS),
    "sample.resolution": (1, MAX_RESOLUTION),
    "pool.resolution": (1, MAX_RESOLUTION),
    "replicas": (None, 1024),
    "max_batch_size": (None, MAX_BATCH),
    "replay": (0, MAX_EVAL_SAMPLES),
    "workers": (1, 1024),
    "demo.num_trajectories": (1, 2**20),
}


def _show(n: int) -> str:
    return f"{n} (2**{n.bit_length() - 1})" if n >= 1024 and n & (n - 1) == 0 else str(n)


def _range_text(lo: int | None, hi: int) -> str:
    return f"an integer in [{_show(lo)}, {_show(hi)}]" if lo is not None else f"an integer, at most {_show(hi)}"


def _parse_int(text: str, lo: int | None, hi: int) -> int:
    try:
        value = int(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected {_range_text(lo, hi)}, got {text!r}") from None
    if value > hi or (lo is not None and value < lo):
        raise argparse.ArgumentTypeError(f"must be {_range_text(lo, hi)}, got {value}")
    return value


def bounded_int(lo: int | None, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (lo None: only the ceiling; the command checks the minimum)."""
    def parse(text: str) -> int:
        return _parse_int(text, lo, hi)

    parse.__name__ = "bounded_int"
    parse.bounds = (lo, hi)  # type: ignore[attr-defined]
    return parse


def bounded_int_list(lo: int | None, hi: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated integers, each in [lo, hi]."""
    def parse(text: str) -> tuple[int, ...]:
        values = int_list(text)
        for v in values:
            if v > hi or (lo is not None and v < lo):
                raise argparse.ArgumentTypeError(f"each value must be {_range_text(lo, hi)}, got {v}")
        return values

    parse.__name__ = "bounded_int_list"
    parse.bounds = (lo, hi)  # type: ignore[attr-defined]
    return parse


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan, inf and overflowing literals like 1e400 are refused)."""
    try:
        value = float(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite numbers."""
    values = float_list(text)
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def guidance_arg(text: str) -> str:
    """argparse type of --guidance: a finite number (3.0) or a range of two (1.5:4.5), kept as text (the
    generate config parses it, from a flag or a config file alike)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(parts) > 2 or not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected a finite number like 3.0 or a range like 1.5:4.5, got {text!r}")
    return text


def non_empty(text: str) -> str:
    """argparse type of a location (--out, --data, --student, a folder): not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (name a path or a URL)")
    return text


#: options and positionals that name a location; an empty one would mean the working directory
_LOCATION_DESTS = ("out", "data", "student", "dir", "url")

class CommandParser(argparse.ArgumentParser):
    """argparse's parser with its usage errors on one line (``trajflow train: error: argument --lr: must be a
    finite number, got 'inf'``) and exit status 2, like every other refusal of the command line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _commands(parser: argparse.ArgumentParser, name: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, sub_name)


def harden_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every numeric option of every (sub)command its checking type (see above); every location
    option must not be empty. Raises LookupError for an integer flag without bounds in INT_BOUNDS."""
    for command, p in _commands(parser):
        for action in p._actions:
            kind = action.type
            if kind is float:
                action.type = finite_float
            elif kind is float_list:
                action.type = finite_float_list
            elif kind is int or kind is int_list:
                bounds = INT_BOUNDS.get(f"{command}.{action.dest}") or INT_BOUNDS.get(action.dest)
                if bounds is None:
                    flag = "/".join(action.option_strings) or action.dest
                    raise LookupError(f"integer flag {flag} of `trajflow {command}` has no bounds in "
                                      "trajflow.args.INT_BOUNDS")
                action.type = bounded_int(*bounds) if kind is int else bounded_int_list(*bounds)
            elif kind is None and action.dest in _LOCATION_DESTS and action.nargs is None:
                action.type = non_empty
    return parser


# ------------------------------------------------------------------------------------------------
# --out against --data (issue 25, finding 11)

#: fsspec protocol aliases (one filesystem, two names)
_SCHEME_ALIASES = {"local": "file", "s3a": "s3", "s3n": "s3", "gcs": "gs"}


def location_key(url: str) -> tuple[str, str]:
    """(scheme, normalised path) of a location, for comparing two of them: plain and ``file:`` paths made
    absolute with links resolved; ``//``, ``.`` and ``..`` segments and trailing slashes removed; the
    scheme (with its aliases) and a URL's bucket or host in lower case."""
    text = url.strip()
    head, sep, rest = text.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", head):
        scheme = _SCHEME_ALIASES.get(head.lower(), head.lower())
    elif re.match(r"(?i)file:", text):  # file:/abs/path
        scheme, rest = "file", text[5:]
    else:
        scheme, rest = "file", text
    if scheme == "file":
        return scheme, os.path.realpath(os.path.abspath(os.path.expanduser(rest or ".")))
    path = posixpath.normpath("/" + rest).lstrip("/")  # collapses //, . and ..; never climbs above the root
    first, slash, tail = path.partition("/")
    return scheme, f"{first.lower()}{slash}{tail}".rstrip("/")


def check_out_location(out: str, data: str, out_flag: str = "--out", data_flag: str = "--data") -> None:
    """A run's output location must not be empty, the corpus root, or anything inside the corpus (its
    checkpoints would become orphan objects that make the corpus fail its audit). UsageError otherwise."""
    if not str(out).strip():
        raise UsageError(f"{out_flag} must not be empty (name a path or a URL for the run)")
    (s_out, p_out), (s_data, p_data) = location_key(out), location_key(data)
    if s_out != s_data:
        return
    if p_out == p_data:
        raise UsageError(f"{out_flag} {out} is the corpus {data_flag} {data}; write the run elsewhere (e.g. next "
                         "to the corpus)")
    if p_out.startswith(p_data.rstrip("/") + "/"):
        raise UsageError(f"{out_flag} {out} lies inside the corpus {data_flag} {data}; write the run outside it (its "
                         "files would be orphan objects of the corpus)")


#: how torch's DataLoader prefixes an error it re-raises from a worker process
_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\s*Original Traceback")
#: exception types whose message alone is not self-explanatory (their type name is shown too)
_BARE_TYPES = (KeyError, IndexError, TypeError, AttributeError, AssertionError, NameError, RecursionError,
               ZeroDivisionError, NotImplementedError)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """``exc`` as one line: whitespace (newlines of nested tracebacks included) collapsed, at most ``limit``
    characters; the type name is prepended where the message alone says little (KeyError('spec') -> "KeyError:
    'spec'")."""
    text = str(exc)
    worker = _WORKER_TRACEBACK.match(text)
    if worker:  # torch re-raises a DataLoader worker's error with the worker's whole traceback as its message
        original = re.search(r".*\n(?:[\w.]+\.)?" + re.escape(type(exc).__name__) + r": (.*)\Z", text, re.S)
        if original:
            text = f"{original.group(1)} (in data-loader worker {worker.group(1)})"
    msg = " ".join(text.split())
    if not msg or isinstance(exc, _BARE_TYPES):
        msg = f"{type(exc).__name__}: {msg}".rstrip(": ") + " (run `trajflow -v ...` for the traceback)"
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"
