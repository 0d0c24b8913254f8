"""The trainer's streaming dataset (trainer/data/) and shard cache (trainer/shard_cache.py).

Corpora are built here with storage_schemas directly (the same bytes the pipeline writes: card,
deterministic shards, commit records, manifest), on local disk or on moto's S3 server.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections import Counter

import fsspec
import pytest
import safetensors.torch
import torch
import webdataset
from fsspec.core import url_to_fs
from synthetic_corpus import (
    build_corpus,
    cfg_for,
    consume,
    make_card,
    make_record,
    split_batch,
)

import storage_schemas as ss
from storage_schemas import SampleRecord
from trainer.data import (
    CorpusNotFinalizedError,
    CorpusStream,
    CorruptShardError,
    EpochOrder,
    StreamConfig,
    StreamState,
    StreamStateMismatch,
    open_corpus,
    rank_positions,
    usable_end,
)
from trainer.shard_cache import ShardCache

pytestmark = pytest.mark.timeout(120)

@pytest.fixture(scope="module")
def corpus_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("corpus") / "c")
    build_corpus(url)  # 103 samples in 13 shards of 8 (the last one holds 7)
    return url


def run_ranks(cfg: StreamConfig, world: int, num_workers: int, *, batched: bool, state=None,
              max_steps: int | None = None) -> list[list[dict]]:
    """Every rank of a job, in this process (streams are independent); per rank, its steps."""
    return [consume(CorpusStream(cfg, rank, world, state, batched=batched), num_workers, max_steps)
            for rank in range(world)]


def positions_of(ranks: list[list[dict]]) -> list[int]:
    """The global positions consumed, in step order (within a step: rank-major as dealt)."""
    out = []
    for step in range(len(ranks[0])):
        assert len({len(r) for r in ranks}) == 1, "ranks must take the same number of steps"
        world = len(ranks)
        per_rank = [r[step]["position"].tolist() for r in ranks]
        for j in range(len(per_rank[0])):  # rank r's j-th sample of the step is position start + j*W + r
            out.extend(per_rank[r][j] for r in range(world))
    return out


# --------------------------------------------------------------------------------------------------
# the global order and its partition


def test_epoch_order_is_a_pure_block_local_bijection():
    sizes = [8] * 12 + [7]
    order = EpochOrder(sizes, seed=3, epoch=1, shuffle_buffer=16)
    again = EpochOrder(sizes, seed=3, epoch=1, shuffle_buffer=16)
    located = [order.locate(p) for p in range(order.num_positions)]
    assert located == [again.locate(p) for p in range(103)]
    assert len(set(located)) == 103 == order.num_positions  # every sample exactly once
    assert all(0 <= off < sizes[s] for s, off in located)
    for p in range(103):  # block shuffling never moves a sample out of its block
        assert order.stream_item(p) // 16 == p // 16
    slot = {s: j for j, s in enumerate(order.shard_order)}
    for b in range(order.num_blocks):
        touched = {slot[order.locate(p)[0]] for p in range(b * 16, min(b * 16 + 16, 103))}
        assert touched <= set(order.block_slots(b))
    assert order.max_block_span == max(len(order.block_slots(b)) for b in range(order.num_blocks)) <= 3
    # different seeds and epochs give different orders
    variants = [EpochOrder(sizes, seed=s, epoch=e, shuffle_buffer=16) for s, e in [(3, 1), (3, 2), (4, 1)]]
    sequences = [[o.locate(p) for p in range(103)] for o in variants]
    assert sequences[0] != sequences[1] and sequences[0] != sequences[2] and sequences[1] != sequences[2]
    assert len({o.digest() for o in variants}) == 3


def test_rank_positions_partition():
    assert usable_end(103, 6, 0) == 102 and usable_end(103, 6, 10) == 100
    # N=20, b=2, W=3, cursor 4: usable end 4 + 2*6 = 16; rank 1 takes every 3rd position from 5
    assert list(rank_positions(20, 2, 4, 1, 3)) == [5, 8, 11, 14]
    ranks = [rank_positions(103, 2, 10, r, 3) for r in range(3)]
    assert sorted(p for r in ranks for p in r) == list(range(10, 100))
    with pytest.raises(ValueError, match="rank"):
        rank_positions(103, 2, 0, 3, 3)


@pytest.mark.parametrize("batched", [False, True])
def test_order_is_independent_of_world_size_and_workers(corpus_url, tmp_path, batched):
    cfg = cfg_for(corpus_url, tmp_path, seed=11)
    reference = CorpusStream(cfg, 0, 1)
    # DataLoader workers cost ~1 s per loader on a small CI machine: use them on a subset
    with_workers = {(0, 2), (10, 3)} if batched else {(0, 1), (10, 2)}
    for cursor in (0, 10):
        sample_at = {}
        for world in (1, 2, 3):
            for workers in (0, 2) if (cursor, world) in with_workers else (0,):
                state = {**reference.state_dict(), "cursor": cursor}
                ranks = run_ranks(cfg, world, workers, batched=batched, state=state)
                got = positions_of(ranks)
                end = usable_end(103, world * 2, cursor)
                # every usable position exactly once, in order, and nothing else
                assert got == list(range(cursor, end)), (world, workers)
                assert 103 - end == CorpusStream(cfg, 0, world, state).dropped_per_epoch
                for rank, steps in enumerate(ranks):
                    mine = [p for s in steps for p in s["position"].tolist()]
                    assert mine == list(reference.rank_positions(0, cursor, rank, world))
                    for s in steps:
                        for p, index, first, valid in zip(s["position"].tolist(), s["index"].tolist(),
                                                          s["states"][:, 0, 0].tolist(), s["valid"].tolist()):
                            assert valid and first == float(index)  # the sample's own data
                            assert sample_at.setdefault(p, index) == index  # same sample at p everywhere
                            assert reference.locate(p).index == index
        assert sorted(sample_at) == list(range(cursor, 102))
        assert len(set(sample_at.values())) == len(sample_at)  # no sample twice in an epoch


def test_elastic_resume_uses_every_sample_once(corpus_url, tmp_path):
    cfg = cfg_for(corpus_url, tmp_path, seed=5, batch_size=3)
    # W=2: five steps, then save (each rank's stream advances after every step, in lockstep)
    streams = [CorpusStream(cfg, r, 2, batched=True) for r in range(2)]
    first = [consume(stream, num_workers=2, max_steps=5) for stream in streams]
    for stream in streams:
        for _ in range(5):
            stream.advance()
    saved = json.loads(json.dumps(streams[0].state_dict()))
    assert saved == streams[1].state_dict() and saved["cursor"] == 5 * 2 * 3
    # resume on W=3 with 0 workers (another worker count too): the rest of the epoch
    resumed = [CorpusStream(cfg, r, 3, saved, batched=True) for r in range(3)]
    assert resumed[0].cursor == 30 and resumed[0].remaining_steps == (103 - 30) // 9
    second = [consume(s, num_workers=0) for s in resumed]
    consumed = positions_of(first) + positions_of(second)
    assert consumed == list(range(0, 30 + 8 * 9))  # no gap, no duplicate
    indices = [i for ranks in (first, second) for steps in ranks for s in steps for i in s["index"].tolist()]
    assert len(indices) == len(set(indices)) == 102
    # the same positions hold the same samples as in one uninterrupted single-rank epoch
    uninterrupted = {p: i for s in consume(CorpusStream(cfg, 0, 1, batched=True), 0)
                     for p, i in zip(s["position"].tolist(), s["index"].tolist())}
    for ranks in (first, second):
        for steps in ranks:
            for s in steps:
                for p, i in zip(s["position"].tolist(), s["index"].tolist()):
                    assert uninterrupted[p] == i
    # the epoch is done: advancing further is refused, the next epoch starts at cursor 0
    for s in resumed:
        for _ in range(8):
            s.advance()
        assert s.remaining_steps == 0 and s.dropped_per_epoch == 103 - 102
        with pytest.raises(ValueError, match="set_epoch"):
            s.advance()
        s.set_epoch(1)
        assert (s.epoch, s.cursor) == (1, 0)
    epoch1 = positions_of([consume(s, 0) for s in resumed])
    assert epoch1 == list(range(99))
    assert [resumed[0].locate(p, 1).index for p in range(20)] != [resumed[0].locate(p, 0).index for p in range(20)]


def test_seed_changes_the_order(corpus_url, tmp_path):
    def order(seed, epoch):  # batch_size 1: nothing is dropped
        s = CorpusStream(cfg_for(corpus_url, tmp_path, seed=seed, batch_size=1), 0, 1)
        s.set_epoch(epoch)
        return [int(i) for step in consume(s, 0) for i in step["index"]]

    a = order(0, 0)
    assert a == order(0, 0)
    assert sorted(a) == sorted(order(1, 0)) and a != order(1, 0)
    assert a != order(0, 1)


# --------------------------------------------------------------------------------------------------
# state and corpus checks


def test_state_round_trip_and_mismatches(corpus_url, tmp_path):
    cfg = cfg_for(corpus_url, tmp_path)
    stream = CorpusStream(cfg, 0, 2)
    stream.advance()
    state = StreamState.from_json(stream.state.to_json())
    assert state == stream.state and state.cursor == 4 and len(state.corpus_fingerprint) == 64
    other_url = str(tmp_path / "other")
    build_corpus(other_url, num=103, shard_size=8, base_seed=8)  # same shape, other data
    with pytest.raises(StreamStateMismatch, match="another corpus"):
        CorpusStream(cfg_for(other_url, tmp_path), 0, 2, state)
    with pytest.raises(StreamStateMismatch, match="seed"):
        CorpusStream(cfg_for(corpus_url, tmp_path, seed=1), 0, 2, state)
    with pytest.raises(StreamStateMismatch, match="order"):  # another shuffle_buffer, another order
        CorpusStream(cfg_for(corpus_url, tmp_path, shuffle_buffer=32), 0, 2, state)
    with pytest.raises(StreamStateMismatch, match="past"):
        CorpusStream(cfg, 0, 2, {**state.to_dict(), "cursor": 104})
    with pytest.raises(StreamStateMismatch, match="unknown"):
        CorpusStream(cfg, 0, 2, {**state.to_dict(), "extra": 1})
    # the fingerprint covers the manifest's shard list too, not only the card
    corpus = open_corpus(corpus_url)
    assert corpus.fingerprint == CorpusStream(cfg, 1, 2).corpus.fingerprint
    for kw, msg in [(dict(drop_remainder=False), "drop_remainder"), (dict(on_corrupt="ignore"), "on_corrupt"),
                    (dict(batch_size=0), "batch_size"), (dict(shuffle_buffer=0), "shuffle_buffer"),
                    (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=msg):
            cfg_for(corpus_url, tmp_path, **kw)


def test_unfinalized_and_missing_corpora_are_refused(tmp_path):
    url = str(tmp_path / "running")
    build_corpus(url, num=20, shard_size=8, finalize=False)
    with pytest.raises(CorpusNotFinalizedError, match="not finalized: 3 shard"):
        CorpusStream(cfg_for(url, tmp_path), 0, 1)
    with pytest.raises(CorpusNotFinalizedError, match="no dataset.json"):
        open_corpus(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text(make_card(20, 8).to_json())
    with pytest.raises(CorpusNotFinalizedError, match="no commit records"):
        open_corpus(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------------
# corruption


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def flipped_corpus(tmp_path) -> str:
    """A corpus whose stored shard-000002 no longer matches its manifest sha256 (one byte flipped)."""
    url = str(tmp_path / "flipped")
    build_corpus(url, num=40, shard_size=8)
    path = os.path.join(url, "shards", "shard-000002.tar")
    flip_byte(path, os.path.getsize(path) // 2)
    return url


@pytest.mark.parametrize("workers", [0, 2])
def test_sha_mismatch_raises_naming_the_shard(flipped_corpus, tmp_path, workers):
    stream = CorpusStream(cfg_for(flipped_corpus, tmp_path, shuffle_buffer=8), 0, 1)
    with pytest.raises(CorruptShardError, match="shard-000002") as info:
        consume(stream, workers)
    assert info.value.shard_id == "shard-000002"
    assert "sha256" in str(info.value)


def test_sha_mismatch_skip_yields_counted_placeholders(flipped_corpus, tmp_path):
    cfg = cfg_for(flipped_corpus, tmp_path, shuffle_buffer=8, on_corrupt="skip")
    stream = CorpusStream(cfg, 0, 1)
    items = [x for s in consume(stream, 0) for x in split_batch(s)]
    bad = [x for x in items if not x["valid"]]
    assert len(items) == 40 and sorted(x["index"] for x in bad) == list(range(16, 24))
    assert all(x["shard"] == 2 and x["seed"] == -1 and x["class_id"] == -1 and not x["states"].any() for x in bad)
    assert all(x["valid"] and x["shard"] == x["index"] // 8 for x in items if x["index"] not in range(16, 24))
    assert stream.skipped_samples == 8 and stream.corrupt_shards == ["shard-000002"]
    assert stream.cache_stats()["verify_failures"] == 2  # fetched twice before blaming the object
    # in DataLoader workers the count travels in the items: ranks stay in lockstep
    ranks = run_ranks(cfg, 2, 2, batched=True)
    assert positions_of(ranks) == list(range(40))
    assert sum(int((~s["valid"]).sum()) for r in ranks for s in r) == 8


def test_bad_sample_inside_a_verified_shard(tmp_path):
    """Storage is consistent (sha matches) but one sample holds NaN: error names it; skip replaces it."""
    card = make_card(16, 8)
    records = [make_record(i, card) for i in range(8, 16)]
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, compress=False, mtime=0) as writer:
        for r in records:
            members = ss.encode_sample(r)
            if r.index == 13:
                states = r.states.clone()
                states[1, 1] = float("nan")
                members["traj.safetensors"] = safetensors.torch.save({"states": states, "sigmas": r.sigmas})
            writer.write({"__key__": r.key, **members})
    url = str(tmp_path / "nan")
    build_corpus(url, num=16, shard_size=8, shard_bytes={1: buffer.getvalue()})
    with pytest.raises(CorruptShardError, match=r"shard-000001.*0000000013.*non-finite"):
        consume(CorpusStream(cfg_for(url, tmp_path, shuffle_buffer=4), 0, 1), 0)
    stream = CorpusStream(cfg_for(url, tmp_path, shuffle_buffer=4, on_corrupt="skip"), 0, 1)
    items = [x for s in consume(stream, 0) for x in split_batch(s)]
    assert [int(x["index"]) for x in items if not x["valid"]] == [13]  # only the bad sample
    assert stream.skipped_samples == 1 and stream.corrupt_shards == ["shard-000001"]


def test_damaged_cache_copy_is_fetched_again(corpus_url, tmp_path):
    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=8, prefetch_shards=0)
    stream = CorpusStream(cfg, 0, 1)
    expected = [int(i) for s in consume(stream, 0) for i in s["index"]]
    cache = ShardCache(corpus_url, cache_dir=cfg.cache_dir)
    victim = open_corpus(corpus_url).shards[5]
    path = cache.local_path(victim)
    with open(path, "r+b") as f:  # cut the cached copy short: the tar no longer parses
        f.truncate(victim.num_bytes // 2)
    again = CorpusStream(cfg, 0, 1)
    assert [int(i) for s in consume(again, 0) for i in s["index"]] == expected
    stats = again.cache_stats()
    assert stats["invalidations"] == 1 and stats["fetches"] == 1
    assert cache.verify_cached(victim)


# --------------------------------------------------------------------------------------------------
# storage: S3 and the cache


def test_reads_from_s3_verify_and_cache(s3_bucket, moto_endpoint, tmp_path):
    from s3_fault_proxy import FaultPolicy, FaultRule, S3FaultProxy

    url = f"s3://{s3_bucket}/corpus"
    build_corpus(url, num=40, shard_size=8)
    fsspec.filesystem("s3").invalidate_cache()
    # the first GET of shard-000003 comes back with one byte flipped: the sha256 check catches it
    policy = FaultPolicy([FaultRule("corrupt", methods=("GET",), path=r"/shards/shard-000003\.tar$", first=1,
                                    name="corrupt")])
    with S3FaultProxy(moto_endpoint, policy) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.url}}
        cfg = cfg_for(url, tmp_path, storage_options=options, shuffle_buffer=8, prefetch_shards=2)
        stream = CorpusStream(cfg, 0, 1)
        first = [int(i) for s in consume(stream, 0) for i in s["index"]]
        shard_gets = len(policy.requests_to(r"/shards/", "GET"))
        stats = stream.cache_stats()
        assert sorted(first) == list(range(40))
        assert policy.total(rule="corrupt") == 1 and stats["verify_failures"] == 1
        assert stats["fetches"] == 5 and shard_gets == 6 == stats["remote_reads"]
        stream.set_epoch(1)
        second = [int(i) for s in consume(stream, 0) for i in s["index"]]
        assert sorted(second) == list(range(40)) and second != first
        assert len(policy.requests_to(r"/shards/", "GET")) == shard_gets  # no new GET: all from the cache
        stats = stream.cache_stats()
        assert stats["fetches"] == 5 and stats["remote_reads"] == 6 and stats["hits"] >= 1
        stream.close()
    # DataLoader workers (forked after the main process used s3fs) open their own S3 clients
    cfg = cfg_for(url, tmp_path, cache_dir=str(tmp_path / "cache2"), shuffle_buffer=8)
    ranks = run_ranks(cfg, 2, 2, batched=True)
    assert positions_of(ranks) == list(range(40))
    assert sorted(i for r in ranks for s in r for i in s["index"].tolist()) == list(range(40))


def test_cache_evicts_to_its_budget_and_dedups_fetches(corpus_url, tmp_path):
    shards = open_corpus(corpus_url).shards
    size = shards[0].num_bytes
    cache = ShardCache(corpus_url, cache_dir=str(tmp_path / "small"), max_bytes=int(2.5 * size))
    for commit in shards[:6]:
        path = cache.get(commit)
        assert os.path.getsize(path) == commit.num_bytes
        assert cache.cached_bytes() <= cache.max_bytes
    assert cache.stats.fetches == 6 and cache.stats.evictions == 4
    assert [cache.is_cached(c) for c in shards[:6]] == [False] * 4 + [True] * 2  # least recently used went
    cache.get(shards[4])  # a hit refreshes its LRU stamp
    cache.get(shards[0])  # a miss fetches again and evicts the LRU one (shards[5])
    assert cache.is_cached(shards[4]) and not cache.is_cached(shards[5])
    assert cache.stats.hits == 1 and cache.stats.fetches == 7
    # several processes/threads sharing the directory download a shard once
    caches = [ShardCache(corpus_url, cache_dir=str(tmp_path / "shared")) for _ in range(4)]
    threads = [threading.Thread(target=c.get, args=(shards[7],)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(c.stats.fetches for c in caches) == 1
    assert Counter(c.stats.hits for c in caches)[1] + sum(c.stats.misses for c in caches) == 4
    # a whole epoch through a small cache stays within its budget
    budget = 5 * size
    cfg = cfg_for(corpus_url, tmp_path, cache_dir=str(tmp_path / "epoch"), cache_max_bytes=budget,
                  shuffle_buffer=8, prefetch_shards=1)
    stream = CorpusStream(cfg, 0, 1)
    indices = [int(i) for s in consume(stream, 0) for i in s["index"]]
    assert len(indices) == len(set(indices)) == 102
    assert ShardCache(corpus_url, cache_dir=cfg.cache_dir).cached_bytes() <= budget
    assert stream.cache_stats()["evictions"] > 0
    stream.close()


# --------------------------------------------------------------------------------------------------
# reading: each shard's structure is checked once, items are the stored samples


def stored_samples(url: str) -> dict[int, SampleRecord]:
    """Every sample of the corpus, decoded by the general (streaming) tar reader from the shard files."""
    corpus = open_corpus(url)
    fs, root = url_to_fs(url)
    out = {}
    for commit in corpus.shards:
        with fs.open(f"{root}/{commit.path}", "rb") as f:  # a file object: the streaming reader
            for record in ss.iter_shard_samples(f, commit.shard_id, corpus.card):
                out[record.index] = record
    return out


def check_items_are_the_stored_samples(stream: CorpusStream, items: list[dict], stored: dict[int, SampleRecord]):
    for item in items:
        p = int(item["position"])
        where = stream.locate(p)
        record = stored[where.index]
        assert int(item["index"]) == where.index and int(item["shard"]) == ss.shard_number(where.shard_id)
        assert torch.equal(item["states"], record.states) and item["states"].dtype == torch.float32
        assert torch.equal(item["sigmas"], record.sigmas)
        for name, dtype, value in (("class_id", torch.long, record.meta["class_id"]),
                                   ("guidance", torch.float32, record.guidance),
                                   ("index", torch.long, record.index), ("seed", torch.long, record.seed),
                                   ("position", torch.long, p), ("valid", torch.bool, True)):
            assert item[name].shape == () and item[name].dtype == dtype
            assert torch.equal(item[name], torch.tensor(value, dtype=dtype))


@pytest.mark.parametrize("shuffle_buffer", [12, 20])
def test_shards_straddling_blocks_are_checked_once_and_items_are_the_stored_samples(corpus_url, tmp_path,
                                                                                    shuffle_buffer):
    """Blocks of 12 or 20 positions over shards of 8: most shards are read in two blocks."""
    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=shuffle_buffer, seed=3)
    stream = CorpusStream(cfg, 0, 1)
    order = stream.global_order()
    spans = sum(len(order.block_slots(b)) for b in range(order.num_blocks))
    assert spans > 13  # shards really straddle blocks
    items = list(stream)
    assert [int(x["position"]) for x in items] == list(range(102))
    check_items_are_the_stored_samples(stream, items, stored_samples(corpus_url))
    assert stream._reader.shards_indexed == 13  # once per shard, not once per (block, shard)
    stream.set_epoch(1)  # the next epoch reuses the indexes (13 shards fit the LRU)
    again = list(stream)
    check_items_are_the_stored_samples(stream, again, stored_samples(corpus_url))
    assert stream._reader.shards_indexed == 13


def test_index_lru_is_bounded_and_a_small_one_gives_the_same_items(corpus_url, tmp_path, monkeypatch):
    import trainer.data

    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=12, seed=3)
    expected = [(int(x["position"]), int(x["index"])) for x in CorpusStream(cfg, 0, 1)]
    monkeypatch.setattr(trainer.data, "INDEX_CACHE_SHARDS", 1)
    stream = CorpusStream(cfg, 0, 1)
    items = list(stream)
    assert [(int(x["position"]), int(x["index"])) for x in items] == expected
    check_items_are_the_stored_samples(stream, items, stored_samples(corpus_url))
    assert len(stream._reader._index) == 1 and stream._reader.shards_indexed > 13


def test_resume_mid_block_with_straddling_shards_is_exact(corpus_url, tmp_path):
    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=12, seed=9, batch_size=5)
    whole = {int(x["position"]): int(x["index"]) for x in CorpusStream(cfg, 0, 1)}
    stream = CorpusStream(cfg, 0, 1, batched=True)
    first = consume(stream, num_workers=0, max_steps=3)
    for _ in range(3):
        stream.advance()
    saved = stream.state_dict()
    assert saved["cursor"] == 15 and 15 % 12 != 0  # inside block 1
    resumed = [CorpusStream(cfg, r, 2, saved, batched=True) for r in range(2)]
    second = [consume(s, num_workers=1 if r == 0 else 0) for r, s in enumerate(resumed)]
    assert positions_of([first]) + positions_of(second) == list(range(15 + ((102 - 15) // 10) * 10))
    for steps in [first, *second]:
        for s in steps:
            for p, i in zip(s["position"].tolist(), s["index"].tolist()):
                assert whole[p] == i


def test_damaged_cache_copy_of_an_indexed_shard_is_fetched_again(corpus_url, tmp_path):
    """The reader keeps a shard's index across blocks and epochs; a cached copy damaged in between
    is still noticed (its size), re-hashed, fetched again, and reading goes on."""
    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=12, prefetch_shards=0)
    stream = CorpusStream(cfg, 0, 1)
    first = [(int(x["position"]), int(x["index"])) for x in stream]
    victim = stream.corpus.shards[4]
    with open(stream._reader.cache.local_path(victim), "r+b") as f:
        f.truncate(victim.num_bytes - 1024)
    stream.set_epoch(1)
    stream.set_epoch(0)
    assert [(int(x["position"]), int(x["index"])) for x in stream] == first
    stats = stream.cache_stats()
    assert stats["invalidations"] == 1
    assert stream._reader.cache.verify_cached(victim)
