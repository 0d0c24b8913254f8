"""The `trajflow` command line: one subcommand per user job (see `trajflow --help`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from trajflow import __version__
from trajflow.args import (
    CommandParser,
    UsageError,
    check_out_location,
    float_list,
    guidance_arg,
    harden_parser,
    int_list,
    json_object_arg,
    one_line,
)

EPILOG = """\
examples:
  trajflow demo --out ./demo_out
  trajflow generate --teacher gmm:latent10 --num-trajectories 4096 --shard-size 256 --out s3://bucket/corpus
  trajflow submit --address http://HEAD:8265 --wait -- --teacher gmm:latent10 --num-trajectories 4096 --out s3://b/c
  trajflow audit s3://bucket/corpus --deep --replay 8
  trajflow train --data s3://bucket/corpus --out s3://bucket/runs/r1 --stages 8,4
  trajflow eval --student s3://bucket/runs/r1 --steps 1,2,4
  trajflow generate --teacher diffusers:/models/sd3 --prompts prompts.jsonl --resolution 1024 --shift 3 ...
  trajflow train --data s3://bucket/sd3-corpus --out s3://bucket/runs/sd3 --stages 8,4 --lora-rank 64
  trajflow sample --student s3://bucket/runs/sd3 --prompt "a red cat" --steps 4 --out ./samples
  trajflow pool up --teacher gmm:latent10 --replicas 2 && trajflow train ... --ota-ratio 0.25 --address auto

URLs are fsspec URLs (s3://, gs://, file://, plain paths). S3 endpoints and credentials come from the
standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or --storage-options JSON.
"""


#: help of --allow-teacher-location (train, eval)
ALLOW_TEACHER_HELP = ("a URL or path prefix the corpus card (or student file) may name for the teacher's weights or "
                      "pipeline folder; repeatable. Anything it names outside the corpus root and the allowed "
                      "prefixes is refused, never fetched or opened")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The generate flags (also parsed by `trajflow submit` before it sends them to the cluster)."""
    g = p.add_argument_group("what to generate (these determine the corpus bytes)")
    g.add_argument("--teacher", help="teacher SPEC: gmm:ring2d | gmm:latent10 | gmm:FILE.json | "
                   "flownet:URL.safetensors | diffusers:PATH[:subfolder]")
    g.add_argument("--num-trajectories", type=int, help="number of trajectories (samples)")
    g.add_argument("--shard-size", type=int, help="trajectories per WebDataset shard (default 256)")
    g.add_argument("--validation-trajectories", type=int, metavar="V",
                   help="trajectories set aside as the validation split, never trained on: the last ceil(V / "
                        "shard-size) shards (default: min(256, N / 8); 0: none)")
    g.add_argument("--base-seed", type=int, help="base seed; sample i's noise seed is a hash of (base, i) (default 0)")
    g.add_argument("--solver", choices=["euler", "heun"], help="ODE solver (default euler)")
    g.add_argument("--num-steps", type=int, help="solver steps, a multiple of the finest stage (default 32)")
    g.add_argument("--shift", type=float, help="time shift of the sigma grid (default: a diffusers teacher's own scheduler shift, e.g. 3.0 for SD3-Medium; else 1.0)")
    g.add_argument("--stages", type=int_list, help="window stages finest first; saved sigmas default to the "
                   "finest's boundaries (default 8,4,2)")
    g.add_argument("--saved-sigmas", type=float_list, help="explicit saved sigmas (solver grid points), e.g. 1,0.5,0")
    g.add_argument("--guidance", type=guidance_arg, help="CFG weight, fixed (3.0) or a per-trajectory range (1.5:4.5) (default 1.0)")
    g.add_argument("--classes", type=int_list, help="class ids to cycle through (default: all classes)")
    g.add_argument("--prompts", help="prompt file (.jsonl/.parquet with prompt_id, prompt) for prompt teachers")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="stored state dtype (default float32)")
    g.add_argument("--resolution", type=int, help="image side in pixels for diffusers teachers (latent = PX / VAE "
                   "scale; default: the model's sample_size)")
    g.add_argument("--teacher-dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype the teacher network runs in (e.g. bfloat16 for SD3 on GPUs; default: as saved)")
    g.add_argument("--batch-size", type=int, help="trajectories per solver batch (default 64)")
    r = p.add_argument_group("where and how to run")
    r.add_argument("--out", help="corpus root URL: s3://bucket/prefix, gs://..., /local/dir")
    r.add_argument("--config", help="JSON or TOML file of settings; flags given on the command line override it")
    r.add_argument("--num-workers", type=int, help="worker actors (default 1)")
    r.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: 1 if the cluster has GPUs, else 0)")
    r.add_argument("--cpus-per-worker", type=float, help="CPUs (and torch threads) per worker (default 1)")
    r.add_argument("--max-retries", type=int, help="retries per shard before the job fails (default 3)")
    r.add_argument("--address", help="Ray address (default: start an embedded local Ray; 'auto' inside a cluster)")
    r.add_argument("--storage-options", type=json_object_arg, help="fsspec storage options as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    r.add_argument("--verify-sha256", action="store_true", default=None,
                   help="on resume and before finalizing, re-hash every committed shard (default: check that "
                   "each exists with its recorded size); what differs is regenerated")


GENERATE_KEYS = ("teacher", "num_trajectories", "shard_size", "validation_trajectories", "base_seed", "solver",
                 "num_steps", "shift", "stages",
                 "saved_sigmas", "guidance", "classes", "prompts", "dtype", "resolution", "teacher_dtype", "batch_size",
                 "out", "num_workers",
                 "gpus_per_worker", "cpus_per_worker", "max_retries", "address", "storage_options", "verify_sha256")


def generate_config_from_args(args: argparse.Namespace):
    from pipeline.config import build_config, load_config_file

    file_values = load_config_file(args.config) if args.config else {}
    flags = {k: getattr(args, k) for k in GENERATE_KEYS}
    if args.no_progress:
        flags["progress"] = False
    return build_config(file_values, flags)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.driver import GenerationFailed, run_generation
    from pipeline.storage import StorageError

    try:
        cfg = generate_config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    try:
        summary = run_generation(cfg)
    except (GenerationFailed, StorageError) as e:
        if args.verbose:  # -v: the traceback too
            import traceback

            traceback.print_exc()
        print(f"trajflow generate: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit_generate

    return submit_generate(args)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import TrainConfig

    keys = ("data", "out", "stages", "steps_per_stage", "max_steps", "alpha", "window_points", "objective",
            "batch_size", "lr",
            "warmup_steps", "grad_clip", "ema_decay", "seed", "checkpoint_every", "log_every", "init",
            "teacher_fit_steps", "student_arch", "student_width", "student_depth", "mixed_precision", "on_corrupt",
            "num_workers", "shuffle_buffer", "cache_dir", "storage_options", "consumed_log", "ota_ratio", "ota_mode",
            "ota_prefetch", "ota_timeout", "adv_weight", "fm_weight", "adv_step_probs", "disc_lr", "disc_blocks",
            "lora_rank", "lora_alpha", "gradient_checkpointing", "prompt_cache_size", "gradient_accumulation_steps", "stream_order", "stream_partitions", "eval_every", "export", "report_to",
            "parallelism", "fsdp_mixed_precision")
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    values["allow_teacher_locations"] = tuple(args.allow_teacher_locations or ())
    try:
        cfg = TrainConfig(**values, resume=not args.no_resume, progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    check_out_location(cfg.out, cfg.data)  # a run never writes into its corpus
    from pipeline.pool import PoolError
    from trainer.data import CorpusNotFinalizedError, CorruptShardError
    from trainer.loop import Trainer
    from trajflow.cli_pool import rollout_teacher_for

    if args.pool_replicas < 1:
        raise UsageError("--pool-replicas must be >= 1")
    trainer = None
    try:
        with rollout_teacher_for(cfg, args.address, args.pool_name, args.pool_replicas) as rollout_teacher:
            trainer = Trainer(cfg, rollout_teacher)
            try:
                trainer.build()
                last = trainer.train()
                exported = trainer.export_student()
            finally:
                trainer.close()
    except (CorruptShardError, CorpusNotFinalizedError, FileNotFoundError, PoolError, ValueError) as e:
        if args.verbose:  # -v: the traceback too
            import traceback

            traceback.print_exc()
        print(f"trajflow train: error: {one_line(e)}", file=sys.stderr)
        return 1
    if exported:
        ota = "".join(f"; {phrase}" for phrase in trainer.summaries())  # e.g. the online rollouts' counts
        best = ""
        if trainer.best is not None and trainer.cfg.export == "best":
            best = (f"; exported the best validation weights (step {trainer.best['step']}: {trainer.best['steps']}-step "
                    f"coupling error {trainer.best['coupling_error']:.4g})")
        print(f"trained {trainer.step} steps, {trainer.epochs_made:.1f} epochs over {trainer.train_samples} training "
              f"trajectories (last loss {last.get('loss', float('nan')):.4f}, skipped samples "
              f"{trainer.skipped_samples}{ota}){best}; student: {exported}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trajflow.evaluation import run_eval
    from trajflow.sample import local_student_dir

    try:
        local_student_dir(args.student, args.storage_options)
    except FileNotFoundError:
        pass  # not a diffusers student: a flow-net student (exact GMM metrics)
    else:
        from trajflow.evaluation_sd3 import run_eval_sd3

        if args.num_images < 2 or args.teacher_steps < 1 or any(n < 1 for n in args.steps or ()):
            raise UsageError("--num-images must be >= 2, --teacher-steps and --steps >= 1")
        return run_eval_sd3(args)

    return run_eval(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from trajflow.sample import run_sample

    return run_sample(args)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from models import tiny as tiny_models

    if os.path.exists(args.dir) and os.listdir(args.dir):
        raise UsageError(f"{args.dir} exists and is not empty")
    make, resolution, name = {"sd3": (tiny_models.make_tiny_sd3_pipeline, tiny_models.TINY_SD3_RESOLUTION, "SD3"),
                              "sd15": (tiny_models.make_tiny_sd15_pipeline, tiny_models.TINY_SD15_RESOLUTION,
                                       "SD1.5"),
                              "sdxl": (tiny_models.make_tiny_sdxl_pipeline, tiny_models.TINY_SDXL_RESOLUTION,
                                       "SDXL")}[args.tiny_kind]
    folder = make(args.dir, seed=args.seed)
    print(f"wrote a tiny {name} pipeline to {folder} (random weights; --resolution {resolution} "
          f"for its native 8x8 latents)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trajflow.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="trajflow", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Few-step distillation of flow-matching image models: generate authentic teacher ODE "
                    "trajectories into WebDataset shards on object storage, audit them, and distil few-step "
                    "students from them.")
    parser.add_argument("--version", action="version", version=f"trajflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole job on embedded defaults (local Ray, local files, built-in teacher)",
                       description="Generate corpora of the digits testbed (a flow-matching teacher fitted to "
                                   "scikit-learn's 8x8 digits: curved trajectories), latent10 and ring2d on an embedded "
                                   "local Ray cluster and audit them; on digits, train trajflow's 2-step and 4-step "
                                   "students and the 2-rectified-flow and PeRFlow-style baselines at an equal budget "
                                   "(one seed) and compare them with the teacher's own few steps; start the live "
                                   "teacher pool and distil ring2d students with its rollouts; write DIR/report.md "
                                   "(the digits table first), DIR/metrics.json and plots. About 5 minutes on 2 CPU "
                                   "cores; re-running reuses what is done.")
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--num-trajectories", type=int, default=2048, help="corpus size (default 2048)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="solve the teacher's ODE from seeded noise into a sharded corpus",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate authentic teacher trajectories on a Ray cluster and commit them as "
                                   "WebDataset shards with a Parquet manifest. Re-running the same command resumes.",
                       epilog="example:\n  trajflow generate --teacher gmm:latent10 --num-trajectories 4096 "
                              "--shard-size 256 --out s3://bucket/latent10 --guidance 1.5:4.5")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    from trajflow.cli_audit import add_audit_parser

    add_audit_parser(sub)

    p = sub.add_parser("train", help="distil a few-step student from a corpus (progressive reflow, aligned-v)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Stream a finalized corpus and distil a few-step student with progressive reflow "
                                   "windows and aligned v-prediction. Multi-process: `accelerate launch "
                                   "--num_processes N -m trajflow train ...`. Re-running resumes from the latest "
                                   "checkpoint under --out.",
                       epilog="example:\n  trajflow train --data s3://bucket/latent10 --out s3://bucket/runs/r1 "
                              "--stages 8,4 --alpha 1.0 --max-steps 1500")
    p.add_argument("--data", required=True, help="corpus URL (finalized: dataset.json + manifest.parquet)")
    p.add_argument("--out", required=True, help="run URL: checkpoints/, student/, logs/")
    p.add_argument("--stages", type=int_list, help="progressive window stages, finest first (default 8,4,2)")
    p.add_argument("--steps-per-stage", type=int_list, help="optimizer steps of each stage (default: split --max-steps)")
    p.add_argument("--max-steps", type=int, help="total steps (default: a budget for the corpus's teacher kind)")
    p.add_argument("--alpha", type=float, help="aligned-v direction weight; 0 = plain MSE (default 1.0)")
    p.add_argument("--objective", choices=["windows", "unrolled"],
                   help="what the corpus part trains: windows (aligned v-prediction per window) or unrolled (the "
                        "student's own few-step solve from the stored noise against the stored endpoint, gradient "
                        "through every step); default: unrolled for GMM corpora (the solver student), else windows")
    p.add_argument("--window-points", choices=["start", "segment", "mixed"],
                   help="training points at window starts, on whole segments, or half each (default start)")
    p.add_argument("--batch-size", type=int, help="samples per rank per step (default: 128 for flow-net students, 4 for "
                   "diffusers students)")
    p.add_argument("--gradient-accumulation-steps", type=int, metavar="K",
                   help="micro-batches of --batch-size per optimizer step: global batch = batch x K x processes, "
                        "memory of one micro-batch (default 1)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema-decay", type=float, help="EMA decay of the exported weights (0 = off; default 0.995)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--init", choices=["teacher", "fitted", "scratch"],
                   help="teacher (default): start as the teacher (its weights; for a GMM teacher, its exact "
                        "velocity plus a residual net that starts at zero); fitted: GMM teachers only, a plain "
                        "flow net fitted to the GMM (cached); scratch: random weights")
    p.add_argument("--teacher-fit-steps", type=int, help="fit budget of a GMM teacher's flow net (--init fitted; cached)")
    p.add_argument("--student-arch", choices=["auto", "mlp", "conv"])
    p.add_argument("--student-width", type=int)
    p.add_argument("--student-depth", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="autocast of the student's forward (default: bf16 for diffusers students on a GPU with bf16, "
                   "else no)")
    p.add_argument("--parallelism", choices=["ddp", "fsdp2"],
                   help="ddp (default): every process holds the whole student; fsdp2: parameters, gradients and "
                        "optimizer state sharded over the processes (torch fully_shard; diffusers students and "
                        "their discriminator), sharded checkpoints that resume at any process count")
    p.add_argument("--fsdp-mixed-precision", metavar="POLICY",
                   help="fsdp2 mixed precision: fp32 (default), bf16 (bf16 parameters in forward/backward, fp32 "
                        "gradient reduction; fp32 master weights and optimizer state), or param=DTYPE,reduce=DTYPE "
                        "(fp32|bf16|fp16)")
    p.add_argument("--on-corrupt", choices=["error", "skip"], help="corrupt shard: stop (default) or skip and count")
    p.add_argument("--report-to", metavar="TRACKERS",
                   help="experiment trackers for the logged scalars: tensorboard (default), wandb, mlflow, all, none, "
                        "or a comma-separated list; wandb/mlflow take their usual environment (WANDB_MODE=offline, "
                        "MLFLOW_TRACKING_URI, ...); logs/metrics.jsonl is always written")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="evaluate the EMA student on the corpus's validation split every N steps: coupling error, "
                        "SWD and per-window error at the stage's step count, logged as val_* (default: ~10 times "
                        "per run; 0: never)")
    p.add_argument("--export", choices=["best", "last"],
                   help="weights of the exported student: best (lowest validation coupling error at the final "
                        "stage's step count; default) or last")
    p.add_argument("--stream-order", choices=["partitioned", "global"],
                   help="sample order: partitioned (each node reads about its share of the shards; default for a new "
                        "run) or global (every rank touches every shard); a resumed run keeps its checkpoint's")
    p.add_argument("--stream-partitions", type=int, metavar="P",
                   help="canonical partitions of the partitioned order (default: the world size of a new run, the "
                        "checkpoint's on resume); keep it to keep the exact order at another world size")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per rank (default 1)")
    p.add_argument("--shuffle-buffer", type=int)
    p.add_argument("--cache-dir", help="local shard cache (default ~/.cache/trajflow/shards)")
    p.add_argument("--storage-options", type=json_object_arg)
    p.add_argument("--allow-teacher-location", action="append", dest="allow_teacher_locations", metavar="PREFIX",
                   help=ALLOW_TEACHER_HELP)
    p.add_argument("--consumed-log", help="local dir for per-rank consumed-sample logs (JSONL)")
    g = p.add_argument_group("online trajectory alignment (a live teacher pool: `trajflow pool --help`)")
    g.add_argument("--ota-ratio", type=float, help="share of each batch from online teacher rollouts (default 0)")
    g.add_argument("--ota-mode", choices=["fresh", "student", "perflow"],
                   help="fresh: teacher from new noise; student: the student's own few-step rollout reaches the "
                        "window start and the teacher solves the window; perflow: baseline (default fresh)")
    g.add_argument("--address", help="Ray cluster whose pool serves rollouts (auto: the cluster this node belongs "
                   "to); default: start a pool on an embedded local Ray for this run")
    g.add_argument("--pool-name", help="pool name (default trajflow-pool)")
    g.add_argument("--pool-replicas", type=int, default=1, help="replicas of the embedded pool (default 1)")
    g.add_argument("--ota-prefetch", type=int, help="rollout requests in flight per process (default 2)")
    g.add_argument("--ota-timeout", type=float, help="seconds before a rollout counts as lost (default 60)")
    g = p.add_argument_group("adversarial distillation on trajectory states")
    g.add_argument("--adv-weight", type=float, help="weight of the generator's -D term (default 0 = off)")
    g.add_argument("--fm-weight", type=float, help="discriminator feature-matching weight (default 1)")
    g.add_argument("--adv-step-probs", type=float_list,
                   help="probabilities of judging student step 1..N (default 0.2,0.2,0.2,0.4 for 4 steps)")
    g.add_argument("--disc-lr", type=float, help="discriminator learning rate (default 1e-4)")
    g.add_argument("--disc-blocks", type=int, help="discriminator trunk blocks (default 2)")
    g = p.add_argument_group("diffusers students (SD3 transformer, SD1.5/SDXL UNet): the teacher's network, conditioned "
                             "on the records' prompts")
    g.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (peft) instead of every weight "
                   "(default: full fine-tune)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: on when training on a GPU)")
    g.add_argument("--prompt-cache-size", type=int, help="prompt embeddings kept between steps (default 1024)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints under --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="few-step images from an exported SD3 or UNet student in a stock diffusers pipeline",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load the stock pipeline of the student's kind (StableDiffusion3Pipeline, "
                                   "StableDiffusionPipeline or StableDiffusionXLPipeline) from its base pipeline with the "
                                   "student (transformer/UNet or LoRA) and flowcore's corrected few-step scheduler, and "
                                   "write PNGs.",
                       epilog="example:\n  trajflow sample --student s3://bucket/runs/r1 --prompt 'a red cat' "
                              "--steps 4 --out ./samples")
    p.add_argument("--student", required=True, help="a run's --out, or its student/ folder (local or remote URL)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, help="sampling steps (default: the step count the student was distilled for, "
                   "its last stage)")
    p.add_argument("--out", required=True, help="local directory for the PNGs")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the corpus's)")
    p.add_argument("--base", help="base pipeline folder (default: the one recorded at export)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="pipeline dtype (default: as saved)")
    p.add_argument("--storage-options", type=json_object_arg)
    p.set_defaults(func=cmd_sample)

    tiny_pipelines = {
        "sd3": ("a tiny random-weight SD3 pipeline folder (tests, docs, dry runs)",
                "a complete StableDiffusion3Pipeline folder with tiny random weights and locally built tokenizers "
                "(16 px images, 8x8x4 latents): the whole SD3 path runs on a CPU in seconds"),
        "sd15": ("a tiny random-weight SD1.5 UNet pipeline folder (tests, docs)",
                 "a complete StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
                 "with tiny random weights and a locally built tokenizer (16 px images, 8x8x4 latents)"),
        "sdxl": ("a tiny random-weight SDXL UNet pipeline folder (tests, docs)",
                 "a complete StableDiffusionXLPipeline folder (unet/, vae/, text_encoder/, text_encoder_2/, "
                 "tokenizer/, tokenizer_2/, scheduler/) with tiny random weights and locally built tokenizers "
                 "(16 px images, 8x8x4 latents)"),
    }
    for kind, (what, folder) in tiny_pipelines.items():
        p = sub.add_parser(f"make-tiny-{kind}", help=f"write {what}", description=f"Write {folder}. No downloads.")
        p.add_argument("dir", help="output folder")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_make_tiny, tiny_kind=kind)

    p = sub.add_parser("eval", help="evaluate a student against its teacher at 1/2/4 steps",
                       description="Few-step sampling on the corrected schedule, with exact metrics for GMM teachers: "
                                   "coupling error, sliced Wasserstein distance, NLL, class accuracy, per-window "
                                   "one-jump error, next to the teacher's own 4- and 32-step figures.")
    p.add_argument("--student", required=True, help="student URL: a run's --out, its student/ dir, or the .safetensors")
    p.add_argument("--steps", type=int_list, help="student step counts, e.g. 1,2,4 (default: the step count the student "
                   "was distilled for, its last stage); the teacher is reported at the same counts")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--grid", metavar="PNG", help="digits testbed students: write a PNG grid of samples per sampler")
    p.add_argument("--storage-options", type=json_object_arg)
    p.add_argument("--allow-teacher-location", action="append", dest="allow_teacher_locations", metavar="PREFIX",
                   help=ALLOW_TEACHER_HELP.replace("corpus root", "student's folder"))
    g = p.add_argument_group("SD3 / UNet students (exported by training on a diffusers corpus): scores from LOCAL weights")
    g.add_argument("--clip", help="CLIPModel + CLIPProcessor folder: CLIP score and FD-CLIP to the teacher's images")
    g.add_argument("--pickscore", help="PickScore_v1 folder (a CLIPModel + processor): preference score")
    g.add_argument("--hpsv2", help="HPSv2 converted to a CLIPModel + CLIP-H processor folder: HPSv2 (100 * cos)")
    g.add_argument("--fid-inception", metavar="FILE",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors of it): FID of each "
                        "student to the teacher's images (same prompts and seeds)")
    g.add_argument("--fid-reference", metavar="DIR",
                   help="local folder of real images (PNG/JPEG): FID of the teacher and each student to them")
    g.add_argument("--prompts", help="prompt file (default: the corpus's)")
    g.add_argument("--num-images", type=int, default=64, help="images per sampler (default 64)")
    g.add_argument("--teacher-steps", type=int, default=28, help="teacher reference steps (default 28)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--base", help="base pipeline folder (default: the one recorded at export)")
    g.add_argument("--device", help="cuda, cpu, ... (default cpu)")
    p.set_defaults(func=cmd_eval)

    from trajflow.cli_pool import add_pool_parser

    add_pool_parser(sub)

    p = sub.add_parser("submit", help="submit `generate` to a Ray cluster through the Ray Jobs API",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Submit a generate job to a running Ray cluster (Ray Jobs API). Everything after "
                                   "`--` is passed to `trajflow generate` on the cluster.",
                       epilog="example:\n  trajflow submit --address http://127.0.0.1:8265 --wait -- "
                              "--teacher gmm:latent10 --num-trajectories 4096 --out s3://bucket/c")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--working-dir", help="ship this directory as the job's working_dir (default: none; the "
                   "cluster image has trajflow installed)")
    p.add_argument("--runtime-env", help="runtime_env YAML/JSON file (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--submission-id", help="job id (default: stable hash of the generate arguments)")
    p.add_argument("generate_args", nargs=argparse.REMAINDER, help="-- then the `trajflow generate` arguments")
    p.set_defaults(func=cmd_submit)
    return harden_parser(parser)  # every float flag finite, every integer flag bounded, no empty location


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"trajflow {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line (`-v` shows the traceback)
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"trajflow {args.command}: error: {one_line(e)}", file=sys.stderr)
        return FAILURE_EXIT.get(args.command, 1)


#: exit code of an unexpected failure by command (audit: 2 = the corpus could not be audited); else 1
FAILURE_EXIT = {"audit": 2}


if __name__ == "__main__":
    sys.exit(main())
