"""Synthetic corpora for the loader, audit and reliability tests: written with storage_schemas directly (the same
bytes the pipeline writes: card, deterministic shards, commit records, manifest), on local disk or on moto's S3
server; and the loader helpers those tests share (a stream config, consuming a rank's loader like a trainer)."""

from __future__ import annotations

import hashlib

import torch
from fsspec.core import url_to_fs

import storage_schemas as ss
from storage_schemas import DatasetCard, SampleRecord, ShardCommit
from trainer.data import CorpusStream, StreamConfig, make_dataloader

SIGMAS = [1.0, 0.5, 0.0]


def make_card(num: int, shard_size: int, base_seed: int = 7) -> DatasetCard:
    return DatasetCard(
        teacher={"kind": "gmm", "fingerprint": "test-gmm-2d", "config": {"preset": "ring2d"}},
        solver={"name": "euler", "num_steps": 2, "sigmas": SIGMAS, "guidance": {"min": 1.0, "max": 3.0}},
        saved_sigmas=SIGMAS,
        sample_shape=[2],
        dtype="float32",
        conditioning={"kind": "class", "num_classes": 4},
        run={"num_trajectories": num, "shard_size": shard_size, "base_seed": base_seed},
        created_by="trajflow tests",
    )


def sample_states(index: int) -> torch.Tensor:
    """The states of sample ``index``: states[0, 0] == index, so a batch shows what it holds."""
    states = torch.randn(3, 2, generator=torch.Generator().manual_seed(index))
    states[0, 0] = float(index)
    return states


def make_record(index: int, card: DatasetCard) -> SampleRecord:
    meta = {"index": index, "seed": card.base_seed + index, "guidance": 2.0, "class_id": index % 4}
    return SampleRecord(key=ss.sample_key(index), states=sample_states(index), sigmas=SIGMAS, meta=meta)


def build_corpus(url: str, num: int = 103, shard_size: int = 8, *, finalize: bool = True, base_seed: int = 7,
                 shard_bytes: dict[int, bytes] | None = None) -> DatasetCard:
    """Write a corpus as the pipeline does: card, shards, commit records, then (finalize) the manifest.

    ``shard_bytes`` replaces the bytes of some shards (the commit records then describe those bytes:
    storage is consistent, the data inside is bad).
    """
    fs, root = url_to_fs(url)
    card = make_card(num, shard_size, base_seed)
    fs.makedirs(f"{root}/shards", exist_ok=True)
    fs.makedirs(f"{root}/commits", exist_ok=True)
    fs.pipe_file(f"{root}/{ss.DATASET_CARD}", card.to_json().encode())
    commits = []
    for n, start in enumerate(range(0, num, shard_size)):
        indices = range(start, min(start + shard_size, num))
        data = (shard_bytes or {}).get(n) or ss.write_shard_bytes([make_record(i, card) for i in indices], card)
        sid = ss.shard_id(n)
        fs.pipe_file(f"{root}/{ss.shard_relpath(sid)}", data)
        commit = ShardCommit(shard_id=sid, path=ss.shard_relpath(sid), sha256=hashlib.sha256(data).hexdigest(),
                             num_bytes=len(data), num_samples=len(indices), first_index=indices[0],
                             last_index=indices[-1], seed=card.base_seed + indices[0],
                             card_fingerprint=card.fingerprint(), committed_at=ss.utc_now_iso())
        fs.pipe_file(f"{root}/{ss.commit_relpath(sid)}", commit.to_json().encode())
        commits.append(commit)
    if finalize:
        fs.pipe_file(f"{root}/{ss.MANIFEST}", ss.manifest_to_parquet_bytes(commits))
    return card


def cfg_for(url: str, tmp_path, **kw) -> StreamConfig:
    """The tests of this file check the global order (every W-th position to a rank): the
    partitioned default is tested in tests/test_partitioned_stream.py."""
    kw.setdefault("order", "global")
    kw.setdefault("batch_size", 2)
    kw.setdefault("shuffle_buffer", 16)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return StreamConfig(url, **kw)


def consume(stream: CorpusStream, num_workers: int, max_steps: int | None = None) -> list[dict]:
    """Iterate a rank's loader like a trainer does; returns one {position, index, ...} list per step."""
    iterator = iter(make_dataloader(stream, num_workers=num_workers))
    steps, pending = [], []
    try:
        for item in iterator:
            if stream.batched:
                steps.append(item)
            else:  # single samples: b consecutive ones form the rank's batch of a step
                pending.append(item)
                if len(pending) == stream.cfg.batch_size:
                    steps.append(torch.utils.data.default_collate(pending))
                    pending = []
            if max_steps is not None and len(steps) == max_steps:
                break
    finally:
        # stop the workers now: an iterator left to the garbage collector after a worker raised
        # waits 2 x 5 s for workers that never get their stop message (torch's shutdown order)
        getattr(iterator, "_shutdown_workers", lambda: None)()
    assert not pending
    return steps


def split_batch(batch: dict) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["index"]))]
