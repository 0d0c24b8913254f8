"""Training throughput: streaming from moto S3 vs the same training on tensors already in memory,
and the corpus loader vs plain ``webdataset.WebDataset`` over the same local shards (same run).

    python benchmarks/train_throughput.py            # prints one JSON object

Student: an MLP flow net sized so a training step costs >= 20 ms on this CPU (the regime the target
applies to). The S3 side uses a fresh shard cache, so the first shards really come over HTTP from
moto; prefetch runs ahead while the trainer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_corpus(url: str, n: int, shard_size: int) -> None:
    from test_trainer import make_corpus as build  # the tests' real corpus builder (worker + committer)

    build(url, n, shard_size)


def timed_steps(trainer, steps: int, batches=None) -> float:
    """Seconds for ``steps`` optimizer steps, from the stream (batches=None) or from memory."""
    from trainer.data import make_dataloader

    it = iter(make_dataloader(trainer.stream, num_workers=trainer.cfg.num_workers)) if batches is None else iter(batches)
    next_batch = next(it)  # first batch outside the timing (cold start: fetch + parse)
    trainer.train_step(next_batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(it))
        trainer.step += 1
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-trajectories", type=int, default=8192)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed steps (< one epoch)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the streaming side")
    ap.add_argument("--loader-trials", type=int, default=3,
                    help="alternating trials of the loader comparison (medians are compared)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

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
    s3_url, local_url = "s3://bench/latent10", str(tmp / "latent10")
    make_corpus(s3_url, args.num_trajectories, args.shard_size)
    make_corpus(local_url, args.num_trajectories, args.shard_size)

    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    def build(data, cache):
        cfg = TrainConfig(data=data, out=str(tmp / f"out-{cache}"), stages=(8, 4), max_steps=10**6, init="scratch",
                          batch_size=args.batch_size, student_width=args.width, student_depth=args.depth,
                          cache_dir=str(tmp / cache), progress=False, resume=False, shuffle_buffer=4096,
                          num_workers=args.num_workers if cache == "cache-s3" else 0)
        return Trainer(cfg).build()

    # (1) streaming from S3 vs in-memory tensors, same model, same steps
    streaming = build(s3_url, "cache-s3")
    s3_seconds = timed_steps(streaming, args.steps)
    memory = build(s3_url, "cache-mem")
    from trainer.data import make_dataloader

    batches = []
    for b in make_dataloader(memory.stream):  # materialise the same batches first (not timed)
        batches.append(b)
        if len(batches) >= args.steps + 1:
            break
    mem_seconds = timed_steps(memory, args.steps, batches)
    step_ms = 1000 * mem_seconds / args.steps

    # (2) loader samples/s: CorpusStream vs plain webdataset over the same local shards. Both sides
    # run in this one process (no DataLoader workers on either side), alternately, --loader-trials
    # times each; the ratio is taken between the medians. The loader side starts from an empty
    # shard cache every trial, so it also copies every shard into the cache and verifies its
    # sha256 (on its prefetch thread), parses the tar with the safe reader and validates every
    # sample against the card; the webdataset side reads the tars and decodes safetensors + JSON.
    import statistics

    import webdataset as wds
    from safetensors.torch import load as st_load

    from trainer.data import CorpusStream, StreamConfig

    urls = sorted(str(p) for p in (Path(local_url) / "shards").glob("*.tar"))

    def loader_trial(trial: int) -> tuple[int, float]:
        stream = CorpusStream(StreamConfig(url=local_url, batch_size=args.batch_size,
                                           cache_dir=str(tmp / f"cache-loader-{trial}")))
        n = 0
        t0 = time.perf_counter()
        for _ in stream:
            n += 1
        seconds = time.perf_counter() - t0
        stream.close()
        return n, n / seconds

    def webdataset_trial() -> tuple[int, float]:
        m = 0
        t0 = time.perf_counter()
        for s in wds.WebDataset(urls, shardshuffle=False):
            st_load(s["traj.safetensors"])["states"]
            json.loads(s["json"])
            m += 1
        return m, m / (time.perf_counter() - t0)

    ours_runs, plain_runs = [], []
    for trial in range(args.loader_trials):
        n, rate = loader_trial(trial)
        ours_runs.append(rate)
        m, rate = webdataset_trial()
        plain_runs.append(rate)
    ours, plain = statistics.median(ours_runs), statistics.median(plain_runs)
    server.stop()
    print(json.dumps({
        "benchmark": "train_throughput", "student": f"mlp width {args.width} depth {args.depth}",
        "batch_size": args.batch_size, "steps": args.steps, "dataloader_workers": args.num_workers, "step_ms_in_memory": round(step_ms, 1),
        "steps_per_s_streaming_s3": round(args.steps / s3_seconds, 3),
        "steps_per_s_in_memory": round(args.steps / mem_seconds, 3),
        "ratio_streaming_over_memory": round(mem_seconds / s3_seconds, 3),
        "loader_samples_per_s": round(ours, 1), "plain_webdataset_samples_per_s": round(plain, 1),
        "ratio_loader_over_webdataset": round(ours / plain, 3), "loader_samples": n, "webdataset_samples": m,
        "loader_trials_samples_per_s": [round(r, 1) for r in ours_runs],
        "webdataset_trials_samples_per_s": [round(r, 1) for r in plain_runs],
        "loader_processes": "1 each side (main process, no DataLoader workers); the loader's prefetch thread "
                            "copies and sha256-verifies shards into a fresh cache",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }))


if __name__ == "__main__":
    main()
