"""FSDP2 vs DDP: per-rank bytes of parameters, gradients and optimizer state of a tiny SD3 full fine-tune.

    python benchmarks/fsdp_memory.py            # prints one JSON object (about a minute on 2 CPU cores)

One run builds everything itself, from configs, with no downloads: a tiny random-weight SD3 pipeline folder
(``models.tiny.make_tiny_sd3_pipeline``, the builder behind ``trajflow make-tiny-sd3``) whose transformer is
widened and deepened (``--num-layers`` joint blocks of width ``--heads`` x ``--head-dim``) so that the
shardable parameters dominate the non-shardable buffers (the positional-embedding table), and a small prompt
corpus of it (``pipeline.driver.generate_in_process``, the generation worker and committer). Then, for each of
``--parallelism ddp`` and ``--parallelism fsdp2``, it starts ``--num-processes`` real gloo processes with
``accelerate launch`` (CUDA hidden: the CPU/gloo path the tests use) that build the real ``trainer.loop.Trainer``
on that corpus and train ``--steps`` optimizer steps. Each rank counts, from its own tensors:

- ``param_bytes``: the trainable parameters' local storage (FSDP2: each DTensor's local shard; DDP: the full
  tensors), ``buffer_bytes``: the student network's buffers (replicated by both);
- ``grad_bytes``: the gradients the optimizer steps with, counted in an optimizer step pre-hook of the last step
  (FSDP2: the reduce-scattered local shards; DDP: the full ``.grad`` tensors);
- ``optimizer_bytes``: AdamW's state after that step (``exp_avg``, ``exp_avg_sq``, ``step``; local shards for FSDP2);
- outside the ratio, for context: ``ema_bytes`` (the EMA of the trainable weights; FSDP2 keeps it over the local
  shards), ``frozen_text_encoder_bytes`` (the frozen text encoders, replicated on every rank by both) and the
  process's peak RSS (torch, diffusers, the loader: not a measure of the model state).

``total_bytes`` = params + buffers + grads + optimizer state; the JSON's ``ratio_fsdp2_over_ddp`` is the largest
rank's total under FSDP2 over the largest under DDP (target <= 0.6; 1/world + the buffers' share is the floor).
DDP's reducer also keeps gradient buckets (about one more gradient-sized copy) that are not counted here, so
DDP's real footprint is larger than its figure. Also reported: each side's loss per step (the two should agree
to float tolerance, as tests/test_fsdp.py checks over 20 steps) and that the ranks' shards add up to the full
parameter count.

``--adv-weight W`` adds the SD3 discriminator (``--disc-blocks`` trunk blocks, default all of them), counted
apart (``discriminator_ratio_fsdp2_over_ddp``). The default of every block dates from when DDP refused a trunk that
stops before the transformer's last block (its text-stream outputs fed nothing: "Expected to have finished
reduction in the prior iteration"); such a trunk's last block now computes only the image stream, so any
``--disc-blocks`` runs, and the default stays so the figures in docs/benchmarks.md are reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red cat", "a blue dog on grass", "sunset 42", "two green birds", "a lighthouse at dusk",
           "a bowl of ramen", "a snowy village", "a watercolor fox"]


# -- the worker (one rank of `accelerate launch`) ---------------------------------------------------------------
def _nbytes(t) -> int:
    from trainer.fsdp import local

    t = local(t)
    return t.numel() * t.element_size()


def worker(args) -> None:
    import torch

    from trainer.config import TrainConfig
    from trainer.fsdp import local
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(data=args.data, out=args.out, stages=(4,), batch_size=args.batch_size, max_steps=args.steps,
                      num_workers=0, progress=False, log_every=1, eval_every=0, checkpoint_every=10**9,
                      report_to="none", parallelism=args.parallelism, adv_weight=args.adv_weight,
                      disc_blocks=args.disc_blocks or args.num_layers, resume=False)
    trainer = Trainer(cfg).build()
    grads: dict[str, int] = {}

    def count_grads(name):
        def hook(opt, *_):
            grads[name] = sum(_nbytes(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None)
        return hook

    try:
        nets = {"student": (trainer.model, trainer.optimizer, trainer.trainable)}
        adv = trainer.part("adversarial")
        if adv is not None:
            nets["discriminator"] = (adv.disc, adv.disc_optimizer, [p for p in adv.disc.parameters() if p.requires_grad])
        for name, (_, opt, _) in nets.items():  # accelerate's AcceleratedOptimizer wraps the AdamW (DDP)
            getattr(opt, "optimizer", opt).register_step_pre_hook(count_grads(name))
        trainer.train()
        losses = []
        if trainer.accelerator.is_main_process:  # the loss of each step, as logged (rank 0's batch)
            trainer._metrics.flush()
            metrics = Path(args.out, "logs", "metrics.jsonl").read_text().splitlines()
            losses = [json.loads(line)["loss"] for line in metrics if '"eval"' not in line]
        row = {"rank": trainer.rank, "world": trainer.world, "losses": losses}
        for name, (model, opt, trainable) in nets.items():
            inner = getattr(opt, "optimizer", opt)
            opt_bytes = sum(_nbytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
            net = trainer.accelerator.unwrap_model(model) if trainer.fsdp is None else model
            part = {"param_bytes": sum(_nbytes(p) for p in trainable),
                    "param_numel_local": sum(int(local(p).numel()) for p in trainable),
                    "param_numel_full": sum(int(p.numel()) for p in trainable),
                    "buffer_bytes": sum(_nbytes(b) for b in net.buffers()),
                    "grad_bytes": grads.get(name, 0), "optimizer_bytes": opt_bytes,
                    "sharded_params": sum(1 for p in trainable if hasattr(p, "to_local")),
                    "num_params": len(trainable)}
            part["total_bytes"] = sum(part[k] for k in ("param_bytes", "buffer_bytes", "grad_bytes", "optimizer_bytes"))
            row[name] = part
        row["student"]["ema_bytes"] = 0 if trainer.ema is None else sum(_nbytes(v) for v in trainer.ema.state_dict().values())
        enc = trainer.student.prompts.encoder.encoders()
        row["frozen_text_encoder_bytes"] = sum(_nbytes(p) for m in enc.values() for p in m.parameters())
        row["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        Path(args.result, f"rank-{trainer.rank}.json").write_text(json.dumps(row))
    finally:
        trainer.close()


# -- the driver --------------------------------------------------------------------------------------------------
def build_corpus(root: Path, args) -> tuple[str, dict]:
    """A tiny SD3 pipeline with a widened/deepened transformer, and a finalized prompt corpus of it."""
    from models.tiny import make_tiny_sd3_pipeline
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process
    from storage_schemas.locations import ALLOW_ENV

    width = args.heads * args.head_dim
    overrides = {"num_layers": args.num_layers, "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
                 "caption_projection_dim": width}
    pipe = make_tiny_sd3_pipeline(root / "tiny-sd3", seed=0, transformer_overrides=overrides)
    # the card names the pipeline folder, which lies outside the corpus root: allow it (as --allow-teacher-location)
    os.environ[ALLOW_ENV] = os.pathsep.join([e for e in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if e] + [str(pipe)])
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    os.environ[ALLOW_ENV] += f"{os.pathsep}{prompts}"
    n = args.batch_size * args.num_processes * args.steps
    url = generate_in_process(GenerateConfig(
        teacher=f"diffusers:{pipe}", out=str(root / "corpus"), num_trajectories=n, shard_size=max(1, n // 2),
        batch_size=min(8, n), num_steps=8, stages=(4,), guidance=2.0, prompts=str(prompts), resolution=16,
        progress=False, validation_trajectories=0))
    return url, {**overrides, "width": width}


def launch(parallelism: str, url: str, root: Path, args) -> list[dict]:
    result = root / f"result-{parallelism}"
    result.mkdir()
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(args.num_processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).resolve()), "--worker",
           "--parallelism", parallelism, "--data", url, "--out", str(root / f"run-{parallelism}"),
           "--result", str(result), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--adv-weight", str(args.adv_weight), "--disc-blocks", str(args.disc_blocks), "--num-layers",
           str(args.num_layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, as in the tests
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{parallelism} run failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(result.glob("rank-*.json"))]


def summary(rows: list[dict], nets: list[str]) -> dict:
    out = {"per_rank": rows}
    for name in nets:
        out[f"{name}_max_total_bytes"] = max(r[name]["total_bytes"] for r in rows)
        out[f"{name}_param_numel_over_ranks"] = sum(r[name]["param_numel_local"] for r in rows)
    out["max_total_with_ema_bytes"] = max(r["student"]["total_bytes"] + r["student"]["ema_bytes"] for r in rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=4, help="joint transformer blocks of the student")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (the last one is measured)")
    p.add_argument("--adv-weight", type=float, default=0.0, help="> 0: also the SD3 discriminator, counted apart")
    p.add_argument("--disc-blocks", type=int, default=0,
                   help="the discriminator's trunk blocks (default: all --num-layers; see the module docstring)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per accelerate launch")
    p.add_argument("--keep", help="keep the pipeline, corpus and runs in this folder")
    # the worker's arguments (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallelism", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    t0 = time.perf_counter()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        url, model = build_corpus(root, args)
        t_corpus = time.perf_counter() - t0
        sides = {par: launch(par, url, root, args) for par in ("ddp", "fsdp2")}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    nets = ["student"] + (["discriminator"] if args.adv_weight > 0 else [])
    ddp, fsdp = summary(sides["ddp"], nets), summary(sides["fsdp2"], nets)
    ratio = fsdp["student_max_total_bytes"] / ddp["student_max_total_bytes"]
    d0, f0 = sides["ddp"][0], sides["fsdp2"][0]
    out = {
        "benchmark": "fsdp_memory",
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "backend": "gloo (CPU)"},
        "conditions": {"world_size": args.num_processes, "student": "SD3Transformer2DModel, full fine-tune, fp32",
                       "transformer": model, "optimizer": "AdamW", "batch_size_per_rank": args.batch_size,
                       "steps": args.steps, "adv_weight": args.adv_weight,
                       "disc_blocks": (args.disc_blocks or args.num_layers) if args.adv_weight > 0 else None, "launch": "accelerate launch --multi_gpu",
                       "fsdp_mixed_precision": "fp32"},
        "parameters": d0["student"]["param_numel_full"],
        "ddp": ddp,
        "fsdp2": fsdp,
        "ratio_fsdp2_over_ddp": round(ratio, 4),
        "ratio_with_ema": round(fsdp["max_total_with_ema_bytes"] / ddp["max_total_with_ema_bytes"], 4),
        "buffer_share_of_ddp_total": round(d0["student"]["buffer_bytes"] / d0["student"]["total_bytes"], 4),
        "target": 0.6,
        "target_met": ratio <= 0.6,
        "shards_cover_params": fsdp["student_param_numel_over_ranks"] == f0["student"]["param_numel_full"],
        "losses": {"ddp": d0["losses"], "fsdp2": f0["losses"]},
        "seconds": {"corpus": round(t_corpus, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    for name in nets[1:]:
        out[f"{name}_ratio_fsdp2_over_ddp"] = round(fsdp[f"{name}_max_total_bytes"] / ddp[f"{name}_max_total_bytes"], 4)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
