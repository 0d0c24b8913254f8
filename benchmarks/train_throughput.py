"""Training throughput: streaming from S3 vs the same training on tensors already in memory (a heavy
step and a light step), and the corpus loader vs plain ``webdataset.WebDataset`` over the same local
shards (same run). Prints ONE JSON object; every ratio is computed from trials of this run.

    python benchmarks/train_throughput.py               # quiet machine
    python benchmarks/train_throughput.py --busy-core   # one core kept busy by a spinning subprocess

Runs from a plain install (no test-suite imports): corpora are written by the generation worker and
committer (gmm:latent10); S3 is moto's server, run as a separate process (``python -m moto.server``)
so that serving objects does not take the trainer's own interpreter lock, as a real S3 endpoint does
not.

- Heavy step: an MLP flow net sized so a training step costs >= 20 ms on this CPU, one epoch's steps.
- Light step (issue 15): the 1024-trajectory corpus, width-256 MLP, batch 128 (8 steps an epoch), over
  many epochs through the Trainer's own corpus loop (``Trainer._corpus_batches``: one loader, its
  workers kept across epochs).
  Both: ``--train-trials`` alternating trials per side (streaming, in memory, streaming, ...); the
  ratio is of the medians; CPU seconds per step of each side (main process, all threads; the
  streaming side's DataLoader worker separately).
- Loader vs plain WebDataset: ``--loader-trials`` alternating trials per side, one process each side
  (no DataLoader workers): the loader batched (as the trainer reads it) and per sample (dicts like
  WebDataset's), each from an empty shard cache (so it also copies every shard into the cache and
  verifies its sha256, checks the tar structure and validates every sample), against WebDataset
  reading the tars and decoding safetensors + JSON (no checks). Medians, spread, CPU seconds per
  trial and per sample (``time.process_time``: this process, all threads), load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def make_corpus(out: str, n: int, shard_size: int) -> None:
    """A real corpus: the generation worker's shards and the committer's manifest (no Ray needed)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    generate_in_process(GenerateConfig(teacher="gmm:latent10", out=out, num_trajectories=n, shard_size=shard_size,
                                       num_steps=16, stages=(8, 4), guidance=2.0, progress=False))


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (a DataLoader worker, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_steps(trainer, steps: int, batches=None) -> dict[str, float]:
    """Wall and CPU seconds of ``steps`` optimizer steps: from the Trainer's corpus loop (batches=None:
    one loader for every epoch, the cursor advanced after each step as ``Trainer.train`` does) or from
    memory. CPU: this process (all threads) during the steps; ``worker_cpu_s``: the loader's worker
    processes over their whole life (start-up included)."""
    workers0 = children_cpu()
    it = trainer._corpus_batches() if batches is None else iter(batches)
    try:
        batch = next(it)  # first batch outside the timing (cold start: workers, fetch + parse)
        trainer.train_step(batch)
        if batches is None:
            trainer.stream.advance()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            trainer.train_step(next(it))
            if batches is None:
                trainer.stream.advance()
            trainer.step += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if batches is None:
            it.close()  # stops (and joins) the loader's workers
    return {"wall_s": wall, "cpu_s": cpu, "worker_cpu_s": children_cpu() - workers0}


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 1), "max": round(max(values), 1),
            "rel_spread": round((max(values) - min(values)) / statistics.median(values), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


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
    ap.add_argument("--train-trials", type=int, default=5,
                    help="alternating trials per side of each training comparison (medians are compared)")
    ap.add_argument("--loader-trials", type=int, default=5,
                    help="alternating trials per side of the loader comparison (medians are compared)")
    ap.add_argument("--cases", default="heavy,light,loader",
                    help="comma-separated subset of heavy, light, loader")
    ap.add_argument("--skip-training", action="store_true", help="only the loader vs WebDataset comparison")
    ap.add_argument("--busy-core", action="store_true",
                    help="keep one core busy for the whole run: a subprocess running `while True: pass`")
    args = ap.parse_args()
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.skip_training:
        cases &= {"loader"}
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    spinner = None
    if args.busy_core:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tf-trainbench-"))
    result: dict = {"benchmark": "train_throughput", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    moto = None
    try:
        local_url = str(tmp / "latent10")
        if "loader" in cases:
            make_corpus(local_url, args.num_trajectories, args.shard_size)
        if cases & {"heavy", "light"}:
            import boto3

            moto, endpoint = start_moto()
            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
            boto3.client("s3").create_bucket(Bucket="bench")
            result.update(training(args, cases, tmp))
            result["dataloader_workers"] = args.num_workers
        if "loader" in cases:
            result.update(loader_vs_webdataset(args, tmp, local_url))
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    result.update({
        "busy_core": "one `python -c 'while True: pass'` subprocess for the whole run" if args.busy_core else "none",
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch thread(s)",
    })
    print(json.dumps(result))


def training(args, cases: set[str], tmp: Path) -> dict:
    from trainer.config import TrainConfig
    from trainer.data import make_dataloader
    from trainer.loop import Trainer

    runs = 0

    def build(data, cache, *, batch, width, depth, workers):
        nonlocal runs
        runs += 1
        cfg = TrainConfig(data=data, out=str(tmp / f"out-{runs}"), stages=(8, 4), max_steps=10**6, init="scratch",
                          batch_size=batch, student_width=width, student_depth=depth, cache_dir=str(tmp / cache),
                          progress=False, resume=False, shuffle_buffer=4096, num_workers=workers)
        return Trainer(cfg).build()

    def compare(data, name, *, batch, width, depth, steps):
        streaming, memory = [], []
        epochs = 0
        batches = None
        for trial in range(args.train_trials):  # alternating: streaming, in memory, streaming, ...
            # each streaming trial from an empty cache: it fetches from S3 and verifies every shard it reads
            s = build(data, f"cache-{name}-s3-{trial}", batch=batch, width=width, depth=depth,
                      workers=args.num_workers)
            streaming.append(timed_steps(s, steps))
            epochs = s.stream.epoch
            m = build(data, f"cache-{name}-mem", batch=batch, width=width, depth=depth, workers=0)
            if batches is None:  # the same batches, materialised first (not timed)
                epoch_batches = list(make_dataloader(m.stream))
                batches = [epoch_batches[i % len(epoch_batches)] for i in range(steps + 1)]
            memory.append(timed_steps(m, steps, batches))
        s_rate = [steps / r["wall_s"] for r in streaming]
        m_rate = [steps / r["wall_s"] for r in memory]
        s_med, m_med = statistics.median(s_rate), statistics.median(m_rate)
        return {"student": f"mlp width {width} depth {depth}", "batch_size": batch, "steps": steps,
                "trials_per_side": args.train_trials, "epochs_crossed": epochs,
                "step_ms_in_memory": round(1000 / m_med, 2),
                "steps_per_s_streaming_s3": round(s_med, 2), "steps_per_s_in_memory": round(m_med, 2),
                "ratio_streaming_over_memory": round(s_med / m_med, 3),
                "streaming_trials_steps_per_s": [round(r, 2) for r in s_rate],
                "in_memory_trials_steps_per_s": [round(r, 2) for r in m_rate],
                "streaming_spread": spread(s_rate), "in_memory_spread": spread(m_rate),
                "cpu_ms_per_step_streaming_main": round(1000 * statistics.median(r["cpu_s"] for r in streaming) / steps, 2),
                "cpu_ms_per_step_in_memory": round(1000 * statistics.median(r["cpu_s"] for r in memory) / steps, 2),
                "streaming_worker_cpu_s_per_trial": round(statistics.median(r["worker_cpu_s"] for r in streaming), 3)}

    out = {}
    if "heavy" in cases:
        heavy_url = "s3://bench/latent10"
        make_corpus(heavy_url, args.num_trajectories, args.shard_size)
        out["heavy"] = compare(heavy_url, "heavy", batch=args.batch_size, width=args.width, depth=args.depth,
                               steps=args.steps)
    if "light" in cases:
        light_url = "s3://bench/light"
        make_corpus(light_url, args.light_trajectories, args.light_shard_size)
        out["light"] = compare(light_url, "light", batch=args.light_batch_size, width=args.light_width, depth=3,
                               steps=args.light_steps)
    return out


def loader_vs_webdataset(args, tmp: Path, local_url: str) -> dict:
    # Loader samples/s: CorpusStream vs plain webdataset over the same local shards, both in this one
    # process (no DataLoader workers on either side), alternately. The loader side starts from an
    # empty shard cache every trial, so it also copies every shard into the cache and verifies its
    # sha256, checks the tar structure and validates every sample against the card; the webdataset
    # side reads the tars and decodes safetensors + JSON, nothing else.
    import webdataset as wds
    from safetensors.torch import load as st_load

    from trainer.data import CorpusStream, StreamConfig, open_corpus

    # the same shards on both sides: the training split the loader reads, in manifest order
    urls = [str(Path(local_url) / commit.path) for commit in open_corpus(local_url).shards]

    def loader_trial(trial: int, batched: bool) -> tuple[int, float, float]:
        cache = tmp / f"cache-loader-{int(batched)}-{trial}"
        stream = CorpusStream(StreamConfig(url=local_url, batch_size=args.batch_size, cache_dir=str(cache)),
                              batched=batched)
        n = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for item in stream:
            n += len(item["index"]) if batched else 1
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        stream.close()
        shutil.rmtree(cache, ignore_errors=True)
        return n, n / seconds, cpu

    def webdataset_trial() -> tuple[int, float, float]:
        m = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for s in wds.WebDataset(urls, shardshuffle=False):
            st_load(s["traj.safetensors"])["states"]
            json.loads(s["json"])
            m += 1
        return m, m / (time.perf_counter() - t0), time.process_time() - c0

    sides = {"loader_batched": lambda t: loader_trial(t, True), "loader_per_sample": lambda t: loader_trial(t, False),
             "webdataset": lambda t: webdataset_trial()}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    cpus: dict[str, list[float]] = {k: [] for k in sides}
    counts: dict[str, int] = {}
    for trial in range(args.loader_trials):  # alternating: batched, per sample, webdataset, batched, ...
        for name, run in sides.items():
            n, rate, cpu = run(trial)
            counts[name] = n
            rates[name].append(rate)
            cpus[name].append(cpu)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out: dict = {
        "loader_samples_per_s_median": round(med["loader_batched"], 1),
        "loader_per_sample_samples_per_s_median": round(med["loader_per_sample"], 1),
        "plain_webdataset_samples_per_s_median": round(med["webdataset"], 1),
        "ratio_loader_over_webdataset": round(med["loader_batched"] / med["webdataset"], 3),
        "ratio_loader_per_sample_over_webdataset": round(med["loader_per_sample"] / med["webdataset"], 3),
        "loader_trials": args.loader_trials,
    }
    for name in sides:
        out[f"{name}_spread"] = spread(rates[name])
        out[f"{name}_trials_samples_per_s"] = [round(r, 1) for r in rates[name]]
        out[f"{name}_cpu_s_per_trial_median"] = round(statistics.median(cpus[name]), 3)
        out[f"{name}_cpu_us_per_sample_median"] = round(1e6 * statistics.median(cpus[name]) / counts[name], 1)
        out[f"{name}_samples"] = counts[name]
    out["loader_processes"] = ("1 each side (main process, no DataLoader workers); CPU seconds: "
                               "time.process_time, all threads of the process")
    return out


if __name__ == "__main__":
    main()
