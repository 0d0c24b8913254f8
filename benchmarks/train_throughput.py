"""Training throughput: streaming from moto S3 vs the same training on tensors already in memory (a
heavy step and a light step), and the corpus loader vs plain ``webdataset.WebDataset`` over the same
local shards (same run).

    python benchmarks/train_throughput.py            # prints one JSON object
    python benchmarks/train_throughput.py --busy-core  # the same with one core kept busy by a spinner

Runs from a plain install (no test-suite imports): corpora are written by the generation worker and
committer (gmm:latent10), S3 is moto's server in this process.

- Heavy step: an MLP flow net sized so a training step costs >= 20 ms on this CPU, one epoch's steps.
- Light step: the 1024-trajectory corpus, width-256 MLP, batch 128 (8 steps an epoch), over many
  epochs through the Trainer's own corpus loop (``Trainer._corpus_batches``: one loader, its workers
  kept across epochs).
- Loader vs plain WebDataset: ``--loader-trials`` alternating trials per side (median, spread, and
  the CPU seconds each side used, all threads), the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_corpus(out: str, n: int, shard_size: int) -> None:
    """A real corpus: the generation worker's shards and the committer's manifest (no Ray needed)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    generate_in_process(GenerateConfig(teacher="gmm:latent10", out=out, num_trajectories=n, shard_size=shard_size,
                                       num_steps=16, stages=(8, 4), guidance=2.0, progress=False))


def timed_steps(trainer, steps: int, batches=None) -> float:
    """Seconds for ``steps`` optimizer steps: from the Trainer's corpus loop (batches=None: one loader
    for every epoch, the cursor advanced after each step as ``Trainer.train`` does) or from memory."""
    it = trainer._corpus_batches() if batches is None else iter(batches)
    try:
        batch = next(it)  # first batch outside the timing (cold start: workers, fetch + parse)
        trainer.train_step(batch)
        if batches is None:
            trainer.stream.advance()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(it))
            if batches is None:
                trainer.stream.advance()
            trainer.step += 1
        return time.perf_counter() - t0
    finally:
        if batches is None:
            it.close()  # stops the loader's workers


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 1), "max": round(max(values), 1),
            "rel_spread": round((max(values) - min(values)) / statistics.median(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-trajectories", type=int, default=8192)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed heavy steps (< one epoch)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the streaming side")
    ap.add_argument("--light-trajectories", type=int, default=1024)
    ap.add_argument("--light-shard-size", type=int, default=128)
    ap.add_argument("--light-batch-size", type=int, default=128)
    ap.add_argument("--light-width", type=int, default=256)
    ap.add_argument("--light-steps", type=int, default=200, help="timed light steps (25 epochs of 8 steps)")
    ap.add_argument("--loader-trials", type=int, default=5,
                    help="alternating trials per side of the loader comparison (medians are compared)")
    ap.add_argument("--skip-training", action="store_true", help="only the loader vs WebDataset comparison")
    ap.add_argument("--busy-core", action="store_true",
                    help="keep one core busy with a spinning subprocess (python busy loop) for the whole run")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    spinner = None
    if args.busy_core:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    load_before = os.getloadavg()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket="bench")
    tmp = Path(tempfile.mkdtemp(prefix="tf-trainbench-"))
    s3_url, local_url, light_url = "s3://bench/latent10", str(tmp / "latent10"), "s3://bench/light"
    make_corpus(local_url, args.num_trajectories, args.shard_size)
    result: dict = {"benchmark": "train_throughput"}

    if not args.skip_training:
        make_corpus(s3_url, args.num_trajectories, args.shard_size)
        make_corpus(light_url, args.light_trajectories, args.light_shard_size)
        from trainer.config import TrainConfig
        from trainer.data import make_dataloader
        from trainer.loop import Trainer

        def build(data, cache, *, batch, width, depth, workers):
            cfg = TrainConfig(data=data, out=str(tmp / f"out-{cache}"), stages=(8, 4), max_steps=10**6, init="scratch",
                              batch_size=batch, student_width=width, student_depth=depth, cache_dir=str(tmp / cache),
                              progress=False, resume=False, shuffle_buffer=4096, num_workers=workers)
            return Trainer(cfg).build()

        def compare(data, name, *, batch, width, depth, steps):
            streaming = build(data, f"cache-{name}-s3", batch=batch, width=width, depth=depth, workers=args.num_workers)
            s3_seconds = timed_steps(streaming, steps)
            epochs = streaming.stream.epoch
            memory = build(data, f"cache-{name}-mem", batch=batch, width=width, depth=depth, workers=0)
            epoch_batches = list(make_dataloader(memory.stream))  # the same batches, materialised first (not timed)
            batches = [epoch_batches[i % len(epoch_batches)] for i in range(steps + 1)]
            mem_seconds = timed_steps(memory, steps, batches)
            return {"student": f"mlp width {width} depth {depth}", "batch_size": batch, "steps": steps,
                    "epochs_crossed": epochs, "step_ms_in_memory": round(1000 * mem_seconds / steps, 2),
                    "steps_per_s_streaming_s3": round(steps / s3_seconds, 2),
                    "steps_per_s_in_memory": round(steps / mem_seconds, 2),
                    "ratio_streaming_over_memory": round(mem_seconds / s3_seconds, 3)}

        result["heavy"] = compare(s3_url, "heavy", batch=args.batch_size, width=args.width, depth=args.depth,
                                  steps=args.steps)
        result["light"] = compare(light_url, "light", batch=args.light_batch_size, width=args.light_width, depth=3,
                                  steps=args.light_steps)
        result["dataloader_workers"] = args.num_workers

    # Loader samples/s: CorpusStream vs plain webdataset over the same local shards, both in this one
    # process (no DataLoader workers on either side), alternately. The loader side starts from an
    # empty shard cache every trial, so it also copies every shard into the cache and verifies its
    # sha256, checks the tar structure and validates every sample against the card; the webdataset
    # side reads the tars and decodes safetensors + JSON, nothing else.
    import webdataset as wds
    from safetensors.torch import load as st_load

    from trainer.data import CorpusStream, StreamConfig

    urls = sorted(str(p) for p in (Path(local_url) / "shards").glob("*.tar"))

    def loader_trial(trial: int) -> tuple[int, float, float]:
        stream = CorpusStream(StreamConfig(url=local_url, batch_size=args.batch_size,
                                           cache_dir=str(tmp / f"cache-loader-{trial}")))
        n = 0
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in stream:
            n += 1
        seconds = time.perf_counter() - t0
        stream.close()
        return n, n / seconds, cpu_seconds() - c0

    def webdataset_trial() -> tuple[int, float, float]:
        m = 0
        c0, t0 = cpu_seconds(), time.perf_counter()
        for s in wds.WebDataset(urls, shardshuffle=False):
            st_load(s["traj.safetensors"])["states"]
            json.loads(s["json"])
            m += 1
        return m, m / (time.perf_counter() - t0), cpu_seconds() - c0

    ours_runs, plain_runs, ours_cpu, plain_cpu = [], [], [], []
    n = m = 0
    for trial in range(args.loader_trials):  # alternating: loader, webdataset, loader, ...
        n, rate, cpu = loader_trial(trial)
        ours_runs.append(rate)
        ours_cpu.append(cpu)
        m, rate, cpu = webdataset_trial()
        plain_runs.append(rate)
        plain_cpu.append(cpu)
    ours, plain = statistics.median(ours_runs), statistics.median(plain_runs)
    server.stop()
    load_after = os.getloadavg()
    if spinner is not None:
        spinner.kill()
        spinner.wait()
    result.update({
        "loader_samples_per_s_median": round(ours, 1), "plain_webdataset_samples_per_s_median": round(plain, 1),
        "ratio_loader_over_webdataset": round(ours / plain, 3),
        "loader_spread": spread(ours_runs), "webdataset_spread": spread(plain_runs),
        "loader_trials_samples_per_s": [round(r, 1) for r in ours_runs],
        "webdataset_trials_samples_per_s": [round(r, 1) for r in plain_runs],
        "loader_cpu_s_per_trial_median": round(statistics.median(ours_cpu), 3),
        "webdataset_cpu_s_per_trial_median": round(statistics.median(plain_cpu), 3),
        "loader_samples": n, "webdataset_samples": m,
        "loader_processes": "1 each side (main process, no DataLoader workers); CPU seconds count all threads",
        "busy_core": "one `python -c 'while True: pass'` subprocess" if args.busy_core else "none",
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
