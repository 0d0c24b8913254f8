"""The training run config: a typed dataclass; run configs are data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from flowcore.ota import OTA_MODES
from flowcore.windows import WINDOW_POINTS

if TYPE_CHECKING:
    from trainer.students.base import Student

#: what the corpus part of a batch trains (TrainConfig.objective)
OBJECTIVES = ("windows", "unrolled")
#: student initialisations (TrainConfig.init)
INITS = ("teacher", "fitted", "scratch")

#: the default budget (the student family's ``DEFAULT_BUDGET``) makes at most this many epochs over the
#: training split: a small corpus is over-fitted long before a flow net's 1500 steps (1500 steps x 128 = 187
#: epochs of 1024 trajectories), and nothing is gained by passing over it again and again (see
#: docs/benchmarks.md for the measurement)
DEFAULT_MAX_EPOCHS = 50
#: ... but it is never below this many steps (or the family's DEFAULT_BUDGET, if smaller)
DEFAULT_MIN_STEPS = 200
#: a run planned for more epochs than this says so before it starts
WARN_EPOCHS = 100


def family_defaults(family: type[Student]) -> tuple[int, int, str]:
    """(DEFAULT_BUDGET, DEFAULT_BATCH_SIZE, DEFAULT_MIXED_PRECISION_ON_BF16_GPU) of the student family ``family``
    (a class of ``trainer.students``, e.g. ``student_class_for(card)``); ValueError for anything else, such as
    a teacher kind string (never silently a flow net's defaults)."""
    try:
        return (int(family.DEFAULT_BUDGET), int(family.DEFAULT_BATCH_SIZE),
                str(family.DEFAULT_MIXED_PRECISION_ON_BF16_GPU))
    except AttributeError:
        raise ValueError(f"{family!r} is not a student family with training defaults: pass the family class, "
                         "trainer.students.student_class_for(card) (not the card's teacher kind)") from None


#: --parallelism: ddp (every rank holds the whole student, gradients all-reduced; the default and the only
#: choice for flow-net students) | fsdp2 (``torch.distributed.fsdp.fully_shard``: parameters, gradients and
#: optimizer state sharded over the ranks; diffusers students and the SD3 discriminator)
PARALLELISMS = ("ddp", "fsdp2")
#: --fsdp-mixed-precision names -> (param dtype, reduce dtype): the dtype FSDP2 all-gathers the parameters
#: in for forward/backward (the sharded fp32 master weights and the optimizer stay fp32) and the dtype of the
#: gradient reduce-scatter. A spec "param=bf16,reduce=fp32" names the two directly.
FSDP_MIXED_PRECISION = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp32")}
FSDP_DTYPES = ("fp32", "bf16", "fp16")


def fsdp_precision_dtypes(spec: str) -> tuple[str, str]:
    """(param dtype, reduce dtype) names of an --fsdp-mixed-precision value: a name of FSDP_MIXED_PRECISION or
    "param=DTYPE,reduce=DTYPE" (DTYPE in FSDP_DTYPES); ValueError with the choices otherwise."""
    if spec in FSDP_MIXED_PRECISION:
        return FSDP_MIXED_PRECISION[spec]
    parts = dict(p.partition("=")[::2] for p in str(spec).replace(" ", "").split(",") if p)
    if set(parts) == {"param", "reduce"} and all(v in FSDP_DTYPES for v in parts.values()):
        return parts["param"], parts["reduce"]
    raise ValueError(f"fsdp-mixed-precision {spec!r}: choose {' or '.join(FSDP_MIXED_PRECISION)} (bf16 = bf16 "
                     f"parameters, fp32 gradient reduction), or param=DTYPE,reduce=DTYPE with DTYPE in "
                     f"{', '.join(FSDP_DTYPES)}")


#: ceilings of the counts (the same as the `trajflow train` flags', ``trajflow.args.INT_BOUNDS``): far above any
#: real run, low enough that what they size (the data order's partitions, shuffle blocks, caches, the student)
#: stays small; the floats must all be finite (a nan or inf learning rate, clip, weight or timeout trains nothing)
MAX_TRAIN_STEPS = 10**9
LIMITS = {"max_steps": MAX_TRAIN_STEPS, "steps_per_stage": MAX_TRAIN_STEPS, "warmup_steps": MAX_TRAIN_STEPS,
          "checkpoint_every": MAX_TRAIN_STEPS, "log_every": MAX_TRAIN_STEPS, "eval_every": MAX_TRAIN_STEPS,
          "teacher_fit_steps": MAX_TRAIN_STEPS, "stages": 10_000, "batch_size": 2**16,
          "gradient_accumulation_steps": 2**16, "student_width": 2**13, "student_depth": 128,
          "stream_partitions": 2**16, "num_workers": 256, "shuffle_buffer": 2**20, "ota_prefetch": 1024,
          "disc_blocks": 64, "lora_rank": 2**14, "prompt_cache_size": 2**20, "seed": 2**62}


@dataclass
class TrainConfig:
    """Everything `trajflow train` needs."""

    #: corpus URL (a finalized corpus: dataset.json + manifest.parquet)
    data: str
    #: output URL: checkpoints/, student/ (exported EMA weights + card), logs
    out: str
    #: progressive window stages, finest first; each must divide the corpus's finest window count
    stages: tuple[int, ...] = (8, 4, 2)
    #: optimizer steps per stage (default: max_steps split equally)
    steps_per_stage: tuple[int, ...] | None = None
    #: total optimizer steps (default: the student family's budget, DEFAULT_BUDGET)
    max_steps: int | None = None
    #: weight of the direction term of aligned v-prediction (0 = plain MSE)
    alpha: float = 1.0
    #: where training points sit on a window: start | segment | mixed
    window_points: str = "start"
    #: what the corpus part of a batch trains: "windows" (ProReflow's aligned v-prediction on the stage's
    #: windows), "unrolled" (the student's own stage-step Euler solve from each stored noise, with gradient
    #: through every step, against the stored endpoint: the error the user sees, including how the steps'
    #: errors compound); None: the student's default (unrolled for the GMM solver student, else windows)
    objective: str | None = None
    #: share of each batch from online teacher rollouts (0 = corpus only; 1 = online only, e.g. the perflow
    #: baseline; needs a teacher pool)
    ota_ratio: float = 0.0
    #: where online windows start: fresh (teacher from new noise) | student (the student's own few-step
    #: rollout reaches the window start, the teacher solves the window) | perflow (baseline: noised real sample)
    ota_mode: str = "fresh"
    #: rollout requests kept in flight per rank, and seconds before one counts as lost
    ota_prefetch: int = 2
    ota_timeout: float = 60.0
    #: adversarial distillation on trajectory states: weight of the generator's -D term (0 = off)
    adv_weight: float = 0.0
    #: weight of discriminator feature matching (used when adv_weight > 0)
    fm_weight: float = 1.0
    #: probabilities of judging the output of student step 1..N (default 0.2,0.2,0.2,0.4 for 4 steps, else uniform)
    adv_step_probs: tuple[float, ...] | None = None
    #: discriminator learning rate and number of trunk blocks
    disc_lr: float = 1e-4
    disc_blocks: int = 2
    #: samples per rank per step (corpus + online); None: by the student family (its DEFAULT_BATCH_SIZE:
    #: 128 for flow nets, 4 for diffusers students), set by ``resolved``
    batch_size: int | None = None
    #: micro-batches of ``batch_size`` per optimizer step (gradients summed, each loss / K): the global
    #: batch is batch_size x K x world size, independent of what fits in memory
    gradient_accumulation_steps: int = 1
    #: AdamW learning rate, warmup steps, weight decay, gradient clipping norm
    lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: EMA decay of the exported weights (0 disables EMA)
    ema_decay: float = 0.995
    #: seed of the data order and of the window draws
    seed: int = 0
    #: evaluate the EMA student on the corpus's validation split every N steps (and at the end); None: about
    #: ten evaluations per run; 0: never
    eval_every: int | None = None
    #: which weights the export holds: best (lowest validation coupling error at the final stage's step
    #: count; the last weights when the corpus has no validation split) | last
    export: str = "best"
    #: save a checkpoint every N steps (and at the end)
    checkpoint_every: int = 250
    #: experiment trackers for the logged scalars (metrics.jsonl is always written): tensorboard | wandb |
    #: mlflow | all | none, or a comma-separated list; wandb and mlflow read their own environment
    #: (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI, ...)
    report_to: str = "tensorboard"
    #: log metrics every N steps
    log_every: int = 10
    #: student initialisation: "teacher" (the teacher's weights; a GMM teacher has none, so its student is the
    #: exact GMM velocity plus a learned correction that starts at zero, FlowNetConfig.base_gmm: the untrained
    #: student *is* the teacher),
    #: "fitted" (GMM teachers: a plain flow net fitted to the GMM by flow matching, cached; the default before
    #: 2026-12) or "scratch"
    init: str = "teacher"
    #: steps of the flow-matching fit that makes a GMM teacher's "pretrained" net (``init="fitted"``)
    teacher_fit_steps: int = 3000
    #: student architecture (auto: mlp for <= 1024 dims, else conv), width, depth
    student_arch: str = "auto"
    student_width: int = 256
    student_depth: int = 3
    #: accelerate mixed precision: no | fp16 | bf16 (GPU); None: bf16 for diffusers students on a GPU
    #: that supports it, else no (the family's DEFAULT_MIXED_PRECISION_ON_BF16_GPU, set by ``resolved``)
    mixed_precision: str | None = None
    #: data parallelism: ddp | fsdp2 (PARALLELISMS; fsdp2 for diffusers students and their discriminator)
    parallelism: str = "ddp"
    #: fsdp2 mixed precision policy: fp32 | bf16 (bf16 parameters, fp32 reduce) | param=DTYPE,reduce=DTYPE
    fsdp_mixed_precision: str = "fp32"
    #: diffusers (SD3, SD1.5/SDXL UNet) corpora: LoRA rank of the student's adapters (None = full fine-tune)
    lora_rank: int | None = None
    #: LoRA alpha (default: the rank, i.e. scale 1)
    lora_alpha: float | None = None
    #: diffusers students: recompute activations in the backward pass (None = on when training on a GPU)
    gradient_checkpointing: bool | None = None
    #: diffusers students: prompt embeddings kept between steps (LRU entries)
    prompt_cache_size: int = 1024
    #: corrupt shard policy: error (stop, naming the shard) | skip (count and continue)
    on_corrupt: str = "error"
    #: sample order: partitioned (each rank reads about its share of the shards) | global (every rank touches
    #: every shard); None: partitioned for a new run, the checkpoint's order on resume
    stream_order: str | None = None
    #: canonical partitions of the partitioned order (None: the world size of a new run, the checkpoint's on
    #: resume); keep it fixed to keep the exact order when the world size changes
    stream_partitions: int | None = None
    #: DataLoader worker processes per rank (1: decoding overlaps the step)
    num_workers: int = 1
    #: shuffle buffer (samples)
    shuffle_buffer: int = 4096
    #: local shard cache directory (default ~/.cache/trajflow/shards)
    cache_dir: str | None = None
    #: fsspec storage options for data and out (never written to checkpoints, logs or exports)
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: locations outside the corpus root that the card may name for its teacher (URL or path prefixes;
    #: --allow-teacher-location); anything else the card names outside the root is refused
    allow_teacher_locations: tuple[str, ...] = ()
    #: local directory for per-rank consumed-sample logs (JSONL), for audits of the data order
    consumed_log: str | None = None
    #: resume from the latest checkpoint under out (default on)
    resume: bool = True
    #: progress bar on the main process
    progress: bool = True

    def __post_init__(self):
        for f in fields(self):  # numbers first: every float finite, every count at most its LIMITS entry
            v, flag = getattr(self, f.name), f.name.replace("_", "-")
            items = v if isinstance(v, (tuple, list)) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in items):
                raise ValueError(f"{flag} must be {'finite numbers' if items is v else 'a finite number'}, got {v!r}")
            limit = LIMITS.get(f.name)
            if limit is not None and any(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) > limit
                                         for x in items):
                raise ValueError(f"{flag} must be at most {limit}, got {v!r}")
        if not str(self.data).strip() or not str(self.out).strip():
            raise ValueError(f"--{'data' if not str(self.data).strip() else 'out'} must not be empty (a path or URL)")
        if not self.weight_decay >= 0:
            raise ValueError("weight-decay must be >= 0")
        self.stages = tuple(int(s) for s in self.stages)
        allow = self.allow_teacher_locations
        self.allow_teacher_locations = (str(allow),) if isinstance(allow, str) else tuple(str(a) for a in allow)
        if not self.stages or any(s < 1 for s in self.stages):
            raise ValueError(f"stages must be positive window counts like 8,4,2, got {self.stages}")
        for finer, coarser in zip(self.stages, self.stages[1:]):
            if finer % coarser != 0 or coarser >= finer:
                raise ValueError(f"each stage must divide the previous one (e.g. 8,4,2), got {list(self.stages)}")
        if self.steps_per_stage is not None:
            self.steps_per_stage = tuple(int(s) for s in self.steps_per_stage)
            if len(self.steps_per_stage) != len(self.stages) or any(s < 1 for s in self.steps_per_stage):
                raise ValueError("steps-per-stage needs one positive count per stage")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max-steps must be >= 1")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if self.objective not in (None, *OBJECTIVES):
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.window_points not in WINDOW_POINTS:
            raise ValueError(f"window-points must be one of {', '.join(WINDOW_POINTS)}")
        if not 0 <= self.ota_ratio <= 1:
            raise ValueError(f"ota-ratio must be in [0, 1], got {self.ota_ratio}")
        if self.ota_mode not in OTA_MODES:
            raise ValueError(f"ota-mode must be one of {', '.join(OTA_MODES)}, got {self.ota_mode!r}")
        if self.ota_prefetch < 1 or self.ota_timeout <= 0:
            raise ValueError("ota-prefetch must be >= 1 and ota-timeout > 0")
        if self.adv_weight < 0 or self.fm_weight < 0 or self.disc_lr <= 0 or self.disc_blocks < 1:
            raise ValueError("adv-weight and fm-weight must be >= 0, disc-lr > 0, disc-blocks >= 1")
        if self.adv_step_probs is not None:
            self.adv_step_probs = tuple(float(p) for p in self.adv_step_probs)
            if any(not p >= 0 for p in self.adv_step_probs) or sum(self.adv_step_probs) <= 0:
                raise ValueError("adv-step-probs must be >= 0 with a positive sum")
        for name in ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every", "shuffle_buffer"):
            v = getattr(self, name)
            if v is None and name == "batch_size":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        self._check_batch_split()
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema-decay must be in [0, 1)")
        if self.lr <= 0 or self.grad_clip <= 0 or self.warmup_steps < 0:
            raise ValueError("lr and grad-clip must be > 0, warmup-steps >= 0")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.student_arch not in ("auto", "mlp", "conv"):
            raise ValueError("student-arch must be auto, mlp or conv")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError("mixed-precision must be no, fp16 or bf16")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism {self.parallelism!r}: choose {' or '.join(PARALLELISMS)}")
        fsdp_precision_dtypes(self.fsdp_mixed_precision)  # a clear error for an unknown policy
        if self.parallelism != "fsdp2" and self.fsdp_mixed_precision != "fp32":
            raise ValueError("fsdp-mixed-precision needs --parallelism fsdp2 (DDP runs take --mixed-precision)")
        if self.parallelism == "fsdp2" and self.mixed_precision == "fp16":
            raise ValueError("--mixed-precision fp16 (a loss-scaled autocast) is not supported with --parallelism "
                             "fsdp2; use --fsdp-mixed-precision bf16 or --mixed-precision bf16")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"lora-rank must be a positive integer, got {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError("lora-alpha must be > 0")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("lora-alpha needs --lora-rank")
        if self.prompt_cache_size < 0:
            raise ValueError("prompt-cache-size must be >= 0")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool)
                                            or self.eval_every < 0):
            raise ValueError("eval-every must be >= 0 (0: no evaluation while training)")
        if self.export not in ("best", "last"):
            raise ValueError("export must be best or last")
        if self.stream_order not in (None, "partitioned", "global"):
            raise ValueError("stream-order must be partitioned or global")
        if self.stream_partitions is not None and (not isinstance(self.stream_partitions, int)
                                                   or self.stream_partitions < 1):
            raise ValueError("stream-partitions must be >= 1")
        if self.on_corrupt not in ("error", "skip"):
            raise ValueError("on-corrupt must be error or skip")
        if self.num_workers < 0:
            raise ValueError("num-workers must be >= 0")

    def _check_batch_split(self) -> None:
        """The corpus/online split of a batch, once the batch size is known (explicit, or resolved from the
        student family by ``resolved``): neither part may be empty when it is asked for."""
        if self.batch_size is None:
            return
        b, r = self.batch_size, self.ota_ratio
        if r > 0 and self.ota_samples < 1:
            raise ValueError(f"--ota-ratio {r} of --batch-size {b} is round({r} x {b}) = 0 online samples per step; "
                             f"raise the ratio to at least {0.5 / b:.3g} or the batch size")
        if r < 1 and self.corpus_batch_size < 1:
            raise ValueError(f"--ota-ratio {r} of --batch-size {b} leaves {self.corpus_batch_size} corpus samples per "
                             f"step ({self.ota_samples} online); lower the ratio, raise the batch size, or use "
                             "--ota-ratio 1 for online-only training")

    @property
    def ota_samples(self) -> int:
        """Online samples per rank per step (needs ``batch_size``: see ``resolved``)."""
        if self.batch_size is None:
            raise ValueError("the batch size is not resolved yet (TrainConfig.resolved(family, ...))")
        return int(round(self.ota_ratio * self.batch_size))

    @property
    def corpus_batch_size(self) -> int:
        """Corpus samples per rank per step."""
        return self.batch_size - self.ota_samples

    def resolved(self, family: type[Student], *, cuda: bool, bf16_supported: bool) -> TrainConfig:
        """A copy with the settings left None filled by the student family (``trainer.students``:
        ``student_class_for(card)``) and the machine (memory-aware defaults): ``batch_size`` the family's
        DEFAULT_BATCH_SIZE; ``mixed_precision`` its DEFAULT_MIXED_PRECISION_ON_BF16_GPU on a GPU with bf16
        (bf16 for diffusers students), else no. Explicit values are kept; the batch split is validated again
        with the resolved batch size. ValueError when ``family`` is not a student family."""
        _, default_batch, default_mp = family_defaults(family)
        batch = self.batch_size or default_batch
        mp = self.mixed_precision
        if mp is None:
            mp = default_mp if cuda and bf16_supported else "no"
        return replace(self, batch_size=batch, mixed_precision=mp)  # replace() runs __post_init__

    def default_steps(self, family: type[Student], train_samples: int | None = None, world: int = 1) -> int:
        """The default budget: the student family's DEFAULT_BUDGET, capped at DEFAULT_MAX_EPOCHS epochs over
        ``train_samples`` training trajectories (floor DEFAULT_MIN_STEPS) when the corpus part is known."""
        budget, default_batch, _ = family_defaults(family)
        per_step = (self.batch_size or default_batch) - (
            self.ota_samples if self.batch_size is not None else 0)
        per_step *= world * self.gradient_accumulation_steps
        if not train_samples or per_step <= 0:
            return budget
        by_epochs = -(-DEFAULT_MAX_EPOCHS * train_samples // per_step)
        return min(budget, max(DEFAULT_MIN_STEPS, by_epochs))

    def stage_steps(self, family: type[Student], train_samples: int | None = None,
                    world: int = 1) -> tuple[int, ...]:
        """Optimizer steps of each stage (``max_steps`` split equally; default: ``default_steps`` of the student
        family ``family``)."""
        if self.steps_per_stage is not None:
            return self.steps_per_stage
        total = self.max_steps or self.default_steps(family, train_samples, world)
        base, extra = divmod(total, len(self.stages))
        return tuple(base + (1 if i < extra else 0) for i in range(len(self.stages)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        if self.adv_step_probs is not None:
            d["adv_step_probs"] = list(self.adv_step_probs)
        return d
