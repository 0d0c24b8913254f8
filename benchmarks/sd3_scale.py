"""SD3-Medium-sized generation and training: trajectories/s and peak memory per batch size, the
pipeline vs a bare loop of the same solves, and trainer step time with LoRA and a full fine-tune.

No weights are downloaded. The transformer has SD3-Medium's architecture (24 joint blocks, width
1536, 2 x 2 patches, 16 latent channels; about 2 B parameters) with random weights. The text
encoders are the tiny local ones of ``trajflow make-tiny-sd3``: their widths set the transformer's
context / pooled input widths (``joint_attention_dim``, ``pooled_projection_dim``), the only layers
that differ from SD3-Medium's (a few million of its 2 B parameters; the token count, 77 + 256, is
SD3's). The VAE config has SD3's four blocks (scale 8), so ``--resolution 1024`` gives SD3's
128 x 128 x 16 latents. Speed figures therefore cover the transformer, not the text encoders (which
run once per prompt per shard).

One run does, in order, on one folder:

1. bare solves (``solve_teacher``, prompts encoded per batch) for each ``--batch-sizes``:
   trajectories/s and peak GPU memory at ``--dtype`` (bf16 by default on GPUs);
2. the generation pipeline (Ray, 1 worker, shards, uploads, read-back) vs the worker's own
   ``solve_states`` loop (``benchmarks/generate_throughput.py``'s bare loop), same config: the ratio;
3. the trainer on that corpus: seconds per optimizer step and peak memory with ``--lora-rank`` and
   with a full fine-tune (bf16 autocast, gradient checkpointing on GPUs), and their ratio.

Prints one JSON object. Commands:

    python benchmarks/sd3_scale.py --device cuda                         # SD3-Medium size, 1024 px
    python benchmarks/sd3_scale.py --size tiny --resolution 16 --num-steps 8 --stages 4 \\
        --batch-sizes 1,4 --num-trajectories 16 --train-batch-size 2 --train-steps 3   # CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

#: SD3-Medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}

PROMPTS = ["a red cat on a sofa", "a lighthouse at dusk, oil painting", "two green parrots", "a city street in rain",
           "a bowl of ramen, studio photo", "a snowy mountain village", "an astronaut riding a horse",
           "a watercolor fox in a forest"]


def build_folder(folder: Path, size: str, device: str, seed: int = 0) -> dict:
    """A StableDiffusion3Pipeline folder: tiny text encoders (and, for ``size="tiny"``, everything
    tiny); for ``size="medium"`` an SD3-Medium-sized random transformer and a 4-block VAE config."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from models.tiny import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(str(folder), seed=seed)
    with open(folder / "transformer" / "config.json") as f:
        tiny = json.load(f)
    if size == "tiny":
        return {k: v for k, v in tiny.items() if not k.startswith("_")}
    cfg = {**SD3_MEDIUM_TRANSFORMER, "joint_attention_dim": tiny["joint_attention_dim"],
           "pooled_projection_dim": tiny["pooled_projection_dim"]}
    with torch.random.fork_rng(devices=[]), torch.device(device):  # random init on the GPU is seconds, not minutes
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**cfg)
    shutil.rmtree(folder / "transformer")
    model.to(torch.bfloat16).save_pretrained(folder / "transformer")  # bf16 on disk: 4 GB, as released
    del model
    shutil.rmtree(folder / "vae")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8).save_pretrained(folder / "vae")
    return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bare_solves(cfg, device: str, batch_sizes: list[int]) -> list[dict]:
    """Trajectories/s and peak memory of ``solve_teacher`` (prompts encoded per batch) per batch size."""
    from flowcore.solvers import seeded_noise, solve_teacher
    from pipeline.worker import resolve_teacher

    teacher = resolve_teacher(cfg.teacher, None, device, cfg.teacher_dtype, cfg.resolution)
    rows = []
    for bs in batch_sizes:
        _reset_peak(device)
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(bs)]
        guidance = torch.full((bs,), float(cfg.guidance), device=device)
        try:
            for timed in (False, True):  # the first solve warms up kernels and the allocator
                _sync(device)
                t0 = time.perf_counter()
                cond = teacher.encode_prompts(texts)
                noise = seeded_noise(list(range(bs)), teacher.sample_shape, torch.float32, device)
                traj = solve_teacher(teacher, noise, cfg.grid if timed else cfg.grid[:: len(cfg.grid) - 1],
                                     cond=cond, guidance=guidance, method=cfg.solver, capture_sigmas=cfg.saved
                                     if timed else None)
                traj.states_BKX.to("cpu")
                _sync(device)
                seconds = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch_size": bs, "oom": True})
            break
        rows.append({"batch_size": bs, "trajectories_per_s": round(bs / seconds, 3),
                     "seconds_per_batch": round(seconds, 3), "peak_memory_gib": _peak_gib(device)})
    del teacher
    _reset_peak(device)
    return rows


def pipeline_vs_bare(cfg, device: str, threads: int) -> dict:
    """The generation pipeline vs the worker's own solve loop (generate_throughput's bare loop)."""
    import ray

    from pipeline.driver import run_generation

    spec = importlib.util.spec_from_file_location("generate_throughput", Path(__file__).with_name(
        "generate_throughput.py"))
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    bare_s, _ = gt.bare_loop(cfg, threads, device)
    _reset_peak(device)
    ray.init(address="local", num_cpus=max(2, threads + 1), include_dashboard=False, log_to_driver=False)
    try:
        summary = run_generation(cfg)
    finally:
        ray.shutdown()
    bare_tps = cfg.num_trajectories / bare_s
    return {"bare_loop_traj_per_s": round(bare_tps, 3),
            "pipeline_traj_per_s": round(summary.steady_trajectories_per_second, 3),
            "ratio_pipeline_over_bare": round(summary.steady_trajectories_per_second / bare_tps, 3),
            "pipeline_startup_seconds": round(summary.startup_seconds, 2)}


def trainer_steps(corpus: str, out: str, device: str, *, lora_rank: int | None, batch_size: int, steps: int,
                  stages: tuple[int, ...]) -> dict:
    """Seconds per optimizer step (after one untimed step) and peak memory of the real Trainer."""
    from trainer.config import TrainConfig
    from trainer.data import make_dataloader, open_corpus
    from trainer.loop import Trainer

    _reset_peak(device)
    cuda = device.startswith("cuda")
    # the pipeline folder this script built: the card names it outside the corpus root, so it is allowed
    # explicitly (as a user passes --allow-teacher-location)
    teacher_folder = open_corpus(corpus).card.teacher.config["source"]["path"]
    cfg = TrainConfig(data=corpus, out=out, stages=stages, batch_size=batch_size, max_steps=steps + 1,
                      lora_rank=lora_rank, mixed_precision="bf16" if cuda else "no", progress=False, resume=False,
                      checkpoint_every=10**9, log_every=10**9, num_workers=0, shuffle_buffer=batch_size,
                      allow_teacher_locations=(teacher_folder,), eval_every=0)
    trainer = Trainer(cfg).build()
    try:
        def batches(stream):
            while True:
                yield from make_dataloader(stream, num_workers=0)
                stream.set_epoch(stream.epoch + 1)

        it = batches(trainer.stream)
        trainer.train_step(next(it))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(it))
            trainer.step += 1
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    except torch.cuda.OutOfMemoryError:
        return {"lora_rank": lora_rank, "oom": True}
    finally:
        trainer.close()
    row = {"lora_rank": lora_rank, "batch_size": batch_size, "seconds_per_step": round(seconds, 3),
           "peak_memory_gib": _peak_gib(device), "trainable_parameters": trainable, "parameters": total}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["medium", "tiny"], default="medium", help="transformer size (default medium)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="teacher dtype (default bfloat16 on GPUs, float32 on CPU)")
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent side = px / 8)")
    ap.add_argument("--num-steps", type=int, default=28, help="teacher solver steps")
    ap.add_argument("--stages", default="4", help="window stages, finest first")
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--batch-sizes", default="1,2,4,8", help="bare-solve batch sizes")
    ap.add_argument("--num-trajectories", type=int, default=64, help="pipeline-vs-bare corpus size")
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--gen-batch-size", type=int, default=4, help="batch size of the pipeline-vs-bare runs")
    ap.add_argument("--train-batch-size", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=10, help="timed optimizer steps per student kind")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=4, help="CPU threads of the worker / bare loop")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: bare,pipeline,train")
    ap.add_argument("--workdir", help="folder for the model, corpus and runs (default: a temp dir, removed)")
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    from pipeline.config import GenerateConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tf-sd3-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, corpus = work / "sd3", str(work / "corpus")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    t0 = time.perf_counter()
    if not (folder / "model_index.json").exists():
        transformer_cfg = build_folder(folder, args.size, args.device)
    else:
        transformer_cfg = {k: v for k, v in json.loads((folder / "transformer" / "config.json").read_text()).items()
                           if not k.startswith("_")}
    build_s = time.perf_counter() - t0
    stages = tuple(int(s) for s in args.stages.split(","))
    cfg = GenerateConfig(teacher=f"diffusers:{folder}", out=corpus, num_trajectories=args.num_trajectories,
                         shard_size=args.shard_size, num_steps=args.num_steps, stages=stages, guidance=args.guidance,
                         prompts=str(prompts), resolution=args.resolution, teacher_dtype=dtype,
                         batch_size=args.gen_batch_size, cpus_per_worker=args.threads,
                         gpus_per_worker=1 if args.device.startswith("cuda") else 0, progress=False)
    result: dict = {"benchmark": "sd3_scale", "size": args.size, "device": args.device, "dtype": dtype,
                    "resolution": args.resolution, "latent_shape": None, "num_steps": args.num_steps,
                    "shift": cfg.shift, "guidance": args.guidance, "transformer": transformer_cfg,
                    "folder_build_seconds": round(build_s, 1)}
    if "bare" not in skip:
        result["bare_solves"] = bare_solves(cfg, args.device, [int(b) for b in args.batch_sizes.split(",")])
    if "pipeline" not in skip or "train" not in skip:
        shutil.rmtree(corpus, ignore_errors=True)
        result["pipeline_vs_bare"] = pipeline_vs_bare(cfg, args.device, args.threads)
    if os.path.exists(os.path.join(corpus, "dataset.json")):
        with open(os.path.join(corpus, "dataset.json")) as f:
            result["latent_shape"] = json.load(f)["sample_shape"]
    if "train" not in skip:
        rows = [trainer_steps(corpus, str(work / f"run-{kind}"), args.device, lora_rank=rank,
                              batch_size=args.train_batch_size, steps=args.train_steps, stages=stages)
                for kind, rank in (("lora", args.lora_rank), ("full", None))]
        result["trainer"] = rows
        if all("seconds_per_step" in r for r in rows):
            result["trainer"].append({"ratio_lora_over_full_step_time":
                                      round(rows[0]["seconds_per_step"] / rows[1]["seconds_per_step"], 3)})
    result["gpu"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
