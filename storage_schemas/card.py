"""The dataset card: ``<root>/dataset.json``, what a corpus is and how it was generated.

A card pins everything that determines the stored bytes: the teacher, the ODE solver and its
sigma grid, the saved sigmas (which solver states are stored), the per-sample shape and dtype,
the conditioning, the window stages the corpus serves and the run configuration (number of
trajectories, shard size, base seed...). :meth:`DatasetCard.fingerprint` hashes all of it except
``created_by``; every commit record carries that fingerprint.

Sigma convention (see ``docs/math.md``): sigma = 1 is pure noise, sigma = 0 is data; sigma grids
are strictly decreasing from 1.0 to 0.0 inclusive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._fields import (
    MAX_SEED,
    canonical_json,
    check_keys,
    check_schema_version,
    expect_choice,
    expect_dict,
    expect_float,
    expect_float_list,
    expect_int,
    expect_int_list,
    expect_str,
    parse_json_object,
    pretty_json,
)
from .errors import SchemaError
from .layout import shard_id
from .limits import MAX_CARD_BYTES
from .version import SCHEMA_VERSION

CARD_WHERE = "dataset card (dataset.json)"
SOLVER_NAMES = ("euler", "heun")
STATE_DTYPES = ("float32", "float16", "bfloat16")
CONDITIONING_KINDS = ("class", "prompt", "none")
SIGMA_TOLERANCE = 1e-6
"""Absolute tolerance when comparing sigmas (stored float32 sigmas against the card's floats)."""

RUN_REQUIRED_FIELDS = ("num_trajectories", "shard_size", "base_seed")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass in __post_init__


def check_sigma_grid(sigmas: Sequence[float], *, where: str, field: str) -> None:
    """A sigma grid runs strictly decreasing from 1.0 to 0.0 (both within SIGMA_TOLERANCE)."""
    if len(sigmas) < 2:
        raise SchemaError(
            f"{where}: field {field!r} needs at least 2 sigmas (1.0 and 0.0), found {len(sigmas)}"
        )
    if abs(sigmas[0] - 1.0) > SIGMA_TOLERANCE:
        raise SchemaError(f"{where}: field {field!r} must start at 1.0 (pure noise), found {sigmas[0]!r}")
    if abs(sigmas[-1]) > SIGMA_TOLERANCE:
        raise SchemaError(f"{where}: field {field!r} must end at 0.0 (data), found {sigmas[-1]!r}")
    for i in range(1, len(sigmas)):
        if not sigmas[i] < sigmas[i - 1]:
            raise SchemaError(
                f"{where}: field {field!r} must be strictly decreasing, "
                f"found {sigmas[i - 1]!r} then {sigmas[i]!r} at position {i}"
            )


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher whose probability-flow ODE produced the trajectories.

    Attributes:
        kind: teacher family, e.g. ``"gmm"``, ``"flownet"``, ``"diffusers"``.
        fingerprint: a stable hash of the teacher's weights/spec (teacher-defined string).
        config: the JSON config that rebuilds the teacher (used by audit replay).
    """

    kind: str
    fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expect_str(self.kind, where=CARD_WHERE, field="teacher.kind")
        expect_str(self.fingerprint, where=CARD_WHERE, field="teacher.fingerprint")
        _set(self, "config", expect_dict(self.config, where=CARD_WHERE, field="teacher.config"))

    @classmethod
    def from_dict(cls, obj: Any) -> TeacherInfo:
        obj = expect_dict(obj, where=CARD_WHERE, field="teacher")
        check_keys(obj, where=CARD_WHERE, prefix="teacher.", required=("kind", "fingerprint", "config"))
        return cls(kind=obj["kind"], fingerprint=obj["fingerprint"], config=obj["config"])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "config": self.config}


@dataclass(frozen=True)
class GuidanceRange:
    """Classifier-free guidance scale drawn per trajectory, uniformly in [min, max]."""

    min: float
    max: float

    def __post_init__(self) -> None:
        _set(self, "min", expect_float(self.min, where=CARD_WHERE, field="solver.guidance.min"))
        _set(self, "max", expect_float(self.max, where=CARD_WHERE, field="solver.guidance.max"))
        if self.min > self.max:
            raise SchemaError(
                f"{CARD_WHERE}: field 'solver.guidance' range needs min <= max, found min={self.min} max={self.max}"
            )

    @classmethod
    def from_dict(cls, obj: Any) -> GuidanceRange:
        obj = expect_dict(obj, where=CARD_WHERE, field="solver.guidance")
        check_keys(obj, where=CARD_WHERE, prefix="solver.guidance.", required=("min", "max"))
        return cls(min=obj["min"], max=obj["max"])

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "max": self.max}


@dataclass(frozen=True)
class SolverInfo:
    """The ODE solver that integrated the teacher.

    Attributes:
        name: ``"euler"`` or ``"heun"``.
        num_steps: number of solver steps S.
        sigmas: the solver grid, S + 1 values, strictly decreasing from 1.0 to 0.0.
        guidance: a fixed CFG scale, or a :class:`GuidanceRange` sampled per trajectory
            (JSON: a number, or ``{"min": a, "max": b}``).
    """

    name: str
    num_steps: int
    sigmas: tuple[float, ...]
    guidance: float | GuidanceRange

    def __post_init__(self) -> None:
        expect_choice(self.name, SOLVER_NAMES, where=CARD_WHERE, field="solver.name")
        expect_int(self.num_steps, where=CARD_WHERE, field="solver.num_steps", minimum=1)
        sigmas = expect_float_list(self.sigmas, where=CARD_WHERE, field="solver.sigmas")
        if len(sigmas) != self.num_steps + 1:
            raise SchemaError(
                f"{CARD_WHERE}: field 'solver.sigmas' must hold num_steps + 1 = {self.num_steps + 1} values, "
                f"found {len(sigmas)}"
            )
        check_sigma_grid(sigmas, where=CARD_WHERE, field="solver.sigmas")
        _set(self, "sigmas", sigmas)
        if isinstance(self.guidance, GuidanceRange):
            pass
        elif isinstance(self.guidance, Mapping):
            _set(self, "guidance", GuidanceRange.from_dict(self.guidance))
        else:
            _set(self, "guidance", expect_float(self.guidance, where=CARD_WHERE, field="solver.guidance"))

    @classmethod
    def from_dict(cls, obj: Any) -> SolverInfo:
        obj = expect_dict(obj, where=CARD_WHERE, field="solver")
        check_keys(
            obj, where=CARD_WHERE, prefix="solver.", required=("name", "num_steps", "sigmas", "guidance")
        )
        return cls(
            name=obj["name"], num_steps=obj["num_steps"], sigmas=obj["sigmas"], guidance=obj["guidance"]
        )

    def to_dict(self) -> dict[str, Any]:
        guidance = self.guidance.to_dict() if isinstance(self.guidance, GuidanceRange) else self.guidance
        return {
            "name": self.name,
            "num_steps": self.num_steps,
            "sigmas": list(self.sigmas),
            "guidance": guidance,
        }

    def guidance_allows(self, guidance: float) -> bool:
        """Whether a per-sample guidance scale is the card's fixed value or inside its range."""
        if isinstance(self.guidance, GuidanceRange):
            return self.guidance.min - SIGMA_TOLERANCE <= guidance <= self.guidance.max + SIGMA_TOLERANCE
        return abs(guidance - self.guidance) <= SIGMA_TOLERANCE


@dataclass(frozen=True)
class Conditioning:
    """What each sample is conditioned on.

    JSON: ``{"kind": "class", "num_classes": N}`` | ``{"kind": "prompt"}`` | ``{"kind": "none"}``.
    Sample metadata then carries ``class_id`` in [0, N), or ``prompt_id`` and/or ``prompt``.
    """

    kind: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        expect_choice(self.kind, CONDITIONING_KINDS, where=CARD_WHERE, field="conditioning.kind")
        if self.kind == "class":
            expect_int(self.num_classes, where=CARD_WHERE, field="conditioning.num_classes", minimum=1)
        elif self.num_classes is not None:
            raise SchemaError(
                f"{CARD_WHERE}: field 'conditioning.num_classes' is only allowed with kind 'class', "
                f"found kind {self.kind!r}"
            )

    @classmethod
    def from_dict(cls, obj: Any) -> Conditioning:
        obj = expect_dict(obj, where=CARD_WHERE, field="conditioning")
        check_keys(
            obj, where=CARD_WHERE, prefix="conditioning.", required=("kind",), optional=("num_classes",)
        )
        kind = expect_choice(obj["kind"], CONDITIONING_KINDS, where=CARD_WHERE, field="conditioning.kind")
        if kind == "class":
            check_keys(obj, where=CARD_WHERE, prefix="conditioning.", required=("kind", "num_classes"))
        return cls(kind=kind, num_classes=obj.get("num_classes"))

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "class":
            return {"kind": self.kind, "num_classes": self.num_classes}
        return {"kind": self.kind}


_CARD_REQUIRED = (
    "schema_version",
    "teacher",
    "solver",
    "saved_sigmas",
    "sample_shape",
    "dtype",
    "conditioning",
    "run",
    "created_by",
)
_CARD_OPTIONAL = ("stages",)


@dataclass(frozen=True)
class DatasetCard:
    """The content of ``<root>/dataset.json``.

    Attributes:
        teacher: the teacher (a :class:`TeacherInfo`, or its dict form).
        solver: the solver (a :class:`SolverInfo`, or its dict form).
        saved_sigmas: the K sigmas whose solver states each sample stores, strictly decreasing
            from 1.0 to 0.0 inclusive, each one a point of ``solver.sigmas``.
        sample_shape: the shape of one state, e.g. ``[4, 64, 64]`` (C, H, W) or ``[2]``;
            a sample's ``states`` tensor has shape ``[K, *sample_shape]``.
        dtype: dtype of ``states``: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        conditioning: a :class:`Conditioning`, or its dict form.
        run: the generation config that determines the data; must hold ``num_trajectories``,
            ``shard_size`` and ``base_seed`` and may hold more (plain JSON).
        created_by: the writing software, e.g. ``"trajflow 0.1.0"`` (not part of the fingerprint).
        stages: optional progressive window counts, finest first, e.g. ``[8, 4, 2]``; each stage
            divides the previous one and ``K - 1`` is a multiple of the finest.
        schema_version: the format version (see :mod:`storage_schemas.version`).
    """

    teacher: TeacherInfo
    solver: SolverInfo
    saved_sigmas: tuple[float, ...]
    sample_shape: tuple[int, ...]
    dtype: str
    conditioning: Conditioning
    run: dict[str, Any]
    created_by: str
    stages: tuple[int, ...] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_schema_version(self.schema_version, where=CARD_WHERE)
        for name, kind in (("teacher", TeacherInfo), ("solver", SolverInfo), ("conditioning", Conditioning)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                _set(self, name, kind.from_dict(value))
        saved = expect_float_list(self.saved_sigmas, where=CARD_WHERE, field="saved_sigmas")
        check_sigma_grid(saved, where=CARD_WHERE, field="saved_sigmas")
        for i, sigma in enumerate(saved):
            if not any(abs(sigma - s) <= SIGMA_TOLERANCE for s in self.solver.sigmas):
                raise SchemaError(
                    f"{CARD_WHERE}: field 'saved_sigmas[{i}]' = {sigma!r} is not a point of solver.sigmas; "
                    "stored states must be solver states, never interpolations"
                )
        _set(self, "saved_sigmas", saved)
        _set(
            self,
            "sample_shape",
            expect_int_list(self.sample_shape, where=CARD_WHERE, field="sample_shape", minimum=1),
        )
        expect_choice(self.dtype, STATE_DTYPES, where=CARD_WHERE, field="dtype")
        _set(self, "run", self._checked_run(self.run))
        expect_str(self.created_by, where=CARD_WHERE, field="created_by")
        if self.stages is not None:
            _set(self, "stages", self._checked_stages(self.stages, num_saved=len(saved)))

    @staticmethod
    def _checked_run(run: Any) -> dict[str, Any]:
        run = expect_dict(run, where=CARD_WHERE, field="run")
        for name in RUN_REQUIRED_FIELDS:
            if name not in run:
                raise SchemaError(f"{CARD_WHERE}: missing field 'run.{name}'")
        expect_int(run["num_trajectories"], where=CARD_WHERE, field="run.num_trajectories", minimum=1)
        expect_int(run["shard_size"], where=CARD_WHERE, field="run.shard_size", minimum=1)
        expect_int(run["base_seed"], where=CARD_WHERE, field="run.base_seed", minimum=0, maximum=MAX_SEED)
        if "validation_shards" in run:
            expect_int(run["validation_shards"], where=CARD_WHERE, field="run.validation_shards", minimum=0)
        return run

    @staticmethod
    def _checked_stages(stages: Any, *, num_saved: int) -> tuple[int, ...]:
        stages = expect_int_list(stages, where=CARD_WHERE, field="stages", minimum=1)
        for i in range(1, len(stages)):
            if not (stages[i] < stages[i - 1] and stages[i - 1] % stages[i] == 0):
                raise SchemaError(
                    f"{CARD_WHERE}: field 'stages' must be finest first, each stage dividing the previous one "
                    f"(e.g. [8, 4, 2]), found {list(stages)}"
                )
        if (num_saved - 1) % stages[0] != 0:
            raise SchemaError(
                f"{CARD_WHERE}: field 'stages' finest window count {stages[0]} must divide the "
                f"{num_saved - 1} intervals of saved_sigmas"
            )
        return stages

    # --- derived -------------------------------------------------------------------------------

    @property
    def num_saved_states(self) -> int:
        """K, the number of states each sample stores."""
        return len(self.saved_sigmas)

    @property
    def states_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``states`` tensor: ``(K, *sample_shape)``."""
        return (len(self.saved_sigmas), *self.sample_shape)

    @property
    def num_trajectories(self) -> int:
        return int(self.run["num_trajectories"])

    @property
    def shard_size(self) -> int:
        return int(self.run["shard_size"])

    @property
    def num_validation_shards(self) -> int:
        """Shards of the validation split (``run.validation_shards``: the plan's last ones; 0 when absent)."""
        return int(self.run.get("validation_shards", 0))

    @property
    def validation_shard_ids(self) -> list[str]:
        """The validation split's shard ids: the last ``num_validation_shards`` shards of the plan."""
        planned = -(-self.num_trajectories // self.shard_size)
        k = min(self.num_validation_shards, planned - 1)
        return [shard_id(n) for n in range(planned - k, planned)]

    @property
    def base_seed(self) -> int:
        return int(self.run["base_seed"])

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "teacher": self.teacher.to_dict(),
            "solver": self.solver.to_dict(),
            "saved_sigmas": list(self.saved_sigmas),
            "sample_shape": list(self.sample_shape),
            "dtype": self.dtype,
            "conditioning": self.conditioning.to_dict(),
            "run": self.run,
            "created_by": self.created_by,
        }
        if self.stages is not None:
            out["stages"] = list(self.stages)
        return out

    def to_json(self) -> str:
        """Canonical ``dataset.json`` text: sorted keys, indent 2, trailing newline."""
        return pretty_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> DatasetCard:
        if not isinstance(obj, Mapping):
            raise SchemaError(f"{CARD_WHERE}: must be a JSON object, found {type(obj).__name__}")
        check_schema_version(obj.get("schema_version"), where=CARD_WHERE)
        check_keys(obj, where=CARD_WHERE, prefix="", required=_CARD_REQUIRED, optional=_CARD_OPTIONAL)
        return cls(
            teacher=TeacherInfo.from_dict(obj["teacher"]),
            solver=SolverInfo.from_dict(obj["solver"]),
            saved_sigmas=obj["saved_sigmas"],
            sample_shape=obj["sample_shape"],
            dtype=obj["dtype"],
            conditioning=Conditioning.from_dict(obj["conditioning"]),
            run=obj["run"],
            created_by=obj["created_by"],
            stages=obj.get("stages"),
            schema_version=obj["schema_version"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetCard:
        """Parse and validate ``dataset.json``.

        Raises:
            CorpusFormatError: not valid JSON.
            UnsupportedSchemaVersion: schema_version missing, mistyped or unsupported.
            SchemaError: a missing, unknown or wrongly typed field (named in the message).
        """
        return cls.from_dict(parse_json_object(text, where=CARD_WHERE, max_bytes=MAX_CARD_BYTES))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of everything that determines the data (all but created_by)."""
        determining = {k: v for k, v in self.to_dict().items() if k != "created_by"}
        return hashlib.sha256(canonical_json(determining).encode("utf-8")).hexdigest()
