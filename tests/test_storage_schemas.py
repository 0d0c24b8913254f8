"""Tests of the on-storage corpus format (storage_schemas): round trips, determinism, and that every
bad input is refused with the right, clearly worded error."""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import webdataset

import storage_schemas as ss
from storage_schemas import (
    CorpusFormatError,
    CorpusLayout,
    DatasetCard,
    NonFiniteError,
    SampleRecord,
    SchemaError,
    ShapeMismatchError,
    ShardCommit,
    UnsafeMemberError,
    UnsupportedSchemaVersion,
)

SHARD = "shard-000007"


def shifted_grid(num_steps: int, shift: float = 3.0) -> list[float]:
    """shift(linspace(1, 0, S + 1)): the teacher's solver grid (docs/math.md)."""
    us = [1.0 - i / num_steps for i in range(num_steps + 1)]
    return [shift * u / (1.0 + (shift - 1.0) * u) for u in us]


def make_card(**overrides) -> DatasetCard:
    """K = 5 saved states of shape [4, 8, 8] (every second point of an 8-step solver grid)."""
    solver_sigmas = shifted_grid(8)
    fields = dict(
        teacher={
            "kind": "gmm",
            "fingerprint": "gmm-latent-4x8x8-v1",
            "config": {"preset": "latent10", "seed": 0},
        },
        solver={
            "name": "euler",
            "num_steps": 8,
            "sigmas": solver_sigmas,
            "guidance": {"min": 1.0, "max": 4.0},
        },
        saved_sigmas=solver_sigmas[::2],
        sample_shape=[4, 8, 8],
        dtype="float32",
        conditioning={"kind": "class", "num_classes": 10},
        run={"num_trajectories": 12, "shard_size": 4, "base_seed": 1234},
        created_by="trajflow 0.1.0",
        stages=[4, 2],
    )
    fields.update(overrides)
    return DatasetCard(**fields)


def make_record(index: int, card: DatasetCard, **meta_overrides) -> SampleRecord:
    generator = torch.Generator().manual_seed(index)
    states = torch.randn(card.states_shape, generator=generator).to(ss.TORCH_DTYPES[card.dtype])
    meta = {"index": index, "seed": card.base_seed + index, "guidance": 2.5, "class_id": index % 10}
    meta.update(meta_overrides)
    return SampleRecord(key=ss.sample_key(index), states=states, sigmas=list(card.saved_sigmas), meta=meta)


def make_records(card: DatasetCard, start: int = 0, count: int = 4) -> list[SampleRecord]:
    return [make_record(i, card) for i in range(start, start + count)]


def assert_same_record(a: SampleRecord, b: SampleRecord) -> None:
    assert a.key == b.key
    assert a.meta == b.meta
    assert a.states.dtype == b.states.dtype
    assert torch.equal(a.states, b.states)
    assert torch.equal(a.sigmas, b.sigmas)


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar written with the stdlib, for members our writer would never produce."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, payload in entries:
            if payload is None:
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def sample_entries(record: SampleRecord) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        (tarfile.TarInfo(f"{record.key}.{suffix}"), payload)
        for suffix, payload in sorted(ss.encode_sample(record).items())
    ]


# --------------------------------------------------------------------------------------------------
# dataset card


def test_card_round_trip_is_exact_and_canonical():
    card = make_card()
    text = card.to_json()
    assert DatasetCard.from_json(text) == card
    assert DatasetCard.from_json(text).to_json() == text
    assert DatasetCard.from_json(text).fingerprint() == card.fingerprint()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert card.states_shape == (5, 4, 8, 8)
    assert card.solver.sigmas[0] == 1.0 and card.saved_sigmas[-1] == 0.0


def test_card_fixed_guidance_and_no_stages_round_trip():
    card = make_card(
        solver={"name": "heun", "num_steps": 4, "sigmas": shifted_grid(4), "guidance": 3.0},
        saved_sigmas=shifted_grid(4),
        conditioning={"kind": "prompt"},
        stages=None,
        sample_shape=[2],
    )
    assert "stages" not in json.loads(card.to_json())
    assert DatasetCard.from_json(card.to_json()) == card
    assert card.solver.guidance == 3.0


def test_card_fingerprint_covers_the_data_but_not_created_by():
    card = make_card()
    assert len(card.fingerprint()) == 64
    assert make_card(created_by="trajflow 9.9.9").fingerprint() == card.fingerprint()
    assert (
        make_card(run={"num_trajectories": 12, "shard_size": 4, "base_seed": 1}).fingerprint()
        != card.fingerprint()
    )
    assert make_card(dtype="float16").fingerprint() != card.fingerprint()


def card_dict() -> dict:
    return json.loads(make_card().to_json())


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda d: d.update(schema_version=2), UnsupportedSchemaVersion, "schema_version 2"),
        (lambda d: d.update(schema_version="1"), UnsupportedSchemaVersion, "schema_version '1'"),
        (lambda d: d.pop("schema_version"), UnsupportedSchemaVersion, "no schema_version"),
        (lambda d: d.pop("dtype"), SchemaError, "missing field 'dtype'"),
        (lambda d: d.update(colour="blue"), SchemaError, "unknown field 'colour'"),
        (lambda d: d["solver"].update(order=2), SchemaError, "unknown field 'solver.order'"),
        (lambda d: d["teacher"].pop("fingerprint"), SchemaError, "missing field 'teacher.fingerprint'"),
        (lambda d: d["solver"].update(num_steps="8"), SchemaError, "'solver.num_steps' must be an integer"),
        (lambda d: d["solver"].update(num_steps=True), SchemaError, "'solver.num_steps' must be an integer"),
        (lambda d: d["solver"].update(name="rk4"), SchemaError, "'solver.name' must be one of"),
        (lambda d: d.update(dtype="float64"), SchemaError, "'dtype' must be one of"),
        (lambda d: d.update(sample_shape=[4, 0, 8]), SchemaError, "'sample_shape[1]' must be >= 1"),
        (lambda d: d.update(saved_sigmas=[1.0, 0.123, 0.0]), SchemaError, "'saved_sigmas[1]'"),
        (
            lambda d: d.update(saved_sigmas=d["saved_sigmas"][::-1]),
            SchemaError,
            "'saved_sigmas' must start at 1.0",
        ),
        (
            lambda d: d.update(saved_sigmas=d["saved_sigmas"][:-1]),
            SchemaError,
            "'saved_sigmas' must end at 0.0",
        ),
        (lambda d: d["solver"].update(sigmas=d["solver"]["sigmas"][:-2]), SchemaError, "num_steps + 1 = 9"),
        (lambda d: d["solver"].update(guidance={"min": 5.0, "max": 1.0}), SchemaError, "min <= max"),
        (lambda d: d["solver"].update(guidance="high"), SchemaError, "'solver.guidance' must be a number"),
        (lambda d: d["conditioning"].pop("num_classes"), SchemaError, "'conditioning.num_classes'"),
        (
            lambda d: d.update(conditioning={"kind": "none", "num_classes": 3}),
            SchemaError,
            "only allowed with kind 'class'",
        ),
        (lambda d: d["run"].pop("base_seed"), SchemaError, "missing field 'run.base_seed'"),
        (lambda d: d.update(stages=[8, 4, 2]), SchemaError, "finest window count 8"),
        (lambda d: d.update(stages=[4, 3]), SchemaError, "each stage dividing the previous"),
        (lambda d: d.update(created_by=""), SchemaError, "'created_by' must be a non-empty string"),
    ],
)
def test_card_rejects_bad_documents_naming_the_field(mutate, error, needle):
    document = card_dict()
    mutate(document)
    with pytest.raises(error) as caught:
        DatasetCard.from_json(json.dumps(document))
    assert needle in str(caught.value)
    assert "dataset.json" in str(caught.value)


def test_card_version_error_says_found_and_supported():
    document = card_dict()
    document["schema_version"] = 99
    with pytest.raises(UnsupportedSchemaVersion) as caught:
        DatasetCard.from_json(json.dumps(document))
    assert caught.value.found == 99 and caught.value.supported == (1,)
    assert "99" in str(caught.value) and "reads schema_version 1" in str(caught.value)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"schema_version": NaN}', b"\xff\xfe\x00"])
def test_card_rejects_unparseable_text(text):
    with pytest.raises(CorpusFormatError, match="dataset.json"):
        DatasetCard.from_json(text)


# --------------------------------------------------------------------------------------------------
# sample record


@pytest.mark.parametrize(
    ("dtype", "sample_shape"), [("float32", [4, 8, 8]), ("bfloat16", [4, 8, 8]), ("float16", [2])]
)
def test_record_round_trip(dtype, sample_shape):
    card = make_card(dtype=dtype, sample_shape=sample_shape)
    record = make_record(3, card, prompt="a ring of eight gaussians", prompt_id=17)
    members = ss.encode_sample(record)
    assert sorted(members) == ["json", "traj.safetensors"]
    decoded = ss.decode_sample(record.key, members, card)
    assert_same_record(record, decoded)
    assert decoded.states.shape == (5, *sample_shape)
    assert decoded.sigmas.dtype == torch.float32
    assert (decoded.index, decoded.seed, decoded.guidance) == (3, 1237, 2.5)
    assert ss.encode_sample(decoded) == members  # encoding is deterministic


def test_sample_keys():
    assert ss.sample_key(42) == "0000000042"
    assert ss.validate_key("0000000042") == "0000000042"
    for bad in ["", "a.b", "a/b", "..", "../x", "clé", "a b", 5]:
        with pytest.raises(SchemaError, match="invalid sample key"):
            ss.validate_key(bad)
    with pytest.raises(SchemaError, match="index"):
        ss.sample_key(-1)


def safetensors_member(states: torch.Tensor, sigmas: torch.Tensor, **extra: torch.Tensor) -> bytes:
    return safetensors.torch.save({"states": states, "sigmas": sigmas, **extra})


def members_with(record: SampleRecord, **replace: bytes) -> dict[str, bytes]:
    members = ss.encode_sample(record)
    members.update({k.replace("_", "."): v for k, v in replace.items()})
    return members


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_decode_rejects_non_finite_states_naming_the_key(bad_value):
    card = make_card()
    record = make_record(1, card)
    states = record.states.clone()
    states[2, 0, 3, 3] = bad_value
    members = members_with(record, traj_safetensors=safetensors_member(states, record.sigmas))
    with pytest.raises(NonFiniteError) as caught:
        ss.decode_sample(record.key, members, card, shard_id=SHARD)
    assert "'0000000001'" in str(caught.value) and SHARD in str(caught.value)
    assert "1 non-finite" in str(caught.value)


def test_decode_checks_the_record_against_the_card():
    card = make_card()
    record = make_record(1, card)

    wrong_shape = safetensors_member(torch.zeros(5, 4, 8, 4), record.sigmas)
    with pytest.raises(ShapeMismatchError, match=r"\[5, 4, 8, 4\].*\[5, 4, 8, 8\]"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_shape), card)

    wrong_k = safetensors_member(torch.zeros(3, 4, 8, 8), torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ShapeMismatchError, match=r"\[3, 4, 8, 8\]"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_k), card)

    wrong_dtype = safetensors_member(record.states.to(torch.float16), record.sigmas)
    with pytest.raises(SchemaError, match="dtype float16 does not match the card's dtype float32"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_dtype), card)

    other_sigmas = record.sigmas.clone()
    other_sigmas[2] = 0.61
    wrong_sigmas = safetensors_member(record.states, other_sigmas)
    with pytest.raises(SchemaError, match=r"'sigmas\[2\]' = 0.6.* saved_sigmas\[2\]"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_sigmas), card)

    # Without the card those records are self-consistent and decode.
    ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_sigmas))


@pytest.mark.parametrize(
    ("meta_change", "needle"),
    [
        ({"class_id": 10}, "'class_id' must be <= 9"),
        ({"guidance": 7.5}, "'guidance' = 7.5 is not allowed"),
    ],
)
def test_decode_checks_metadata_against_the_card(meta_change, needle):
    card = make_card()
    record = make_record(2, card, **meta_change)
    with pytest.raises(SchemaError, match=needle):
        ss.decode_sample(record.key, ss.encode_sample(record), card)


def meta_bytes(**meta) -> bytes:
    return json.dumps(meta).encode()


@pytest.mark.parametrize(
    ("replace", "error", "needle"),
    [
        ({"json": meta_bytes(index=1, guidance=1.0)}, SchemaError, "missing field 'seed'"),
        ({"json": meta_bytes(index=1, seed="7", guidance=1.0)}, SchemaError, "'seed' must be an integer"),
        (
            {"json": meta_bytes(index=2, seed=7, guidance=1.0)},
            SchemaError,
            "sample_key(index) = '0000000002'",
        ),
        ({"json": b"{oops"}, CorpusFormatError, "not valid JSON"),
        ({"json": b"[]"}, SchemaError, "must be a JSON object"),
        (
            {"traj.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"},
            CorpusFormatError,
            "safetensors",
        ),
    ],
)
def test_decode_rejects_bad_members(replace, error, needle):
    record = make_record(1, make_card())
    members = ss.encode_sample(record)
    members.update(replace)
    with pytest.raises(error) as caught:
        ss.decode_sample(record.key, members)
    assert needle in str(caught.value) and "'0000000001'" in str(caught.value)


def test_decode_rejects_unknown_or_missing_tensors_and_members():
    record = make_record(1, make_card())
    extra = safetensors_member(record.states, record.sigmas, noise=torch.zeros(2))
    with pytest.raises(SchemaError, match=r"unknown \['noise'\]"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=extra))
    missing = safetensors.torch.save({"states": record.states})
    with pytest.raises(SchemaError, match=r"missing \['sigmas'\]"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=missing))
    wrong_sigma_dtype = safetensors_member(record.states, record.sigmas.double())
    with pytest.raises(SchemaError, match="'sigmas' must be stored as float32"):
        ss.decode_sample(record.key, members_with(record, traj_safetensors=wrong_sigma_dtype))
    with pytest.raises(SchemaError, match=r"missing member '0000000001.traj.safetensors'"):
        ss.decode_sample(record.key, {"json": ss.encode_sample(record)["json"]})
    with pytest.raises(UnsafeMemberError, match=r"'0000000001.pickle'"):
        ss.decode_sample(record.key, {**ss.encode_sample(record), "pickle": b"\x80\x04N."})


def test_record_construction_validates():
    card = make_card()
    good = make_record(0, card)
    with pytest.raises(ShapeMismatchError, match=r"'sigmas' must have shape \[K\] = \[5\]"):
        SampleRecord(key=good.key, states=good.states, sigmas=[1.0, 0.0], meta=good.meta)
    with pytest.raises(SchemaError, match="strictly decreasing"):
        SampleRecord(key=good.key, states=good.states, sigmas=[1.0, 0.5, 0.5, 0.2, 0.0], meta=good.meta)
    with pytest.raises(SchemaError, match="'states' dtype"):
        SampleRecord(key=good.key, states=good.states.double(), sigmas=good.sigmas, meta=good.meta)
    with pytest.raises(SchemaError, match="plain JSON"):
        SampleRecord(key=good.key, states=good.states, sigmas=good.sigmas, meta={**good.meta, "x": object()})


# --------------------------------------------------------------------------------------------------
# shards


def test_shard_round_trip_and_byte_identical_rewrites():
    card = make_card()
    records = make_records(card, start=8, count=4)
    first = ss.write_shard_bytes(records, card)
    second = ss.write_shard_bytes(make_records(card, start=8, count=4), card)
    assert first == second
    decoded = list(ss.iter_shard_samples(first, SHARD, card))
    assert [r.key for r in decoded] == [r.key for r in records]
    for original, back in zip(records, decoded, strict=True):
        assert_same_record(original, back)
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(first))]
    assert names[:2] == ["0000000008.json", "0000000008.traj.safetensors"]
    headers = {
        (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tarfile.open(fileobj=io.BytesIO(first))
    }
    assert headers == {(0, 0, 0, "trajflow", "trajflow", 0o444)}


def test_shard_written_to_a_file_is_read_by_plain_webdataset(tmp_path: Path):
    card = make_card()
    records = make_records(card, count=6)
    shard_file = tmp_path / "shard-000000.tar"
    shard_file.write_bytes(ss.write_shard_bytes(records))
    samples = list(webdataset.WebDataset(str(shard_file), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r.key for r in records]
    for sample, record in zip(samples, records, strict=True):
        tensors = safetensors.torch.load(sample["traj.safetensors"])
        assert tensors["states"].shape == (5, 4, 8, 8)
        assert torch.equal(tensors["states"], record.states)
        assert json.loads(sample["json"])["index"] == record.index
    with shard_file.open("rb") as stream:  # and our reader streams from a file object
        assert [r.key for r in ss.iter_shard_samples(stream, SHARD, card)] == [r.key for r in records]


def test_large_shard_streams_from_a_file_object():
    card = make_card()
    data = ss.write_shard_bytes(make_records(card, count=40))  # ~220 KB: more than the reader's tail window
    assert sum(1 for _ in ss.iter_shard_members(io.BytesIO(data), SHARD)) == 40
    with pytest.raises(CorpusFormatError, match="no end-of-archive marker"):
        list(ss.iter_shard_members(io.BytesIO(data[: member_end_offset(data, 20)]), SHARD))


def test_writer_refuses_duplicates_empty_shards_and_card_mismatches():
    card = make_card()
    record = make_record(0, card)
    with pytest.raises(SchemaError, match="duplicate sample key '0000000000'"):
        ss.write_shard_bytes([record, record])
    with pytest.raises(SchemaError, match="at least one sample"):
        ss.write_shard_bytes([])
    with pytest.raises(SchemaError, match="dtype"):
        ss.write_shard_bytes([record], make_card(dtype="bfloat16"))


class CreatesFileWhenUnpickled:
    """A real pickle payload with a side effect: unpickling it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_member_is_rejected_and_never_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled.txt"
    payload = pickle.dumps(CreatesFileWhenUnpickled(marker))
    card = make_card()
    good = [make_record(0, card), make_record(1, card)]
    pickle_info = tarfile.TarInfo("0000000001.pickle")
    data = tar_bytes(sample_entries(good[0]) + [(pickle_info, payload)] + sample_entries(good[1]))

    with pytest.raises(UnsafeMemberError) as caught:
        list(ss.iter_shard_samples(data, SHARD, card))
    assert caught.value.member == "0000000001.pickle" and caught.value.shard_id == SHARD
    assert "'0000000001.pickle'" in str(caught.value) and SHARD in str(caught.value)

    unsafe: list[UnsafeMemberError] = []
    decoded = list(ss.iter_shard_samples(data, SHARD, card, collect_unsafe=unsafe))
    assert [r.key for r in decoded] == ["0000000000", "0000000001"]
    assert [e.member for e in unsafe] == ["0000000001.pickle"]
    assert not marker.exists()


def regular(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"{}"


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (regular("0000000001.pt"), "suffix 'pt'"),
        (regular("0000000001.npy"), "suffix 'npy'"),
        (regular("0000000001.pyd"), "suffix 'pyd'"),
        (regular("0000000001.traj.safetensors.pickle"), "suffix 'traj.safetensors.pickle'"),
        (regular("../../x"), "path traversal"),
        (regular("../../0000000001.json"), "path traversal"),
        (regular("/etc/0000000001.json"), "absolute path"),
        (regular("/0000000001.json"), "absolute path"),
        (regular("sub/0000000001.json"), "nested path"),
        (regular("0000000001"), "no '.<suffix>'"),
        (regular("bad key.json"), "invalid sample key"),
        (special("0000000001.json", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link (to '/etc/passwd')"),
        (special("0000000001.json", tarfile.LNKTYPE, "0000000000.json"), "hard link"),
        (special("0000000001", tarfile.DIRTYPE), "directory"),
        (special("0000000001.json", tarfile.CHRTYPE), "device file"),
        (special("0000000001.json", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_unsafe_members_are_named_and_rejected(entry, needle):
    good = make_record(0, make_card())
    data = tar_bytes(sample_entries(good) + [entry])
    with pytest.raises(UnsafeMemberError) as caught:
        list(ss.iter_shard_members(data, SHARD))
    assert needle in str(caught.value)
    assert repr(entry[0].name) in str(caught.value) and SHARD in str(caught.value)
    unsafe: list[UnsafeMemberError] = []
    assert [k for k, _ in ss.iter_shard_members(data, SHARD, collect_unsafe=unsafe)] == ["0000000000"]
    assert len(unsafe) == 1


def member_end_offset(data: bytes, count: int) -> int:
    """Byte offset just past the payload of the ``count``-th member."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmembers()[count - 1]
    return info.offset_data + -(-info.size // 512) * 512


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[: member_end_offset(d, 4)], "no end-of-archive marker"),
        (lambda d: d[: member_end_offset(d, 4) + 100], "truncated"),
        (lambda d: b"\x07" + d[1:], "truncated or corrupt"),  # first header's checksum no longer matches
        (
            lambda d: d[: member_end_offset(d, 2)] + b"x" * 512 + d[member_end_offset(d, 2) + 512 :],
            "corrupt tar",
        ),
        (lambda d: d + b"trailing garbage", "non-zero data after the end-of-archive"),
        (lambda d: b"", "not a readable tar"),
        (lambda d: b"this is not a tar file at all" * 40, "not a readable tar"),
    ],
)
def test_truncated_or_corrupt_shards_are_format_errors(damage, needle):
    data = ss.write_shard_bytes(make_records(make_card(), count=3))
    with pytest.raises(CorpusFormatError) as caught:
        list(ss.iter_shard_samples(damage(data), SHARD))
    assert needle in str(caught.value) and SHARD in str(caught.value)


def test_members_of_a_sample_must_be_consecutive():
    card = make_card()
    a, b = make_record(0, card), make_record(1, card)
    entries_a, entries_b = sample_entries(a), sample_entries(b)
    data = tar_bytes([entries_a[0], entries_b[0], entries_a[1], entries_b[1]])
    with pytest.raises(SchemaError, match="'0000000000' appears again"):
        list(ss.iter_shard_members(data, SHARD))


# --------------------------------------------------------------------------------------------------
# commit records and the manifest


def make_commit(number: int, **overrides) -> ShardCommit:
    fields = dict(
        shard_id=ss.shard_id(number),
        path=ss.shard_relpath(ss.shard_id(number)),
        sha256=f"{number:064x}",
        num_bytes=30720,
        num_samples=4,
        first_index=4 * number,
        last_index=4 * number + 3,
        seed=1234 + 4 * number,
        card_fingerprint=make_card().fingerprint(),
        committed_at="2025-01-31T12:00:00+00:00",
    )
    fields.update(overrides)
    return ShardCommit(**fields)


def test_commit_round_trip():
    commit = make_commit(3)
    assert commit.path == "shards/shard-000003.tar"
    assert ShardCommit.from_json(commit.to_json()) == commit
    assert json.loads(commit.to_json())["schema_version"] == ss.SCHEMA_VERSION
    assert ShardCommit(**{**commit.to_dict(), "committed_at": ss.utc_now_iso()}).shard_id == "shard-000003"


def commit_dict() -> dict:
    return make_commit(3).to_dict()


@pytest.mark.parametrize(
    ("mutate", "error", "needle"),
    [
        (lambda d: d.update(schema_version=2), UnsupportedSchemaVersion, "schema_version 2"),
        (lambda d: d.pop("schema_version"), UnsupportedSchemaVersion, "no schema_version"),
        (lambda d: d.pop("sha256"), SchemaError, "missing field 'sha256'"),
        (lambda d: d.update(uploaded_by="me"), SchemaError, "unknown field 'uploaded_by'"),
        (lambda d: d.update(num_bytes="30720"), SchemaError, "'num_bytes' must be an integer"),
        (lambda d: d.update(sha256="ABC"), SchemaError, "'sha256' must be 64 lowercase hex"),
        (lambda d: d.update(num_samples=5), SchemaError, "num_samples 5 does not match"),
        (lambda d: d.update(path="../../etc/passwd"), SchemaError, "invalid relative path"),
        (lambda d: d.update(path="s3://other/bucket.tar"), SchemaError, "invalid relative path"),
        (lambda d: d.update(shard_id="shard-3"), SchemaError, "invalid shard id 'shard-3'"),
        (lambda d: d.update(committed_at="2025-01-31 12:00"), SchemaError, "'committed_at'"),
        (lambda d: d.update(seed=-1), SchemaError, "'seed' must be >= 0"),
    ],
)
def test_commit_rejects_bad_documents(mutate, error, needle):
    document = commit_dict()
    mutate(document)
    with pytest.raises(error, match="commit record") as caught:
        ShardCommit.from_json(json.dumps(document))
    assert needle in str(caught.value)


def test_manifest_round_trip_sorted_by_shard_number():
    commits = [make_commit(n) for n in (12, 0, 1_000_000, 3)]
    data = ss.manifest_to_parquet_bytes(commits)
    back = ss.manifest_from_parquet_bytes(data)
    assert [c.shard_id for c in back] == ["shard-000000", "shard-000003", "shard-000012", "shard-1000000"]
    assert back == sorted(commits, key=lambda c: ss.shard_number(c.shard_id))
    table = pq.read_table(pa.BufferReader(data))
    assert table.schema.metadata[b"schema_version"] == b"1"
    assert table.column_names == ss.MANIFEST_SCHEMA.names
    assert ss.manifest_from_parquet_bytes(ss.manifest_to_parquet_bytes([])) == []


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def manifest_table() -> pa.Table:
    return pq.read_table(pa.BufferReader(ss.manifest_to_parquet_bytes([make_commit(0), make_commit(1)])))


def test_manifest_rejects_bad_files():
    with pytest.raises(CorpusFormatError, match="not a readable Parquet file"):
        ss.manifest_from_parquet_bytes(b"PAR1 but really just garbage bytes")
    table = manifest_table()

    without_seed = table.drop_columns(["seed"])
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['seed'\]"):
        ss.manifest_from_parquet_bytes(parquet_bytes(without_seed))

    extra = table.append_column("note", pa.array(["a", "b"]))
    with pytest.raises(SchemaError, match=r"unknown column\(s\) \['note'\]"):
        ss.manifest_from_parquet_bytes(parquet_bytes(extra))

    narrow = table.set_column(
        table.schema.get_field_index("seed"), "seed", table.column("seed").cast(pa.int32())
    )
    with pytest.raises(SchemaError, match="column 'seed' must be int64, found int32"):
        ss.manifest_from_parquet_bytes(parquet_bytes(narrow))

    with pytest.raises(UnsupportedSchemaVersion, match="schema_version '2'|schema_version 2"):
        ss.manifest_from_parquet_bytes(parquet_bytes(table.replace_schema_metadata({"schema_version": "2"})))
    with pytest.raises(UnsupportedSchemaVersion, match="no schema_version"):
        ss.manifest_from_parquet_bytes(parquet_bytes(table.replace_schema_metadata(None)))

    duplicated = pa.concat_tables([table, table.slice(0, 1)])
    with pytest.raises(SchemaError, match="'shard-000000' appears more than once"):
        ss.manifest_from_parquet_bytes(parquet_bytes(duplicated))

    traversal = table.set_column(1, "path", pa.array(["shards/shard-000000.tar", "../outside.tar"]))
    with pytest.raises(SchemaError, match="row 1.*invalid relative path '../outside.tar'"):
        ss.manifest_from_parquet_bytes(parquet_bytes(traversal))


# --------------------------------------------------------------------------------------------------
# layout, errors, import rule


def test_layout_paths():
    layout = CorpusLayout("s3://bucket/corpus/")
    assert layout.root == "s3://bucket/corpus"
    assert layout.card_path == "s3://bucket/corpus/dataset.json"
    assert layout.manifest_path == "s3://bucket/corpus/manifest.parquet"
    assert layout.shards_dir == "s3://bucket/corpus/shards"
    assert layout.commits_dir == "s3://bucket/corpus/commits"
    assert layout.shard_path("shard-000003") == "s3://bucket/corpus/shards/shard-000003.tar"
    assert layout.commit_path("shard-000003") == "s3://bucket/corpus/commits/shard-000003.json"
    assert layout.relative(layout.shard_path("shard-000003")) == "shards/shard-000003.tar"
    assert layout.relative("bucket/corpus/commits/shard-000003.json") == "commits/shard-000003.json"
    assert CorpusLayout("/data/c").card_path == "/data/c/dataset.json"
    assert ss.shard_id(3) == "shard-000003" and ss.shard_number("shard-000003") == 3
    with pytest.raises(ValueError, match="not below the corpus root"):
        layout.relative("s3://bucket/other/x.tar")
    for bad in ["shard-3", "shard-0000003", "shard_000003", "shard-00000a", "../shard-000003"]:
        with pytest.raises(SchemaError, match="invalid shard id"):
            ss.validate_shard_id(bad)
    with pytest.raises(ValueError):
        CorpusLayout("/")


def test_every_error_is_a_corpus_format_value_error():
    for error in (
        UnsupportedSchemaVersion,
        SchemaError,
        ShapeMismatchError,
        NonFiniteError,
        UnsafeMemberError,
    ):
        assert issubclass(error, CorpusFormatError) and issubclass(error, ValueError)
    # Structured errors survive a copy between processes (Ray transports exceptions).
    error = UnsafeMemberError("x.pickle", "suffix 'pickle'", SHARD)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_storage_schemas_imports_neither_ray_nor_upper_layers_nor_pickle():
    source = "\n".join(p.read_text() for p in Path(ss.__file__).parent.glob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle)\b", source, re.MULTILINE)
    assert not re.search(r"(?<!safetensors\.)torch\.load\(|numpy\.load\(|np\.load\(", source)
    code = (
        "import sys, storage_schemas; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'pipeline', 'trainer', 'trajflow'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_member_declaring_a_huge_size_is_rejected_before_reading():
    import tarfile

    from storage_schemas import UnsafeMemberError, iter_shard_members

    info = tarfile.TarInfo("0000000001.json")
    info.size = 1 << 40  # a forged header: 1 TiB, with no payload behind it
    data = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024
    with pytest.raises(UnsafeMemberError, match="limit"):
        list(iter_shard_members(data, "shard-000000"))


# --------------------------------------------------------------------------------------------------
# the fast path for shards held in memory (index_shard_members) vs the general (streaming) reader


def read_both_ways(data: bytes) -> tuple[object, object]:
    """What iter_shard_members gives for ``data`` as bytes (fast path) and as a file object (general
    reader): the samples, or the error type and message."""

    def run(source):
        try:
            return list(ss.iter_shard_members(source, SHARD))
        except CorpusFormatError as exc:
            return type(exc), str(exc)

    return run(data), run(io.BytesIO(data))


def test_fast_path_reads_a_written_shard_like_the_general_reader():
    from storage_schemas.shard import _fast_spans, index_shard_members

    data = ss.write_shard_bytes(make_records(make_card(), count=7))
    assert _fast_spans(data) is not None  # the writer's shards take the fast path
    fast, general = read_both_ways(data)
    assert fast == general and [k for k, _ in fast] == [ss.sample_key(i) for i in range(7)]
    spans = index_shard_members(data, SHARD)
    assert [(key, {s: data[o : o + n] for s, (o, n) in where.items()}) for key, where in spans] == general


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[: member_end_offset(d, 4)],
        lambda d: d[: member_end_offset(d, 4) + 100],
        lambda d: d[: member_end_offset(d, 4) + 512],  # the next header, then nothing of its payload
        lambda d: d[: member_end_offset(d, 6) + 100],  # after the last member, 100 of 512 zero bytes
        lambda d: b"\x07" + d[1:],
        lambda d: d[: member_end_offset(d, 2)] + b"x" * 512 + d[member_end_offset(d, 2) + 512 :],
        lambda d: d[:200] + b"\x01" + d[201:],  # one header byte changed: its checksum no longer matches
        lambda d: d + b"trailing garbage",
        lambda d: b"",
        lambda d: b"this is not a tar file at all" * 40,
    ],
)
def test_fast_path_and_general_reader_reject_damaged_shards_alike(damage):
    fast, general = read_both_ways(damage(ss.write_shard_bytes(make_records(make_card(), count=3))))
    assert isinstance(fast, tuple) and issubclass(fast[0], CorpusFormatError) and SHARD in fast[1]
    assert fast == general


def test_an_all_zero_tar_is_an_empty_shard_on_both_paths():
    assert read_both_ways(bytes(2048)) == ([], [])


def test_fast_path_defers_unusual_but_valid_tars_to_the_general_reader():
    """A pax header, a GNU-format header, a ustar name prefix, members out of order: the fast path
    hands them over; what comes out (samples or errors) is the general reader's."""
    from storage_schemas.shard import index_shard_members

    card = make_card()
    a, b = make_record(0, card), make_record(1, card)
    pax = tar_bytes(sample_entries(a) + sample_entries(b))
    info = tarfile.TarInfo("0000000002.json")
    info.pax_headers = {"comment": "a pax extended header"}
    pax_with_header = tar_bytes(sample_entries(a) + [(info, b"{}")])
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry, payload in sample_entries(a) + sample_entries(b):
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    shuffled = tar_bytes([sample_entries(a)[0], sample_entries(b)[0], sample_entries(a)[1]])
    from storage_schemas.shard import _fast_spans

    assert _fast_spans(pax) is not None and _fast_spans(gnu.getvalue()) is not None  # plain headers
    assert _fast_spans(pax_with_header) is None and _fast_spans(shuffled) is None
    for data in (pax, pax_with_header, gnu.getvalue(), shuffled):
        fast, general = read_both_ways(data)
        assert fast == general
        if isinstance(general, list):
            spans = index_shard_members(data, SHARD)
            assert [(k, {s: data[o : o + n] for s, (o, n) in w.items()}) for k, w in spans] == general
    assert [k for k, _ in read_both_ways(pax_with_header)[0]] == ["0000000000", "0000000002"]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (regular("0000000001.pt"), "suffix 'pt'"),
        (regular("../../0000000001.json"), "path traversal"),
        (regular("/0000000001.json"), "absolute path"),
        (regular("sub/0000000001.json"), "nested path"),
        (special("0000000001.json", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special("0000000001.json", tarfile.LNKTYPE, "0000000000.json"), "hard link"),
        (special("0000000001", tarfile.DIRTYPE), "directory"),
        (special("0000000001.json", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_index_shard_members_rejects_unsafe_members(entry, needle):
    from storage_schemas.shard import index_shard_members

    data = tar_bytes(sample_entries(make_record(0, make_card())) + [entry])
    with pytest.raises(UnsafeMemberError, match=re.escape(needle)):
        index_shard_members(data, SHARD)
    fast, general = read_both_ways(data)
    assert fast == general and fast[0] is UnsafeMemberError


def test_index_shard_members_rejects_a_huge_declared_size():
    from storage_schemas.shard import index_shard_members

    info = tarfile.TarInfo("0000000001.json")
    info.size = 1 << 40  # base-256 in a GNU header
    with pytest.raises(UnsafeMemberError, match="limit"):
        index_shard_members(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024, SHARD)
    info.size = (1 << 30) + 1  # still octal: the fast path itself must refuse it
    with pytest.raises(UnsafeMemberError, match="limit"):
        index_shard_members(info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 1024, SHARD)


def test_decode_skips_only_a_json_round_trip_that_changes_nothing():
    """Decoding parses metadata once; what the record holds and rejects is what SampleRecord gives."""
    card = make_card()
    record = make_record(1, card)
    members = ss.encode_sample(record)
    unsorted = {"seed": record.seed, "index": 1, "guidance": record.guidance, "class_id": 1, "note": {"b": 1, "a": [2]}}
    members["json"] = json.dumps(unsorted).encode()
    decoded = ss.decode_sample(record.key, members, card)
    constructed = SampleRecord(key=record.key, states=record.states, sigmas=record.sigmas, meta=unsorted)
    assert decoded.meta == constructed.meta and list(decoded.meta) == list(constructed.meta) == sorted(unsorted)
    assert list(decoded.meta["note"]) == ["a", "b"]
    members["json"] = b'{"class_id":1,"guidance":2.0,"index":1,"seed":7,"x":1e999}'  # parses to inf
    with pytest.raises(SchemaError, match="plain JSON"):
        ss.decode_sample(record.key, members, card)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_states_whose_sum_overflows_still_decode_and_nan_is_caught(dtype):
    card = make_card(dtype={torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype])
    record = make_record(1, card)
    big = torch.full(record.states.shape, torch.finfo(dtype).max, dtype=dtype)  # finite; the sum is not
    members = ss.encode_sample(SampleRecord(key=record.key, states=big, sigmas=record.sigmas, meta=record.meta))
    assert torch.equal(ss.decode_sample(record.key, members, card).states, big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        states = record.states.clone()
        states[0, 0, 0, 0] = bad
        members["traj.safetensors"] = safetensors.torch.save({"states": states, "sigmas": record.sigmas})
        with pytest.raises(NonFiniteError, match="1 non-finite value"):
            ss.decode_sample(record.key, members, card)


def shard_of(samples) -> bytes:
    """A tar of ``samples`` [(key, {suffix: payload})], members as given (bad ones included)."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, compress=False, mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    return buffer.getvalue()


def decoded_like_decode_sample(data: bytes, card, shard_id=SHARD) -> tuple[list, torch.Tensor]:
    """(results, states rows) of the loader's decoder (decode_spans_into) over the shard ``data``, checked
    against decode_sample (the reference decoder) sample by sample: the same metadata and tensors, or the
    same error."""
    from storage_schemas.record import decode_spans_into
    from storage_schemas.shard import index_shard_members, iter_shard_members

    spans = index_shard_members(data, shard_id)
    samples = list(iter_shard_members(data, shard_id))
    states = torch.full((len(spans), *card.states_shape), 7.0)
    sigmas = torch.full((len(spans), len(card.saved_sigmas)), 7.0)
    got = decode_spans_into(data, spans, card, states, sigmas, shard_id=shard_id)
    assert len(got) == len(samples) == len(spans)
    for j, ((key, members), result) in enumerate(zip(samples, got)):
        try:
            expected = ss.decode_sample(key, members, card, shard_id=shard_id)
        except CorpusFormatError as exc:
            assert type(result) is type(exc) and str(result) == str(exc)
            continue
        assert isinstance(result, dict)
        assert result == expected.meta and list(result) == list(expected.meta)
        assert torch.equal(states[j], expected.states.float()) and torch.equal(sigmas[j], expected.sigmas)
    return got, states


def decoded_ok(got: list) -> list[bool]:
    return [not isinstance(r, CorpusFormatError) for r in got]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_spans_into_equals_decode_sample_for_good_and_bad_samples(dtype):
    card = make_card(dtype=dtype)
    records = make_records(card, count=12)
    samples = [(r.key, ss.encode_sample(r)) for r in records]

    def with_states(i, change):
        states = records[i].states.clone()
        change(states)
        samples[i][1]["traj.safetensors"] = safetensors.torch.save({"states": states, "sigmas": records[i].sigmas})

    with_states(2, lambda s: s.view(-1).__setitem__(7, float("nan")))
    with_states(3, lambda s: s.view(-1).__setitem__(0, float("-inf")))
    sigmas = records[4].sigmas.clone()
    sigmas[1] += 0.01  # disagrees with the card (same layout)
    samples[4][1]["traj.safetensors"] = safetensors.torch.save({"states": records[4].states, "sigmas": sigmas})
    samples[5][1]["json"] = b'{"class_id":99,"guidance":2.5,"index":5,"seed":1239}'  # class out of range
    samples[6][1]["json"] = b'{"class_id":6,"guidance":2.5,"index":7,"seed":1240}'  # key is not index 7's
    samples[7][1]["json"] = json.dumps({"seed": 1241, "index": 7, "guidance": 2.5, "class_id": 7}).encode("utf-16")
    samples[8] = (samples[8][0], {"json": samples[8][1]["json"]})  # no tensors
    samples[9][1]["json"] = b'{"class_id":9,"guidance":2.5,"index":9,"seed":1243,"z":{"b":1,"a":2}}'
    samples[10][1]["traj.safetensors"] = safetensors.torch.save(  # a layout of its own, still valid
        {"states": records[10].states, "sigmas": records[10].sigmas}, metadata={"note": "x"})
    got, _ = decoded_like_decode_sample(shard_of(samples), card)
    assert decoded_ok(got) == [True, True, False, False, False, False, False, True, False, True, True, True]


def test_decode_spans_into_does_not_trust_a_bad_first_sample_of_a_layout():
    card = make_card()
    records = make_records(card, count=4)
    samples = [(r.key, ss.encode_sample(r)) for r in records]
    samples[0][1]["json"] = b"{oops"
    got, _ = decoded_like_decode_sample(shard_of(samples), card)
    assert decoded_ok(got) == [False, True, True, True]
    states = torch.full(card.states_shape, float(torch.finfo(torch.float32).max))  # finite, sum overflows
    samples[2][1]["traj.safetensors"] = safetensors.torch.save({"states": states, "sigmas": records[2].sigmas})
    got, rows = decoded_like_decode_sample(shard_of(samples), card)
    assert decoded_ok(got)[2] and torch.equal(rows[2], states)


def test_decode_spans_into_from_a_real_shard():
    from storage_schemas.record import decode_spans_into

    card = make_card()
    data = ss.write_shard_bytes(make_records(card, count=9), card)
    got, rows = decoded_like_decode_sample(data, card)
    assert all(decoded_ok(got)) and len(got) == 9
    assert torch.equal(rows[3], make_record(3, card).states)
    empty = decode_spans_into(data, [], card, torch.empty((0, *card.states_shape)), torch.empty((0, 5)))
    assert empty == []


@pytest.mark.parametrize(
    "meta",
    [
        '{"class_id":3,"guidance":2,"index":3,"seed":1237}',  # an int guidance: becomes 2.0
        '{"class_id":3,"guidance":9.5,"index":3,"seed":1237}',  # not allowed by the card
        '{"class_id":true,"guidance":2.5,"index":3,"seed":1237}',
        '{"class_id":10,"guidance":2.5,"index":3,"seed":1237}',
        '{"class_id":3,"guidance":2.5,"index":3,"seed":-1}',
        '{"class_id":3,"guidance":2.5,"index":3,"seed":9223372036854775808}',
        '{"class_id":3,"guidance":2.5,"index":3.0,"seed":1237}',
        '{"guidance":2.5,"index":3,"seed":1237}',
        '{"class_id":3,"guidance":2.5,"index":3,"prompt":"x","seed":1237}',
        '{"seed":1237,"index":3,"guidance":2.5,"class_id":3}',
        '{"class_id":3,"guidance":2.5,"index":3,"seed":1237,"guidance":3.0}',
        '{"class_id":3,"guidance":NaN,"index":3,"seed":1237}',
    ],
)
def test_decode_spans_into_checks_metadata_like_decode_sample(meta):
    card = make_card()
    records = make_records(card, count=5)
    samples = [(r.key, ss.encode_sample(r)) for r in records]
    samples[3][1]["json"] = meta.encode()
    got, _ = decoded_like_decode_sample(shard_of(samples), card)
    assert all(ok for i, ok in enumerate(decoded_ok(got)) if i != 3)


# --------------------------------------------------------------------------------------------------
# the fast shard writers (write_shard_arrays, the ustar packer) against the original TarWriter path


def tarwriter_shard_bytes(records: list[SampleRecord]) -> bytes:
    """The shard bytes as first written: webdataset's TarWriter (through tarfile) over encode_sample."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, user="trajflow", group="trajflow", mode=0o444, mtime=0, encoder=False,
                              compress=False, format=tarfile.USTAR_FORMAT) as writer:
        for record in records:
            writer.write({"__key__": record.key, **ss.encode_sample(record)})
    return buffer.getvalue()


def solver_like_arrays(dtype: torch.dtype, count: int, shape=(4, 8, 8), start: int = 0, prompts: bool = False):
    """(states [N, K, *shape], sigmas [K], metas) as a worker hands them to the committer."""
    card = make_card()
    sigmas = torch.tensor(card.saved_sigmas, dtype=torch.float32)
    states = torch.randn((count, len(sigmas), *shape), generator=torch.Generator().manual_seed(count)).to(dtype)
    metas = []
    for i in range(start, start + count):
        meta = {"index": i, "seed": (i * 2654435761) % (2**63), "guidance": 1.5 + (i % 7) / 3}
        if prompts:  # prompt ids are ints or strings; texts may be any unicode, empty, or need escaping
            meta["prompt_id"] = i if i % 2 else f"p-{i}"
            meta["prompt"] = ["a cat", "", "naïve \"café\" \\ 東京 \U0001f600\n", "x" * 300][i % 4]
        else:
            meta["class_id"] = i % 10
        metas.append(meta)
    return states, sigmas, metas


def records_the_old_way(states, sigmas, metas) -> list[SampleRecord]:
    return [SampleRecord(ss.sample_key(m["index"]), states[i].clone(), sigmas, m) for i, m in enumerate(metas)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prompts", [False, True])
def test_write_shard_arrays_is_byte_identical_to_the_tarwriter_path(dtype, prompts):
    states, sigmas, metas = solver_like_arrays(dtype, count=13, start=40, prompts=prompts)
    before = json.dumps(metas)
    reference = tarwriter_shard_bytes(records_the_old_way(states, sigmas, metas))
    assert ss.shard.write_shard_arrays(states, sigmas, metas) == reference
    assert ss.write_shard_bytes(records_the_old_way(states, sigmas, metas)) == reference
    # it was the vectorised path that wrote it (the per-record fallback would give the same bytes)
    assert ss.record._encode_samples_fast(states, sigmas, metas) is not None
    assert json.dumps(metas) == before  # the caller's metadata is not touched
    decoded = list(ss.iter_shard_samples(reference, SHARD))
    assert [r.index for r in decoded] == list(range(40, 53))
    assert all(torch.equal(r.states, states[i]) for i, r in enumerate(decoded))
    assert [r.meta for r in decoded] == [dict(sorted(m.items())) for m in metas]


@pytest.mark.parametrize(
    "extra",
    [
        {"guidance": 3},  # an int guidance is stored as 3.0, as a record stores it
        {"note": None, "flag": True, "Zeta": -0.0, "big": 2**62},  # more plain fields, any order
        {"tags": ["a", 1, {"b": None}], "nested": {"z": 1, "a": [2.5]}},  # not flat: the general checks
    ],
)
def test_write_shard_arrays_handles_unusual_metadata_like_records(extra):
    states, sigmas, metas = solver_like_arrays(torch.float32, count=5)
    metas = [{**m, **extra} for m in metas]
    expected = tarwriter_shard_bytes(records_the_old_way(states, sigmas, metas))
    assert ss.shard.write_shard_arrays(states, sigmas, metas) == expected
    assert ss.record._encode_samples_fast(states, sigmas, metas) is not None


def test_write_shard_arrays_from_non_contiguous_states_and_odd_shapes():
    states, sigmas, metas = solver_like_arrays(torch.float32, count=6, shape=(3, 5, 7))
    view = states.transpose(2, 4).contiguous().transpose(2, 4)  # same values, not contiguous
    assert not view.is_contiguous()
    expected = tarwriter_shard_bytes(records_the_old_way(states, sigmas, metas))
    assert ss.shard.write_shard_arrays(view, sigmas, metas) == expected
    flat, sigmas, metas = solver_like_arrays(torch.bfloat16, count=3, shape=(2,))
    assert ss.shard.write_shard_arrays(flat, sigmas, metas) == tarwriter_shard_bytes(
        records_the_old_way(flat, sigmas, metas))


def error_of(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s, g, m: s[3, 2].view(-1).__setitem__(5, float("nan")),
        lambda s, g, m: s[4, 0].view(-1).__setitem__(0, float("inf")),
        lambda s, g, m: g.__setitem__(2, g[1]),  # not strictly decreasing
        lambda s, g, m: g.__setitem__(0, 1.5),  # out of [0, 1]
        lambda s, g, m: m[2].pop("seed"),
        lambda s, g, m: m[1].update(guidance=float("nan")),
        lambda s, g, m: m[1].update(guidance="2.5"),
        lambda s, g, m: m[3].update(index=-4),
        lambda s, g, m: m[3].update(class_id=True),
        lambda s, g, m: m[0].update(blob=object()),
    ],
)
def test_write_shard_arrays_refuses_what_records_refuse_with_the_same_error(damage):
    states, sigmas, metas = solver_like_arrays(torch.float32, count=6)
    damage(states, sigmas, metas)
    expected = error_of(lambda: ss.write_shard_bytes(records_the_old_way(states, sigmas, metas)))
    assert issubclass(expected[0], CorpusFormatError)
    assert error_of(lambda: ss.shard.write_shard_arrays(states, sigmas, metas)) == expected
    assert ss.record._encode_samples_fast(states, sigmas, metas) is None  # the records path decided


def test_write_shard_arrays_refuses_duplicates_empty_and_mismatched_inputs():
    states, sigmas, metas = solver_like_arrays(torch.float32, count=4)
    metas[2]["index"] = metas[1]["index"]
    with pytest.raises(SchemaError, match="duplicate sample key '0000000001'"):
        ss.shard.write_shard_arrays(states, sigmas, metas)
    with pytest.raises(SchemaError, match="at least one sample"):
        ss.shard.write_shard_arrays(states[:0], sigmas, [])
    with pytest.raises(ShapeMismatchError, match="one row per metadata"):
        ss.shard.write_shard_arrays(states[:3], sigmas, metas)
    _, _, fine = solver_like_arrays(torch.float32, count=4)
    with pytest.raises(SchemaError, match="'states' dtype"):
        ss.shard.write_shard_arrays(states.double(), sigmas, fine)
    # sigmas given as a list or in another float dtype are converted, as records convert them
    expected = tarwriter_shard_bytes(records_the_old_way(states, sigmas, fine))
    assert ss.shard.write_shard_arrays(states, sigmas.tolist(), fine) == expected
    assert ss.shard.write_shard_arrays(states, sigmas.double(), fine) == expected


@pytest.mark.parametrize("key_length", [10, 83, 84, 90])
def test_ustar_packer_matches_tarwriter_and_falls_back_for_long_names(key_length):
    # "<key>.traj.safetensors" is 100 bytes at key length 83: up to there a plain ustar header, beyond
    # it TarWriter (pax records) writes the shard
    samples = [("k" * (key_length - 1) + str(i), {"json": b'{"a":%d}' % i, "traj.safetensors": bytes(range(i * 50))})
               for i in range(3)]
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, user="trajflow", group="trajflow", mode=0o444, mtime=0, encoder=False,
                              compress=False, format=tarfile.USTAR_FORMAT) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    assert ss.shard._pack_shard(samples) == buffer.getvalue()
    plain = all(len(f"{key}.{suffix}") <= 100 for key, members in samples for suffix in members)
    assert plain == (key_length <= 83)
    assert (b"PaxHeader" in buffer.getvalue()) == (not plain)
