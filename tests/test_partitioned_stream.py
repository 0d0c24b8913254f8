"""Partitioned streaming (trainer/data.py, the default order): exactly once per epoch on any number of
ranks and across an elastic resume, each rank reading about its share of the shards, a pure order,
manifest rows checked against the plan (a duplicated shard is corrupt data), and loaders whose
workers serve every epoch. Real corpora on local disk (the bytes the pipeline writes), real
DataLoader workers (fork and spawn), the real `trajflow train` CLI for the duplicate-shard refusal.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from fsspec.core import url_to_fs
from synthetic_corpus import build_corpus, consume

import storage_schemas as ss
from trainer.data import (
    CorpusStream,
    CorruptShardError,
    PartitionedOrder,
    StreamConfig,
    StreamStateMismatch,
    make_dataloader,
    usable_end,
)

pytestmark = pytest.mark.timeout(180)


def pcfg(url: str, tmp_path, **kw) -> StreamConfig:
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle_buffer", 16)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return StreamConfig(url, **kw)


@pytest.fixture(scope="module")
def corpus_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("pcorpus") / "c")
    build_corpus(url)  # 103 samples in 13 shards of 8 (the last one holds 7)
    return url


def step_rows(ranks: list[list[dict]]) -> list[list[int]]:
    """Per step, the union of the ranks' positions (checked: disjoint, same step count on every rank)."""
    assert len({len(r) for r in ranks}) == 1, "ranks must take the same number of steps"
    rows = []
    for step in range(len(ranks[0])):
        got = [p for r in ranks for p in r[step]["position"].tolist()]
        assert len(got) == len(set(got))
        rows.append(sorted(got))
    return rows


def samples_of(ranks: list[list[dict]]) -> dict[int, int]:
    """position -> index, checking each item is the sample's own stored data."""
    out = {}
    for steps in ranks:
        for s in steps:
            for p, i, first, valid in zip(s["position"].tolist(), s["index"].tolist(), s["states"][:, 0, 0].tolist(),
                                          s["valid"].tolist()):
                assert valid and first == float(i)
                assert p not in out
                out[p] = i
    return out


def test_partitioned_order_is_pure_and_deals_every_step_exactly_once():
    sizes = [8] * 12 + [7]
    for parts in (1, 2, 3, 5, 200):
        order = PartitionedOrder(sizes, seed=3, epoch=1, shuffle_buffer=16, partitions=parts)
        again = PartitionedOrder(sizes, seed=3, epoch=1, shuffle_buffer=16, partitions=parts)
        located = [order.locate(p) for p in range(103)]
        assert located == [again.locate(p) for p in range(103)] and order.digest() == again.digest()
        assert len(set(located)) == 103  # a bijection onto the samples
        for p in range(103):  # a position's sample lies in its part's stream range
            item = order.stream_item(p)
            q = order.part_of(p)
            assert order.part_starts[q] <= item < order.part_starts[q + 1]
        for world, b in ((1, 2), (2, 2), (3, 1), (3, 4)):
            g = world * b
            for start in range(0, 103 - g + 1, 5):
                got = [p for r in range(world) for p in order.step_positions(start, g, b, r)]
                assert sorted(got) == list(range(start, start + g))
    a, b = (PartitionedOrder(sizes, seed=3, epoch=e, shuffle_buffer=16, partitions=2) for e in (1, 2))
    assert [a.locate(p) for p in range(103)] != [b.locate(p) for p in range(103)] and a.digest() != b.digest()
    c = PartitionedOrder(sizes, seed=3, epoch=1, shuffle_buffer=16, partitions=3)
    assert c.digest() != a.digest()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exactly_once_per_epoch_and_each_rank_reads_its_share(corpus_url, tmp_path, world):
    # 1, 2 and 3 divide 6 partitions and 6 divides every global batch (world x 6): reads stay local
    cfg = pcfg(corpus_url, tmp_path, seed=11, partitions=6, batch_size=6)
    workers = 2 if world == 2 else 0
    ranks = [consume(CorpusStream(cfg, r, world, batched=True), workers) for r in range(world)]
    end = usable_end(103, world * 6, 0)
    rows = step_rows(ranks)
    assert rows == [list(range(s, s + world * 6)) for s in range(0, end, world * 6)]  # steps in order, no gap
    got = samples_of(ranks)
    assert sorted(got) == list(range(end)) and len(set(got.values())) == end  # every usable sample once
    # the same sample sits at every position whatever the world size (the order depends on partitions only)
    ref = CorpusStream(cfg, 0, 1)
    assert all(ref.locate(p).index == i for p, i in got.items())
    # each rank reads the shards of its parts: about 13 / world of them (+1 where a shard straddles two parts)
    order = ref.global_order()
    for r, steps in enumerate(ranks):
        shards = {int(sh) for s in steps for sh in s["shard"].tolist()}
        mine = {order.shard_order[j] for q in range(r * 6 // world, (r + 1) * 6 // world)
                for j in range(order.slot_of_item(order.part_starts[q]), order.part_last_slot(q) + 1)}
        assert {ss.shard_number(ss.shard_id(s)) for s in mine} >= shards
        assert len(shards) <= 13 // world + 2


def test_default_partitions_is_the_world_size_and_the_state_carries_it(corpus_url, tmp_path):
    cfg = pcfg(corpus_url, tmp_path)
    stream = CorpusStream(cfg, 1, 3)
    assert stream.order == "partitioned" and stream.partitions == 3
    state = stream.state_dict()
    assert state["version"] == 2 and state["order"] == "partitioned" and state["partitions"] == 3
    resumed = CorpusStream(cfg, 0, 2, state)  # partitions=None takes the state's
    assert resumed.partitions == 3 and resumed.state_dict()["order_digest"] == state["order_digest"]
    with pytest.raises(StreamStateMismatch, match="partitions"):
        CorpusStream(pcfg(corpus_url, tmp_path, partitions=2), 0, 2, state)
    with pytest.raises(StreamStateMismatch, match="order='partitioned'"):
        CorpusStream(pcfg(corpus_url, tmp_path, order="global"), 0, 2, state)
    # a version-1 state (written before partitioned streaming) is the global order
    v1 = {k: v for k, v in CorpusStream(pcfg(corpus_url, tmp_path, order="global"), 0, 2).state_dict().items()
          if k not in ("order", "partitions")} | {"version": 1}
    assert CorpusStream(pcfg(corpus_url, tmp_path, order="global"), 0, 2, v1).cursor == 0
    with pytest.raises(StreamStateMismatch, match="global"):
        CorpusStream(cfg, 0, 2, v1)
    with pytest.raises(ValueError, match="order"):
        pcfg(corpus_url, tmp_path, order="random")
    with pytest.raises(ValueError, match="partitions"):
        pcfg(corpus_url, tmp_path, partitions=0)


def test_elastic_resume_two_to_three_ranks_mid_epoch(corpus_url, tmp_path):
    cfg = pcfg(corpus_url, tmp_path, seed=5, batch_size=3)
    streams = [CorpusStream(cfg, r, 2, batched=True) for r in range(2)]
    first = [consume(s, num_workers=2 if r == 0 else 0, max_steps=5) for r, s in enumerate(streams)]
    for s in streams:
        for _ in range(5):
            s.advance()
    saved = json.loads(json.dumps(streams[0].state_dict()))
    assert saved == streams[1].state_dict() and saved["cursor"] == 30 and saved["partitions"] == 2
    resumed = [CorpusStream(cfg, r, 3, saved, batched=True) for r in range(3)]
    assert resumed[0].remaining_steps == (103 - 30) // 9
    second = [consume(s, num_workers=0) for s in resumed]
    rows = step_rows(first) + step_rows(second)
    assert [p for row in rows for p in row] == list(range(30 + 8 * 9))  # no gap, no duplicate
    got = {**samples_of(first), **samples_of(second)}
    assert len(got) == len(set(got.values())) == 102
    # the same samples at the same positions as one uninterrupted single-rank epoch with 2 partitions
    single = samples_of([consume(CorpusStream(pcfg(corpus_url, tmp_path, seed=5, batch_size=3, partitions=2),
                                              0, 1, batched=True), 0)])
    assert all(single[p] == i for p, i in got.items())


def record_start(path: str, worker_id: int) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {worker_id}\n")


@pytest.mark.parametrize("context", [None, "spawn"])
def test_one_loader_serves_every_epoch_without_restarting_workers(corpus_url, tmp_path, context):
    cfg = pcfg(corpus_url, tmp_path, seed=2, batch_size=4)
    stream = CorpusStream(cfg, 0, 2, batched=True)
    starts = tmp_path / "starts.txt"
    workers = 2 if context is None else 1
    loader = make_dataloader(stream, num_workers=workers, epochs=None, multiprocessing_context=context,
                             worker_init_fn=functools.partial(record_start, str(starts)))
    per_epoch: dict[int, list[int]] = {}
    iterator = iter(loader)
    try:
        for batch in iterator:  # what the Trainer's _corpus_batches does
            stream.begin_step(batch)
            if stream.epoch == 3:
                break
            per_epoch.setdefault(stream.epoch, []).extend(batch["position"].tolist())
            stream.advance()
    finally:
        iterator._shutdown_workers()
    lines = starts.read_text().splitlines()
    assert len(lines) == workers and len({line.split()[0] for line in lines}) == workers  # started once
    other = CorpusStream(cfg, 1, 2, batched=True)
    for epoch in range(3):  # each epoch: this rank's positions, exactly, in step order
        assert per_epoch[epoch] == other.rank_positions(epoch, 0, 0, 2)
    assert stream.epoch == 3 and stream.cursor == 0


def test_begin_step_refuses_a_loader_out_of_step(corpus_url, tmp_path):
    stream = CorpusStream(pcfg(corpus_url, tmp_path), 0, 1, batched=True)
    batches = iter(make_dataloader(stream, epochs=None))
    first = next(batches)
    stream.begin_step(first)  # no advance(): the next batch is not the step the cursor names
    with pytest.raises(RuntimeError, match="out of step"):
        stream.begin_step(next(batches))


# --------------------------------------------------------------------------------------------------
# a shard that is a byte copy of another, its commit and manifest row claiming the same indices


@pytest.fixture(scope="module")
def duplicated_corpus(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("dup") / "c")
    build_corpus(url, num=64, shard_size=8)
    fs, root = url_to_fs(url)
    rows = ss.manifest_from_parquet_bytes(fs.cat_file(f"{root}/{ss.MANIFEST}"))
    copy = fs.cat_file(f"{root}/{rows[2].path}")  # shard 5's object becomes a copy of shard 2's
    fs.pipe_file(f"{root}/{rows[5].path}", copy)
    forged = ss.ShardCommit(**{**json.loads(rows[2].to_json()), "shard_id": rows[5].shard_id, "path": rows[5].path})
    fs.pipe_file(f"{root}/{ss.commit_relpath(forged.shard_id)}", forged.to_json().encode())
    rows[5] = forged
    fs.pipe_file(f"{root}/{ss.MANIFEST}", ss.manifest_to_parquet_bytes(rows))
    return url


def test_duplicated_shard_is_corrupt_data_never_trained_twice(duplicated_corpus, tmp_path):
    with pytest.raises(CorruptShardError, match="shard-000005.*indices 16..23") as info:
        CorpusStream(pcfg(duplicated_corpus, tmp_path, batch_size=4), 0, 2)
    assert info.value.shard_id == "shard-000005"
    for order in ("partitioned", "global"):
        cfg = pcfg(duplicated_corpus, tmp_path, batch_size=4, on_corrupt="skip", order=order)
        ranks = [consume(CorpusStream(cfg, r, 2, batched=True), 2 if r == 0 else 0) for r in range(2)]
        valid = Counter(i for steps in ranks for s in steps
                        for i, v in zip(s["index"].tolist(), s["valid"].tolist()) if v)
        skipped = sum(int((~s["valid"]).sum()) for steps in ranks for s in steps)
        assert max(valid.values()) == 1  # no index twice
        assert skipped == 8 and sorted(valid) == [i for i in range(64) if not 40 <= i < 48]
        assert CorpusStream(cfg, 0, 2).corrupt_shards == ["shard-000005"]


def test_train_cli_refuses_the_duplicated_shard(duplicated_corpus, tmp_path):
    cli = str(Path(sys.executable).parent / "trajflow")
    r = subprocess.run([cli, "train", "--data", duplicated_corpus, "--out", str(tmp_path / "o"), "--stages", "2",
                        "--batch-size", "8", "--init", "scratch", "--student-width", "16", "--student-depth", "1",
                        "--max-steps", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=170)
    assert r.returncode == 1 and "shard-000005" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_epoch_item_key(corpus_url, tmp_path):
    stream = CorpusStream(pcfg(corpus_url, tmp_path, batch_size=1), 0, 1)
    items = list(stream.iter_worker(0, 1, epochs=2))
    assert [int(i["epoch"]) for i in items] == [0] * 103 + [1] * 103
    assert [int(i["position"]) for i in items] == list(range(103)) * 2
    assert isinstance(items[0]["epoch"], torch.Tensor)
