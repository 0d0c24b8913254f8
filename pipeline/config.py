"""The generation run config: data, with typed fields, validation, a config file and CLI overrides."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flowcore.schedules import StageSchedule, solver_sigmas
from models.spec import parse_teacher_spec, scheduler_shift

DTYPES = ("float32", "float16", "bfloat16")

#: the default validation split holds at most this many trajectories (rounded up to whole shards)
DEFAULT_MAX_VALIDATION = 256

#: ceilings of the counts (the same as the `trajflow generate` flags', ``trajflow.args.INT_BOUNDS``): far above
#: any real run, low enough that planning and solving allocate little for them. The run's shards are bounded too:
#: the driver plans ~100 bytes per shard (~110 MB at MAX_SHARDS), before any shard is solved.
MAX_SHARD_SIZE = 2**16
MAX_SHARDS = 2**20
MAX_TRAJECTORIES = MAX_SHARDS * MAX_SHARD_SIZE
MAX_SOLVER_STEPS = 10_000
LIMITS = {"num_trajectories": MAX_TRAJECTORIES, "shard_size": MAX_SHARD_SIZE, "validation_trajectories":
          MAX_TRAJECTORIES, "num_steps": MAX_SOLVER_STEPS, "batch_size": 2**16, "num_workers": 4096,
          "max_retries": 1000, "resolution": 2**14}


def parse_guidance(value: Any) -> float | tuple[float, float]:
    """'3' -> 3.0; '1.5:4.5' or [1.5, 4.5] -> (1.5, 4.5): a range sampled per trajectory."""
    if isinstance(value, (int, float)):
        return _finite_guidance(float(value), value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = float(value[0]), float(value[1])
    elif isinstance(value, dict) and set(value) == {"min", "max"}:
        lo, hi = float(value["min"]), float(value["max"])
    elif isinstance(value, str):
        parts = value.split(":")
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"guidance must be a number like 3.0 or a range like 1.5:4.5, got {value!r}") from None
        if len(numbers) == 1:
            return _finite_guidance(numbers[0], value)
        lo, hi = numbers
    else:
        raise ValueError(f"guidance must be a number or a [min, max] range, got {value!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"guidance must be finite numbers, got {value!r}")
    if lo > hi:
        raise ValueError(f"guidance range needs min <= max, got {lo}:{hi}")
    return (lo, hi)


def _finite_guidance(g: float, value: Any) -> float:
    if not math.isfinite(g):
        raise ValueError(f"guidance must be a finite number, got {value!r}")
    return g


def check_numbers(cfg: Any, limits: dict[str, int]) -> None:
    """Every float of a config (tuples included) finite and every integer field of ``limits`` at most its
    limit; ValueError naming the setting (as its flag) otherwise."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        flag = f.name.replace("_", "-")
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise ValueError(f"{flag} must be {'finite numbers' if items is v else 'a finite number'}, got {v!r}")
        limit = limits.get(f.name)
        if limit is not None and any(isinstance(x, (int, float)) and not isinstance(x, bool) and x > limit
                                     for x in items):
            raise ValueError(f"{flag} must be at most {limit}, got {v!r}")


@dataclass
class GenerateConfig:
    """Everything `trajflow generate` needs. Fields marked (data) determine the bytes of the corpus
    and go into the dataset card; re-running against an existing corpus requires them unchanged."""

    #: teacher SPEC, e.g. gmm:latent10, flownet:s3://b/net.safetensors, diffusers:/models/sd3 (data)
    teacher: str
    #: corpus root URL (s3://bucket/prefix, gs://..., /local/path, memory://...)
    out: str
    #: number of trajectories to generate (data)
    num_trajectories: int
    #: trajectories per shard (data)
    shard_size: int = 256
    #: trajectories set aside for validation (data): the last ceil(V / shard_size) shards of the plan, never
    #: trained on (the trainer evaluates on them). None: min(256, num_trajectories // 8) in whole shards (up
    #: while that is at most a quarter of the corpus, else down); 0: none. One shard always stays for training.
    validation_trajectories: int | None = None
    #: base seed; sample i's noise seed is a hash of (base_seed, i) (data)
    base_seed: int = 0
    #: ODE solver: euler | heun (data)
    solver: str = "euler"
    #: solver steps S; a multiple of the finest stage's window count (data)
    num_steps: int = 32
    #: SD3-style time shift of the sigma grid (data). None: a diffusers teacher's own scheduler shift
    #: (``scheduler/scheduler_config.json``: 3.0 for SD3-Medium, 1.0 for UNet pipelines), else 1.0
    shift: float | None = None
    #: progressive window stages, finest first (data); the saved sigmas default to the finest's boundaries
    stages: tuple[int, ...] = (8, 4, 2)
    #: explicit saved sigmas (each a solver grid point); default: boundaries of the finest stage (data)
    saved_sigmas: tuple[float, ...] | None = None
    #: CFG weight: a float, or (min, max) sampled uniformly per trajectory (data)
    guidance: float | tuple[float, float] = 1.0
    #: class ids to cycle through, round-robin (default: all of the teacher's classes) (data)
    classes: tuple[int, ...] | None = None
    #: prompt file (.jsonl or .parquet with prompt_id, prompt) for prompt-conditioned teachers (data)
    prompts: str | None = None
    #: dtype of stored states (data)
    dtype: str = "float32"
    #: image side in pixels for diffusers teachers: latent = px / VAE scale (default: the model's sample_size) (data)
    resolution: int | None = None
    #: dtype the teacher network runs in (diffusers teachers: bfloat16 / float16 on GPUs; default: as saved) (data)
    teacher_dtype: str | None = None
    #: trajectories per solver batch (data: batch composition can change the low bits of network teachers)
    batch_size: int = 64
    #: number of worker actors
    num_workers: int = 1
    #: GPUs per worker actor (None: 1 when the Ray cluster has GPUs, else 0)
    gpus_per_worker: float | None = None
    #: CPUs per worker actor (also its torch thread count)
    cpus_per_worker: float = 1.0
    #: attempts per shard before the job fails
    max_retries: int = 3
    #: Ray address (None: start an embedded local Ray; "auto": the cluster this process runs on)
    address: str | None = None
    #: fsspec storage options (JSON), e.g. {"client_kwargs": {"endpoint_url": ...}}
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: show a progress bar
    progress: bool = True
    #: on resume and at finalize, re-hash every committed shard (sha256) instead of checking only that
    #: it exists with its recorded size; a shard that differs is regenerated
    verify_sha256: bool = False

    def __post_init__(self):
        # numbers first: finite floats, bounded counts and a bounded plan, before anything is read or planned
        check_numbers(self, {**LIMITS, "stages": MAX_SOLVER_STEPS, "classes": 2**31 - 1})
        if isinstance(self.num_trajectories, int) and isinstance(self.shard_size, int) and self.shard_size >= 1:
            shards = -(-self.num_trajectories // self.shard_size)
            if shards > MAX_SHARDS:
                raise ValueError(f"num-trajectories {self.num_trajectories} in shards of {self.shard_size} make {shards} "
                                 f"shards; a corpus has at most {MAX_SHARDS} (2**20): raise --shard-size (at most "
                                 f"{MAX_SHARD_SIZE})")
        spec = parse_teacher_spec(self.teacher)
        if spec.kind == "diffusers" and "://" not in spec.target and not os.path.isabs(spec.target):
            # workers (and the card's source.path, read by audit and trainer) need a path valid from any cwd
            self.teacher = str(type(spec)(spec.kind, os.path.abspath(spec.target), spec.variant))
        if not self.out:
            raise ValueError("--out is required: a corpus root URL or path")
        for name in ("num_trajectories", "shard_size", "num_steps", "batch_size", "num_workers", "max_retries"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        v = self.validation_trajectories
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"validation-trajectories must be an integer >= 0, got {v!r}")
        if not isinstance(self.base_seed, int) or not 0 <= self.base_seed < 2**62:
            raise ValueError(f"base-seed must be an integer in [0, 2**62), got {self.base_seed!r}")
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"solver must be euler or heun, got {self.solver!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise ValueError(f"teacher-dtype must be one of {', '.join(DTYPES)}, got {self.teacher_dtype!r}")
        if self.resolution is not None:
            if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or self.resolution < 1:
                raise ValueError(f"resolution must be a positive integer (pixels), got {self.resolution!r}")
            if parse_teacher_spec(self.teacher).kind != "diffusers":
                raise ValueError("resolution applies to diffusers teachers only")
        if self.shift is None:
            self.shift = default_shift(self.teacher, self.storage_options)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"shift must be a positive number, got {self.shift!r}")
        self.shift = float(self.shift)
        self.stages = tuple(int(s) for s in self.stages)
        self.schedule = StageSchedule(self.stages, float(self.shift))
        self.grid = solver_sigmas(self.num_steps, float(self.shift), self.schedule.finest)
        if self.saved_sigmas is None:
            self.saved = self.schedule.saved_sigmas()
        else:
            self.saved = [float(s) for s in self.saved_sigmas]
            missing = [s for s in self.saved if not any(abs(s - g) <= 1e-9 for g in self.grid)]
            if missing:
                raise ValueError(f"saved sigmas {missing} are not points of the {self.num_steps}-step solver grid")
        self.guidance = parse_guidance(self.guidance)
        if self.classes is not None:
            self.classes = tuple(int(c) for c in self.classes)
            if not self.classes:
                raise ValueError("classes must not be empty")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError("gpus-per-worker must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus-per-worker must be > 0")
        if not isinstance(self.storage_options, dict):
            raise ValueError("storage-options must be a JSON object")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d

    @property
    def num_shards(self) -> int:
        return -(-self.num_trajectories // self.shard_size)

    @property
    def validation_shards(self) -> int:
        """How many of the plan's last shards are the validation split (see ``validation_trajectories``)."""
        v, S = self.validation_trajectories, self.shard_size
        if v is not None:
            return min(-(-v // S), self.num_shards - 1) if v > 0 else 0
        # default: min(256, N / 8) rounded up to whole shards, unless that holds out more than a quarter of
        # the corpus (a few large shards): then rounded down (possibly to none)
        v = min(DEFAULT_MAX_VALIDATION, self.num_trajectories // 8)
        k = -(-v // S) if -(-v // S) * S <= self.num_trajectories // 4 else v // S
        return min(k, self.num_shards - 1)


def default_shift(teacher: str, storage_options: dict[str, Any] | None = None) -> float:
    """The shift of a diffusers teacher's own scheduler (``PATH/scheduler/scheduler_config.json``, local
    or on object storage); 1.0 for other teachers and for folders without a scheduler config."""
    spec = parse_teacher_spec(teacher)
    if spec.kind != "diffusers":
        return 1.0
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(spec.target, **(storage_options or {}))
    path = f"{root.rstrip('/')}/scheduler/scheduler_config.json"
    try:
        with fs.open(path, "r") as f:
            sched = json.load(f)
    except FileNotFoundError:
        return 1.0
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the teacher's scheduler config {spec.target}/scheduler/scheduler_config.json "
                         f"for its default shift ({e}); pass --shift explicitly") from None
    return scheduler_shift(sched if isinstance(sched, dict) else None)


def config_fields() -> dict[str, Any]:
    return {f.name: f for f in fields(GenerateConfig)}


def load_config_file(path: str) -> dict[str, Any]:
    """A JSON or TOML file of GenerateConfig fields (snake_case or kebab-case keys)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    text = p.read_text()
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {p} must hold an object of settings")
    known = config_fields()
    out = {}
    for k, v in raw.items():
        name = k.replace("-", "_")
        if name not in known:
            raise ValueError(f"config file {p}: unknown setting {k!r}; known: {', '.join(sorted(known))}")
        out[name] = v
    return out


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> GenerateConfig:
    """Config file values overridden by the flags that were given (None = not given)."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    for f in fields(GenerateConfig):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in merged:
            raise ValueError(f"--{f.name.replace('_', '-')} is required (as a flag or in the config file)")
    return GenerateConfig(**merged)
