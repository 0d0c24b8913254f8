"""Read amplification of the streaming loader: bytes each node fetches from object storage in one epoch,
divided by its fair share (corpus bytes / nodes), for the partitioned order (default) and the global one.

    python benchmarks/read_amplification.py            # prints one JSON object

Simulates N nodes x R ranks x K DataLoader workers in this one process with the real stream: every
(rank, worker) is its own ``CorpusStream`` iterated as that worker (``iter_worker``), with its own
reader and shard cache object; the streams of one node share one cache directory (as a node-local
cache is shared), so the per-shard lock and the content-addressed files deduplicate its fetches as on
a real node. The corpus is a real one written by the generation worker and committer (gmm:latent10)
on local disk. Also checks that the epoch used every usable sample exactly once across all ranks and
workers, and runs the partitioned order of the N-node job again at N/2 nodes (an elastic resume at a
world size that divides the canonical partitions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def make_corpus(out: str, n: int, shard_size: int) -> None:
    """A real corpus: the generation worker's shards and the committer's manifest (no Ray needed)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    generate_in_process(GenerateConfig(teacher="gmm:latent10", out=out, num_trajectories=n, shard_size=shard_size,
                                       num_steps=16, stages=(8, 4), guidance=2.0, progress=False))


def simulate(url: str, tmp: Path, *, order: str, nodes: int, ranks_per_node: int, workers: int, batch_size: int,
             partitions: int | None, seed: int, shuffle_buffer: int) -> dict:
    from trainer.data import CorpusStream, StreamConfig, open_corpus, usable_end

    corpus = open_corpus(url)
    world = nodes * ranks_per_node
    corpus_bytes = sum(c.num_bytes for c in corpus.shards)
    per_node, positions, indices, streams = [], [], [], 0
    for node in range(nodes):
        cache = tmp / f"cache-{order}-{nodes}-{node}"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = StreamConfig(url, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer, cache_dir=str(cache),
                           order=order, partitions=partitions)
        fetched = 0
        for local in range(ranks_per_node):
            rank = node * ranks_per_node + local
            for w in range(workers):
                stream = CorpusStream(cfg, rank, world, batched=True, corpus=corpus)
                for batch in stream.iter_worker(w, workers, epochs=1):
                    positions += batch["position"].tolist()
                    indices += batch["index"].tolist()
                fetched += stream.cache_stats()["bytes_fetched"]
                stream.close()
                streams += 1
        per_node.append(fetched)
        shutil.rmtree(cache, ignore_errors=True)
    end = usable_end(corpus.num_samples, world * batch_size, 0)
    exactly_once = sorted(positions) == list(range(end)) and len(set(indices)) == len(indices) == end
    share = corpus_bytes / nodes
    ratios = [b / share for b in per_node]
    return {"order": order, "nodes": nodes, "world_size": world, "partitions": partitions if order != "global" else 0,
            "streams_simulated": streams, "max_ratio": round(max(ratios), 3), "mean_ratio": round(sum(ratios) / nodes, 3),
            "bytes_per_node": per_node, "exactly_once": exactly_once, "samples_used": len(indices),
            "samples_dropped": corpus.num_samples - end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-trajectories", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--shuffle-buffer", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uneven-trajectories", type=int, default=4000,
                    help="a second corpus whose shards straddle the partition boundaries")
    ap.add_argument("--uneven-shard-size", type=int, default=24)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tf-readamp-"))
    try:
        url = str(tmp / "latent10")
        t0 = time.perf_counter()
        make_corpus(url, args.num_trajectories, args.shard_size)
        build_s = time.perf_counter() - t0
        common = dict(ranks_per_node=args.ranks_per_node, workers=args.workers, batch_size=args.batch_size,
                      seed=args.seed, shuffle_buffer=args.shuffle_buffer)
        world = args.nodes * args.ranks_per_node
        t0 = time.perf_counter()
        partitioned = simulate(url, tmp, order="partitioned", nodes=args.nodes, partitions=world, **common)
        half = simulate(url, tmp, order="partitioned", nodes=max(1, args.nodes // 2), partitions=world, **common)
        global_ = simulate(url, tmp, order="global", nodes=args.nodes, partitions=None, **common)
        # shards that straddle partition boundaries: a node reads its share plus parts of <= 2 more shards
        uneven_url = str(tmp / "uneven")
        make_corpus(uneven_url, args.uneven_trajectories, args.uneven_shard_size)
        uneven = simulate(uneven_url, tmp, order="partitioned", nodes=args.nodes, partitions=world, **common)
        sim_s = time.perf_counter() - t0
        corpus_bytes = sum(p.stat().st_size for p in (Path(url) / "shards").glob("*.tar"))
        print(json.dumps({
            "benchmark": "read_amplification",
            "corpus": f"gmm:latent10, {args.num_trajectories} trajectories in shards of {args.shard_size}, "
                      f"{corpus_bytes} bytes, local disk",
            "setup": f"{args.nodes} nodes x {args.ranks_per_node} ranks x {args.workers} workers, batch {args.batch_size} "
                     f"per rank, shuffle_buffer {args.shuffle_buffer}, one shared cache directory per node",
            "metric": "bytes a node fetched in one epoch / (corpus bytes / nodes); target <= 1.1 at 8 nodes",
            "partitioned_max_ratio": partitioned["max_ratio"], "global_max_ratio": global_["max_ratio"],
            "ratio_global_over_partitioned": round(global_["max_ratio"] / partitioned["max_ratio"], 3),
            "target_met": partitioned["max_ratio"] <= 1.1 and partitioned["exactly_once"],
            "partitioned": partitioned,
            "partitioned_at_half_the_nodes_same_partitions": half,
            "global": global_,
            "uneven_corpus": {"corpus": f"{args.uneven_trajectories} trajectories in shards of {args.uneven_shard_size}",
                              **uneven},
            "seconds": {"build_corpus": round(build_s, 1), "simulate": round(sim_s, 1)},
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
