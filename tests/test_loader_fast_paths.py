"""The loader's cheaper checks (issue 18) are not weaker: the vectorised tar index and decoding give
exactly what the general code gives (records, errors), a corrupted byte is still caught when hashing
while copying, a verified cache entry is not re-hashed but one changed since it was verified is, and
reused buffers (block, batch, worker slot ring) never overwrite a batch someone still holds."""

from __future__ import annotations

import hashlib
import io
import os
import random

import pytest
import safetensors.torch
import torch
import webdataset
from synthetic_corpus import build_corpus, cfg_for, consume, make_card, make_record

import storage_schemas as ss
import storage_schemas.shard as shard_module
import trainer.shard_cache as shard_cache
from storage_schemas import CorpusFormatError
from storage_schemas.record import decode_spans_into
from trainer.data import CorpusStream, CorruptShardError, make_dataloader, open_corpus
from trainer.shard_cache import VERIFIED_MTIME_NS, ShardCache, copy_and_hash

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def corpus_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("fast") / "c")
    build_corpus(url, num=64, shard_size=16)
    return url


def _loop_spans(data: bytes):
    """The header loop alone (the vectorised path switched off)."""
    saved = shard_module._uniform_spans
    shard_module._uniform_spans = lambda data: None
    try:
        return shard_module._fast_spans(data)
    finally:
        shard_module._uniform_spans = saved


def test_vectorised_tar_index_is_the_header_loop_or_declines(corpus_url):
    corpus = open_corpus(corpus_url)
    data = open(os.path.join(corpus_url, corpus.shards[0].path), "rb").read()
    assert shard_module._uniform_spans(data) == _loop_spans(data) is not None
    assert shard_module._uniform_spans(bytearray(data)) == _loop_spans(data)
    rng = random.Random(0)
    headers = [off for _, spans in _loop_spans(data) for off, _ in spans.values()]
    tried = 0
    for _ in range(400):  # one byte of some header changed: the fast path declines or agrees with the loop
        where = rng.choice(headers) - 512 + rng.randrange(512)
        mutated = bytearray(data)
        mutated[where] = (mutated[where] + rng.randrange(1, 256)) % 256
        fast = shard_module._uniform_spans(bytes(mutated))
        if fast is not None:
            assert fast == _loop_spans(bytes(mutated))
        tried += 1
    # a byte in the end-of-archive zeros, a repeated key, a member of another padded size: declined
    tail = bytearray(data)
    tail[-1] = 1
    assert shard_module._uniform_spans(bytes(tail)) is None and _loop_spans(bytes(tail)) is None
    assert tried == 400


def _shard_with(records_members: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, compress=False, mtime=0) as writer:
        for key, members in records_members:
            writer.write({"__key__": key, **members})
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_spans_into_gives_decode_sample_records_and_errors(dtype):
    card = make_card(16, 16)
    if dtype != "float32":
        card = ss.DatasetCard.from_json(card.to_json().replace('"float32"', f'"{dtype}"'))
    samples = []
    for i in range(16):
        record = make_record(i, card)
        if dtype != "float32":
            record = ss.SampleRecord(record.key, record.states.to(torch.float16), record.sigmas, record.meta)
        members = ss.encode_sample(record)
        if i == 5:  # NaN in the states
            states = record.states.clone()
            states[1, 1] = float("nan")
            members["traj.safetensors"] = safetensors.torch.save({"states": states, "sigmas": record.sigmas})
        if i == 9:  # a class id outside the card's
            members["json"] = members["json"].replace(b'"class_id":1', b'"class_id":9')
        if i == 12:  # sigmas that are not the card's
            members["traj.safetensors"] = safetensors.torch.save(
                {"states": record.states, "sigmas": torch.tensor([1.0, 0.4, 0.0])})
        samples.append((record.key, members))
    data = _shard_with(samples)
    index = shard_module.index_shard_members(data, "shard-000000")
    wanted = index[1:]  # any subset, here all but the first (a stride of one sample)
    states = torch.full((len(wanted), *card.states_shape), 7.0)
    sigmas = torch.full((len(wanted), 3), 7.0)
    got = decode_spans_into(data, wanted, card, states, sigmas, shard_id="shard-000000")
    expected = []  # the reference decoder, sample by sample
    for k, sp in wanted:
        try:
            expected.append(ss.decode_sample(k, {s: data[a:a + z] for s, (a, z) in sp.items()}, card,
                                             shard_id="shard-000000"))
        except CorpusFormatError as exc:
            expected.append(exc)
    for j, (mine, theirs) in enumerate(zip(got, expected)):
        if isinstance(theirs, CorpusFormatError):
            assert type(mine) is type(theirs) and str(mine) == str(theirs)
        else:
            assert mine == theirs.meta
            assert torch.equal(states[j], theirs.states.to(torch.float32)) and torch.equal(sigmas[j], theirs.sigmas)
    assert [j + 1 for j, r in enumerate(got) if isinstance(r, CorpusFormatError)] == [5, 9, 12]
    every_other = index[::2]  # a subset at twice the stride
    states2 = torch.empty((len(every_other), *card.states_shape))
    sigmas2 = torch.empty((len(every_other), 3))
    got2 = decode_spans_into(data, every_other, card, states2, sigmas2)
    for j, (key, _) in enumerate(every_other):
        if not isinstance(got2[j], CorpusFormatError):
            assert states2[j, 0, 0] == int(key)


def test_copy_and_hash_is_sha256(tmp_path):
    payload = os.urandom(3 * (8 << 20) // 2)
    dest = io.BytesIO()
    assert copy_and_hash(io.BytesIO(payload), dest) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert dest.getvalue() == payload


def test_a_flipped_byte_is_caught_while_copying(tmp_path):
    url = str(tmp_path / "flip")
    build_corpus(url, num=32, shard_size=16)
    commit = open_corpus(url).shards[1]
    path = os.path.join(url, commit.path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01  # same size, one bit: only the hash can tell
    open(path, "wb").write(bytes(data))
    cache = ShardCache(url, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorruptShardError, match="sha256"):
        cache.get(commit)
    assert cache.stats.verify_failures == 2 and not cache.is_cached(commit)


def test_a_verified_entry_is_not_rehashed_but_a_changed_one_is(corpus_url, tmp_path, monkeypatch):
    hashed = []
    real = shard_cache.sha256_file
    monkeypatch.setattr(shard_cache, "sha256_file", lambda p: hashed.append(p) or real(p))
    corpus = open_corpus(corpus_url)
    cfg = cfg_for(corpus_url, tmp_path, shuffle_buffer=16, prefetch_shards=0)
    stream = CorpusStream(cfg, 0, 1, batched=True)
    first = consume(stream, 0)
    cache = stream._reader.cache
    assert cache.stats.fetches == 4 and hashed == []  # local shards: hashed while copied, no second pass
    assert all(cache.is_verified(c) and os.stat(cache.local_path(c)).st_mtime_ns == VERIFIED_MTIME_NS
               for c in corpus.shards)
    stream.set_epoch(1)
    consume(stream, 0)
    assert hashed == [] and cache.stats.rehashes == 0 and cache.stats.hits >= 4  # not re-hashed
    # flip one bit of tensor data in a cached copy: it still decodes, same size; its stamp is gone
    victim = corpus.shards[2]
    path = cache.local_path(victim)
    with open(path, "r+b") as f:
        f.seek(victim.num_bytes // 2)
        byte = f.read(1)
        f.seek(victim.num_bytes // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    assert not cache.is_verified(victim)
    stream.set_epoch(0)
    again = consume(stream, 0)
    assert [s["index"].tolist() for s in again] == [s["index"].tolist() for s in first]
    for a, b in zip(again, first):
        assert torch.equal(a["states"], b["states"])  # the damaged copy was not read
    assert cache.stats.rehashes == 1 and cache.stats.invalidations == 1 and cache.stats.fetches == 5
    assert hashed == [path] and cache.is_verified(victim)
    stream.close()


def test_an_unstamped_entry_from_an_older_cache_is_hashed_once(corpus_url, tmp_path):
    corpus = open_corpus(corpus_url)
    cache = ShardCache(corpus_url, cache_dir=str(tmp_path / "old"))
    commit = corpus.shards[0]
    path = cache.get(commit)
    os.utime(path, None)  # as a cache written before the stamp
    assert not cache.is_verified(commit)
    assert cache.get(commit) == path
    assert cache.stats.rehashes == 1 and cache.stats.invalidations == 0 and cache.stats.fetches == 1
    assert cache.is_verified(commit)
    cache.get(commit)
    assert cache.stats.rehashes == 1 and cache.stats.hits == 1


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_held_batches_are_never_overwritten_by_reused_buffers(corpus_url, tmp_path, workers):
    """Batches kept by the consumer (all of them, across epochs) hold what they held when given out:
    a block, batch or slot buffer is reused only once nothing uses it."""
    cfg = cfg_for(corpus_url, tmp_path, order="partitioned", shuffle_buffer=16, batch_size=4)
    reference = [b for b in consume(CorpusStream(cfg, 0, 1, batched=True), 0)]
    expected = [{k: v.clone() for k, v in b.items()} for b in reference]
    stream = CorpusStream(cfg, 0, 1, batched=True)
    iterator = iter(make_dataloader(stream, num_workers=workers, epochs=None))
    held = []
    try:
        for _ in range(3 * len(expected)):  # three epochs, every batch kept
            batch = next(iterator)
            stream.begin_step(batch)
            stream.advance()
            held.append(batch)
    finally:
        getattr(iterator, "_shutdown_workers", lambda: None)()
    for epoch in range(3):
        epoch_batches = held[epoch * len(expected):(epoch + 1) * len(expected)]
        assert sorted(i for b in epoch_batches for i in b["index"].tolist()) == list(range(64))
        assert all(int(b["epoch"][0]) == epoch for b in epoch_batches)
    for b, e in zip(held, expected):  # epoch 0 is the reference epoch
        for k in e:
            assert torch.equal(b[k], e[k]), k
    for b in held:  # states[0, 0] holds the index (test_trainer_data.sample_states)
        assert torch.equal(b["states"][:, 0, 0], b["index"].to(torch.float32))


def test_dropped_batches_free_their_slots(corpus_url, tmp_path):
    cfg = cfg_for(corpus_url, tmp_path, order="partitioned", shuffle_buffer=16, batch_size=4)
    stream = CorpusStream(cfg, 0, 1, batched=True)
    iterator = iter(make_dataloader(stream, num_workers=1, epochs=None))
    try:
        for _ in range(40):
            batch = next(iterator)
            stream.begin_step(batch)
            stream.advance()
            assert torch.equal(batch["states"][:, 0, 0], batch["index"].to(torch.float32))
            del batch
        assert 1 <= len(iterator._slots) <= 6  # the same few buffers went round, not one per batch
    finally:
        iterator._shutdown_workers()
