"""Reliability of the checkpoint store (issue 25, the store's half of F1, F5, F7, F8, F12).

Real parts only: checkpoints written by ``trainer.checkpoint.CheckpointStore`` and ``trainer.fsdp.save_sharded``
(two real gloo processes for the 2-rank files, this process's own 1-rank group for the live student), moto's
S3 server over HTTP, ``kill -9`` of real writer processes, and `trajflow train` in subprocesses.

- F1: a sharded checkpoint with one rank's file deleted (local, S3), with swapped chunk offsets or truncated is
  refused before anything is loaded, naming the file; a sound one loads exactly (2 ranks' files on 1 process).
- F5: every write is atomic (a writer killed at any moment leaves the old file or the new one, whole); a 0-byte
  or truncated best-weights / checkpoint file is a one-line ``CheckpointCorrupt`` naming it.
- F7: sound files of another student (``--lora-rank 4`` then ``8``) are a one-line ``CheckpointMismatch`` raised
  before torch.distributed.checkpoint runs; through `trajflow train`: one line naming lora_rank, no traceback.
- F8: ``checkpoints/owner.json`` is created create-only (local and S3): of two runs one proceeds, the other gets
  one line naming the owner; a dead or silent owner's lock is taken over.
- F12: a negative, non-integer or huge step and a 200,000-deep JSON document fall back to the previous
  checkpoint with a warning; staging folders a killed process left are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from trainer.checkpoint import (
    LATEST,
    OWNER,
    CheckpointCorrupt,
    CheckpointMismatch,
    CheckpointStore,
    RunLocked,
    clean_stale_temp,
    parse_json_bounded,
    safetensors_header,
    temp_name,
)

TRAJFLOW = str(Path(sys.executable).with_name("trajflow"))
PY = sys.executable
DEEP = b"[" * 200_000  # F12: a 200,000-deep document
BEST = "checkpoints/best/weights.safetensors"


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _run_py(code: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          cwd=str(Path(__file__).resolve().parents[1]))


# -- a full (DDP) checkpoint ----------------------------------------------------------------------------------
def _full_checkpoint(store: CheckpointStore, step: int, value: float = 0.0) -> None:
    torch.manual_seed(step)
    w = {"net.weight": torch.full((4, 3), float(step) + value), "net.bias": torch.arange(4.0)}
    opt = torch.optim.AdamW([torch.nn.Parameter(w["net.weight"].clone())], lr=1e-3)
    store.save(step, model=w, ema={k: v + 1 for k, v in w.items()}, optimizer=opt.state_dict(),
               state={"data": {"cursor": step}}, net_config={"width": 4})


def test_full_checkpoint_files_are_checked_and_named(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (2, 4):
        _full_checkpoint(store, step)
    ck = store.load_full("checkpoints/step-00000004")
    assert ck["state"]["step"] == 4 and torch.equal(ck["model"]["net.weight"], torch.full((4, 3), 4.0))
    step4 = tmp_path / "run" / "checkpoints" / "step-00000004"
    for name, damage in [("model.safetensors", lambda b: b[: len(b) // 2]), ("ema.safetensors", lambda b: b""),
                         ("rng.safetensors", lambda b: b[:5]), ("optimizer.pt", lambda b: b[: len(b) // 3]),
                         ("model.safetensors", lambda b: b + b"\0" * 8)]:
        f = step4 / name
        good = f.read_bytes()
        f.write_bytes(damage(good))
        with pytest.raises(CheckpointCorrupt) as e:
            store.load_full("checkpoints/step-00000004")
        assert e.value.path.endswith(f"step-00000004/{name}") and name in _one_line(e.value)
        f.write_bytes(good)
    (step4 / "model.safetensors").unlink()
    with pytest.raises(CheckpointCorrupt, match="model.safetensors is unusable: missing"):
        store.load_full("checkpoints/step-00000004")


@pytest.mark.parametrize("damage", ["empty", "half", "header"])
def test_best_weights_that_a_kill_truncated_are_one_line_naming_the_file(tmp_path, damage):
    store = CheckpointStore(str(tmp_path / "run"))
    store.write(BEST, st_save({"w": torch.ones(64, 8)}))
    assert torch.equal(store.read_weights(BEST)["w"], torch.ones(64, 8))
    f = tmp_path / "run" / BEST
    blob = f.read_bytes()
    f.write_bytes({"empty": b"", "half": blob[: len(blob) // 2], "header": blob[:40]}[damage])
    with pytest.raises(CheckpointCorrupt) as e:
        store.read_weights(BEST)
    assert "checkpoints/best/weights.safetensors" in _one_line(e.value) and "truncated" in str(e.value)


def test_safetensors_header_check_refuses_what_the_library_would_misread(tmp_path):
    good = st_save({"a": torch.ones(3), "b": torch.zeros(2, 2)})
    assert set(safetensors_header(good, "x")) == {"a", "b"}
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    header["a"]["data_offsets"] = [0, 8]  # a range that does not match F32 [3]
    raw = json.dumps(header).encode()
    forged = struct.pack("<Q", len(raw)) + raw + good[8 + n:]
    with pytest.raises(CheckpointCorrupt, match="does not match"):
        safetensors_header(forged, "forged.safetensors")
    with pytest.raises(CheckpointCorrupt, match="impossible"):
        safetensors_header(struct.pack("<Q", 1 << 60) + b"{}", "huge.safetensors")
    with pytest.raises(CheckpointCorrupt, match="nested deeper"):
        safetensors_header(struct.pack("<Q", len(DEEP)) + DEEP, "deep.safetensors")
    p = tmp_path / "t.safetensors"
    p.write_bytes(good[:-3])
    with pytest.raises(CheckpointCorrupt, match=r"t\.safetensors is unusable: truncated"):
        safetensors_header(str(p), str(p))


def test_a_writer_killed_at_any_moment_leaves_a_whole_file(tmp_path):
    """F5 live: poll the file's size while a process rewrites it, kill -9 it; never a partial file."""
    out = tmp_path / "run"
    store = CheckpointStore(str(out))
    store.write(BEST, st_save({"w": torch.zeros(1 << 20)}))
    sizes = {(out / BEST).stat().st_size}
    writer = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import sys, torch
        from safetensors.torch import save
        from trainer.checkpoint import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        blobs = [save({"w": torch.full((1 << 21,), float(i))}) for i in range(2)]
        print("ready", flush=True)
        i = 0
        while True:
            store.write("checkpoints/best/weights.safetensors", blobs[i % 2]); i += 1
        """), str(out)], stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    try:
        assert writer.stdout.readline().strip() == "ready"
        end = time.monotonic() + 2.0
        seen = set()
        while time.monotonic() < end:
            try:
                seen.add((out / BEST).stat().st_size)
            except FileNotFoundError:
                seen.add(-1)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    full = len(st_save({"w": torch.zeros(1 << 21)}))
    assert seen <= sizes | {full}, f"partial sizes observed: {sorted(seen - sizes - {full})}"
    assert store.read_weights(BEST)["w"].numel() in (1 << 20, 1 << 21)
    left = [p.name for p in (out / "checkpoints" / "best").iterdir() if p.name != "weights.safetensors"]
    removed = clean_stale_temp(str(out), tmp_dir=str(tmp_path / "no-such-tmp"))
    assert sorted(Path(p).name for p in removed) == sorted(left)  # the killed writer's temporary, if any
    assert [p.name for p in (out / "checkpoints" / "best").iterdir()] == ["weights.safetensors"]


# -- bounded JSON, steps, fallback -----------------------------------------------------------------------
def test_json_is_bounded_in_size_and_depth():
    with pytest.raises(CheckpointCorrupt, match="nested deeper"):
        parse_json_bounded(DEEP, "state.json")
    with pytest.raises(CheckpointCorrupt, match="nested deeper"):
        parse_json_bounded(json.dumps({"a": [[[[[1]]]]]}).encode(), "s.json", max_depth=4)
    with pytest.raises(CheckpointCorrupt, match="over the 10-byte limit"):
        parse_json_bounded(b'{"step": 12345}', "s.json", max_bytes=10)
    with pytest.raises(CheckpointCorrupt, match="not valid JSON"):
        parse_json_bounded(b"1" * 5000, "s.json")  # an integer over Python's digit limit


@pytest.mark.parametrize("where,doc", [
    ("state", DEEP), ("latest", DEEP), ("state", b'{"step": -7}'), ("latest", b'{"step": -7, "path": "checkpoints/step-00000004"}'),
    ("state", b'{"step": "4"}'), ("state", b'{"step": true}'), ("state", b'{"step": 4.0}'), ("state", b'{"step": 1e400}'),
    ("latest", b'{"step": 1000000000000000, "path": "checkpoints/step-00000004"}'), ("state", b'{"step": 2}'),
    ("latest", b'{"step": 2, "path": "checkpoints/step-00000004"}'), ("state", b'[4]'), ("state", b'{"step": 4, "extra": ["../x"]}'),
])
def test_unusable_state_or_latest_falls_back_with_a_warning(tmp_path, caplog, where, doc):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (2, 4):
        _full_checkpoint(store, step)
    rel = LATEST if where == "latest" else "checkpoints/step-00000004/state.json"
    (tmp_path / "run" / rel).write_bytes(doc)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        got = [(p["step"], s["step"]) for p, s in store.candidates()]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "\n" not in warned and (rel in warned or Path(rel).name in warned), warned
    if where == "state":
        assert got == [(2, 2)]  # the newest is skipped, naming its state.json
        assert store.latest() == {"step": 2, "path": "checkpoints/step-00000002"}
    else:
        assert got == [(4, 4), (2, 2)]  # latest.json unusable: every complete checkpoint, newest first
    assert store.load_full(store.latest()["path"])["state"]["step"] == got[0][0]


def test_candidates_are_the_committed_ones_newest_first(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    for step in (1, 2, 3):
        _full_checkpoint(store, step)
    (tmp_path / "run" / LATEST).write_text(json.dumps({"step": 2, "path": "checkpoints/step-00000002"}))  # 3 uncommitted
    (tmp_path / "run" / "checkpoints" / "step-00000001" / "state.json").unlink()  # 1 incomplete
    assert [p["step"] for p, _ in store.candidates()] == [2]
    assert CheckpointStore(str(tmp_path / "empty")).latest() is None


# -- sharded checkpoints ---------------------------------------------------------------------------------------
_SHARDED_WRITER = """
import os, sys, torch, torch.distributed as dist
from safetensors.torch import save_file
rank, world, folder, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
from trainer.fsdp import FSDP2, checkpoint_tensors, save_sharded
torch.manual_seed(0)
# rows per rank: 6 = 3 + 3 (an exact swap tiles), 5 = 3 + 2, 1 = 1 + an empty chunk
model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
fsdp = FSDP2("fp32", torch.device("cpu"))
fsdp.shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
for _ in range(2):
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
tensors, _ = checkpoint_tensors(model, opt, dict(model.named_parameters()), None)
save_sharded(tensors, folder)
full = fsdp.full_tensors(tensors, keep=rank == 0)
if rank == 0:
    save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(os.path.dirname(folder), "full.safetensors"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_rank_files(tmp_path_factory):
    """A sharded checkpoint written by 2 real gloo processes: (its folder, the full tensors it holds)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("two-rank")
    script = root / "writer.py"
    script.write_text(_SHARDED_WRITER)
    folder, store = root / "sharded", root / "store"
    procs = [subprocess.Popen([PY, str(script), str(r), "2", str(folder), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]),
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert sorted(f.name for f in folder.iterdir()) == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    return folder, load_file(str(root / "full.safetensors"))


@pytest.fixture(scope="module")
def live():
    """A 1-process FSDP2 setup (this process's own 1-rank gloo group): make(out_features of the first layer) ->
    the live sharded checkpoint tensors of a fresh model."""
    from trainer.fsdp import FSDP2, checkpoint_tensors

    fsdp = FSDP2("fp32", torch.device("cpu"))

    def make(width: int = 6) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 5), torch.nn.Linear(5, 1))
        fsdp.shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return checkpoint_tensors(model, opt, dict(model.named_parameters()), None)[0]

    yield make
    fsdp.close()


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in tensors.items()}


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_sound_two_rank_checkpoint_loads_exactly_on_one_process(two_rank_files, live):
    from trainer.fsdp import check_sharded, load_sharded

    folder, full = two_rank_files
    shapes = check_sharded(str(folder), world_size=2)
    assert shapes["model.0.weight"] == {"shape": [6, 3], "dtype": "F32"} and shapes["model.2.bias"]["shape"] == [1]
    tensors = live()
    load_sharded(tensors, str(folder), world_size=2)
    got = _full(tensors)
    assert got.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(got[k], full[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_rank_file_is_refused_before_anything_loads(two_rank_files, live, tmp_path, rank):
    """F1: one rank's file of the newest step deleted: refused naming it, the live tensors untouched."""
    from trainer.fsdp import load_sharded, shard_file_name

    folder = _copy(two_rank_files[0], tmp_path / "sharded")
    (folder / shard_file_name(rank)).unlink()
    tensors = live()
    before = _full(tensors)
    with pytest.raises(CheckpointCorrupt) as e:
        load_sharded(tensors, str(folder), world_size=2, where="s3://b/r1/checkpoints/step-00000004/sharded")
    assert _one_line(e.value).startswith(f"checkpoint file s3://b/r1/checkpoints/step-00000004/sharded/{shard_file_name(rank)}")
    after = _full(tensors)
    assert all(torch.equal(before[k], after[k]) for k in before)
    if rank == 0:  # the world size is then known from the highest rank present too
        with pytest.raises(CheckpointCorrupt, match=shard_file_name(0)):
            load_sharded(live(), str(folder))


def _rewrite_sharding_info(path: Path, edit) -> None:
    """Edit the DCP_SHARDING_INFO of a safetensors shard's header (``sthdr.py``), keeping the data."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
    edit(info)
    header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def test_tampered_offsets_and_truncated_shards_are_refused(two_rank_files, live, tmp_path):
    from trainer.fsdp import check_sharded, load_sharded, shard_file_name

    src = two_rank_files[0]
    swap = _copy(src, tmp_path / "swap")  # the F1 tamper variant: the two ranks' offsets swapped
    a, b = swap / shard_file_name(0), swap / shard_file_name(1)

    def set_offset(value):
        def edit(info):
            info["model.0.weight"]["saved_offsets"] = [value, 0]
        return edit
    _rewrite_sharding_info(a, set_offset(3))
    _rewrite_sharding_info(b, set_offset(0))
    with pytest.raises(CheckpointCorrupt, match="model.0.weight.*not where 2 ranks shard"):
        load_sharded(live(), str(swap), world_size=2)
    with pytest.raises(CheckpointCorrupt):  # the files alone (no live student) are refused too
        check_sharded(str(swap), world_size=2)
    out_of_range = _copy(src, tmp_path / "oor")
    _rewrite_sharding_info(out_of_range / shard_file_name(1), set_offset(40))
    with pytest.raises(CheckpointCorrupt, match="outside|not where"):
        load_sharded(live(), str(out_of_range), world_size=2)
    for cut in ("half", "header"):
        trunc = _copy(src, tmp_path / f"trunc-{cut}")
        f = trunc / shard_file_name(1)
        blob = f.read_bytes()
        f.write_bytes(blob[: len(blob) // 2] if cut == "half" else blob[:20])
        tensors = live()
        before = _full(tensors)
        with pytest.raises(CheckpointCorrupt) as e:
            load_sharded(tensors, str(trunc), world_size=2)
        assert shard_file_name(1) in _one_line(e.value) and "truncated" in str(e.value)
        assert all(torch.equal(before[k], v) for k, v in _full(tensors).items())
    stale = _copy(src, tmp_path / "stale")  # a 3-rank save's leftover beside a 2-rank one
    (stale / shard_file_name(2)).write_bytes((src / shard_file_name(1)).read_bytes())
    with pytest.raises(CheckpointCorrupt, match="leftover"):
        load_sharded(live(), str(stale), world_size=2)


def test_another_student_is_a_one_line_mismatch_before_dcp(two_rank_files, live):
    """F7 at the loader: sound files, another student (another width): one line, raised before DCP runs."""
    from trainer.fsdp import load_sharded

    tensors = live(width=8)
    before = _full(tensors)
    with pytest.raises(CheckpointMismatch) as e:
        load_sharded(tensors, str(two_rank_files[0]), world_size=2)
    msg = _one_line(e.value)
    assert "model.0.bias is 6 in the checkpoint, 8 in this run" in msg and "more differences" in msg and len(msg) < 160
    assert not isinstance(e.value, CheckpointCorrupt)
    assert all(torch.equal(before[k], v) for k, v in _full(tensors).items())
    extra = dict(live())
    extra["model.3.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointMismatch, match="lacks 1 of this run's tensors"):
        load_sharded(extra, str(two_rank_files[0]), world_size=2)


def test_sharded_checkpoint_on_s3_missing_object_is_refused(two_rank_files, live, s3_bucket):
    """F1 on S3: the folder uploaded through ``local_folder("w")``, one rank's object deleted."""
    import s3fs

    from trainer.fsdp import SHARDS_DIR, load_sharded, shard_file_name

    store = CheckpointStore(f"s3://{s3_bucket}/r1")
    rel = f"checkpoints/step-00000004/{SHARDS_DIR}"
    with store.local_folder(rel, "w") as folder:
        for f in two_rank_files[0].iterdir():
            Path(folder, f.name).write_bytes(f.read_bytes())
    with store.local_folder(rel, "r") as folder:
        tensors = live()
        load_sharded(tensors, folder, world_size=2, where=store.where(rel))
        assert torch.equal(_full(tensors)["model.0.weight"], two_rank_files[1]["model.0.weight"])
    s3fs.S3FileSystem().rm_file(f"{s3_bucket}/r1/{rel}/{shard_file_name(0)}")
    with store.local_folder(rel, "r") as folder, pytest.raises(CheckpointCorrupt) as e:
        load_sharded(live(), folder, world_size=2, where=store.where(rel))
    assert f"s3://{s3_bucket}/r1/{rel}/{shard_file_name(0)}" in _one_line(e.value)


# -- staging folders: atomic, and cleaned after a kill ---------------------------------------------------------
@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_local_folder_commits_whole_files_or_nothing(tmp_path, request, remote):
    out = f"s3://{request.getfixturevalue('s3_bucket')}/run" if remote else str(tmp_path / "run")
    store = CheckpointStore(out)
    rel = "checkpoints/step-00000002/sharded"
    with pytest.raises(RuntimeError), store.local_folder(rel, "w") as folder:
        Path(folder, "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert not store.exists(f"{rel}/shard-00001-model-00001-of-00001.safetensors")
    with store.local_folder(rel, "w") as folder:
        Path(folder, "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"whole")
        if not remote:  # staged beside the target, the target untouched until the block ends
            assert Path(folder).parent == tmp_path / "run" / "checkpoints" / "step-00000002"
            assert not (tmp_path / "run" / rel / "shard-00001-model-00001-of-00001.safetensors").exists()
    assert store.read(f"{rel}/shard-00001-model-00001-of-00001.safetensors") == b"whole"
    if not remote:
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-00000002").iterdir()) == ["sharded"]


def test_a_killed_ranks_staging_folder_is_removed_at_the_next_start(tmp_path, s3_bucket, monkeypatch):
    """F12: kill -9 during an S3 checkpoint upload leaves $TMPDIR/trajflow-ckpt-*; the next start removes it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    writer = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from trainer.checkpoint import CheckpointStore
        with CheckpointStore(sys.argv[1]).local_folder("checkpoints/step-00000002/sharded", "w") as folder:
            Path(folder, "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
            print(folder, flush=True)
            time.sleep(600)
        """), f"s3://{s3_bucket}/run"], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)},
        cwd=str(Path(__file__).resolve().parents[1]))
    try:
        staged = Path(writer.stdout.readline().strip())
        assert staged.parent == tmp and staged.name.startswith("trajflow-ckpt-") and staged.exists()
    finally:
        writer.kill()
        writer.wait()
    assert staged.exists()  # what the kill left
    legacy_old, legacy_new = tmp / "trajflow-ckpt-abc123", tmp / "trajflow-ckpt-def456"  # before pids were named
    legacy_old.mkdir()
    legacy_new.mkdir()
    os.utime(legacy_old, (time.time() - 7 * 3600,) * 2)
    alive = tmp / temp_name()  # this (live) process's
    alive.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    store = CheckpointStore(f"s3://{s3_bucket}/run")
    with store.local_folder("checkpoints/step-00000002/sharded", "r"):
        pass
    assert not staged.exists() and not legacy_old.exists()
    assert legacy_new.exists() and alive.exists()
    assert not store.exists("checkpoints/step-00000002/sharded/shard-00001-model-00001-of-00001.safetensors")


def test_local_staging_leftovers_of_a_dead_process_are_removed(tmp_path):
    out = tmp_path / "run"
    step = out / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    leftover = step / temp_name(".").replace(f"-{os.getpid()}-", f"-{dead}-")
    leftover.mkdir()
    (leftover / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"part")
    mine = step / temp_name(".")
    mine.mkdir()
    other_host = step / ".trajflow-ckpt-00000000-1-abc"
    other_host.mkdir()
    removed = clean_stale_temp(str(out), tmp_dir=str(tmp_path / "none"))
    assert removed == [str(leftover)] and mine.exists() and other_host.exists()
    os.utime(other_host, (time.time() - 7 * 3600,) * 2)
    assert clean_stale_temp(str(out), tmp_dir=str(tmp_path / "none")) == [str(other_host)]


# -- the run lock -----------------------------------------------------------------------------------------------
_CONTENDER = """
import sys, time
from pathlib import Path
from trainer.checkpoint import CheckpointStore, RunLocked
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
try:
    lock = CheckpointStore(sys.argv[1]).acquire_run_lock()
except RunLocked as e:
    print("lost", e, flush=True)
    sys.exit(1)
print("won", lock.run_id, flush=True)
time.sleep(3)
lock.release()
"""


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_of_two_runs_starting_together_exactly_one_owns_the_out(tmp_path, request, remote):
    """F8: two processes race for one --out: one proceeds, the other gets one line naming the owner."""
    out = f"s3://{request.getfixturevalue('s3_bucket')}/run" if remote else str(tmp_path / "run")
    go = tmp_path / "go"
    procs = [subprocess.Popen([PY, "-c", _CONTENDER, out, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=str(Path(__file__).resolve().parents[1])) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], results
    lost = next(o for (o, _), p in zip(results, procs) if p.returncode == 1).strip()
    won = next(o for (o, _), p in zip(results, procs) if p.returncode == 0).split()[1]
    assert lost.count("\n") == 0 and "is in use by another run" in lost and won[:12] in lost
    assert f"on host {socket.gethostname()}" in lost and "pid " in lost
    assert not CheckpointStore(out).exists(OWNER)  # released by the winner


def test_a_dead_or_silent_owner_is_taken_over_and_a_live_one_is_not(tmp_path, caplog):
    out = str(tmp_path / "run")
    store = CheckpointStore(out)
    holder = _run_py("""
        import os, sys
        from trainer.checkpoint import CheckpointStore
        CheckpointStore(sys.argv[1]).acquire_run_lock()
        os._exit(0)  # as a kill -9 would: the lock stays
        """, out)
    assert holder.returncode == 0, holder.stderr
    assert store.exists(OWNER)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        lock = store.acquire_run_lock()
    assert "has ended" in caplog.text and "taking over" in caplog.text
    owner = tmp_path / "run" / OWNER
    assert json.loads(owner.read_text())["run_id"] == lock.run_id
    other = {"run_id": "feedbeef" * 4, "host": "node-7.other", "pid": 4242, "started": time.time() - 50}
    owner.write_text(json.dumps({**other, "heartbeat": time.time() - 5}))  # another host, alive
    with pytest.raises(RunLocked) as e:
        store.acquire_run_lock()
    assert "feedbeef" in _one_line(e.value) and "node-7.other" in str(e.value) and "pid 4242" in str(e.value)
    with pytest.raises(RunLocked, match="taken over by run feedbeef"):
        lock.refresh()  # the first lock learns it lost its --out
    lock.release()
    assert json.loads(owner.read_text())["run_id"] == other["run_id"]  # not removed: not ours
    owner.write_text(json.dumps({**other, "heartbeat": time.time() - 3600}))  # silent for an hour
    with store.acquire_run_lock(stale_after=600) as again:
        assert json.loads(owner.read_text())["run_id"] == again.run_id
        time.sleep(0.01)
        before = json.loads(owner.read_text())["heartbeat"]
        again.refresh()
        assert json.loads(owner.read_text())["heartbeat"] > before
    assert not owner.exists()
    owner.write_text("{not json")  # an unreadable record is taken over too
    store.acquire_run_lock().release()


def test_s3_run_lock_takeover_is_conditional(s3_bucket):
    store = CheckpointStore(f"s3://{s3_bucket}/run")
    stale = json.dumps({"run_id": "a" * 32, "host": "gone-host", "pid": 1, "started": 0, "heartbeat": 0}).encode()
    store.write(OWNER, stale)
    lock = store.acquire_run_lock()
    assert store.read_json(OWNER)["run_id"] == lock.run_id
    raw, doc, etag = store._owner_read()
    fresh = json.dumps({"run_id": "b" * 32, "host": "live-host", "pid": 2, "started": time.time(),
                        "heartbeat": time.time()}).encode()
    store.write(OWNER, fresh)  # another run replaced it: a take-over conditioned on the old ETag must fail
    assert store._owner_swap(raw, etag, stale) is False
    assert store.read(OWNER) == fresh
    with pytest.raises(RunLocked, match="taken over by run bbbb"):
        lock.refresh()
    with pytest.raises(RunLocked, match="live-host"):
        store.acquire_run_lock()


# -- through `trajflow train` ------------------------------------------------------------------------------------
def _error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (libraries' warnings and progress bars aside)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("trajflow ") and " error: " in ln]


@pytest.fixture(scope="module")
def gmm_corpus(tmp_path_factory):
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    return generate_in_process(GenerateConfig(teacher="gmm:latent10", out=str(tmp_path_factory.mktemp("gmm") / "c"),
                                              num_trajectories=64, shard_size=32, num_steps=16, stages=(8, 4),
                                              guidance=2.0, progress=False))


def _train(data, out, *extra) -> subprocess.CompletedProcess:
    args = [TRAJFLOW, "train", "--data", data, "--out", str(out), "--stages", "8,4", "--batch-size", "16", "--init",
            "scratch", "--student-width", "32", "--student-depth", "1", "--no-progress", "--num-workers", "0",
            "--checkpoint-every", "1", "--eval-every", "0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["negative_step", "deep_state", "deep_latest"])
def test_train_resumes_from_the_previous_checkpoint_past_a_bad_step_or_deep_json(gmm_corpus, tmp_path, damage):
    """F12 through the CLI: no `step--0000002` folders, no RecursionError: a warning and the previous step."""
    out = tmp_path / "run"
    r = _train(gmm_corpus, out, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = out / "checkpoints"
    if damage == "negative_step":
        state = json.loads((ck / "step-00000003" / "state.json").read_text())
        (ck / "step-00000003" / "state.json").write_text(json.dumps({**state, "step": -7}))
    elif damage == "deep_state":
        (ck / "step-00000003" / "state.json").write_bytes(DEEP)
    else:
        (ck / "latest.json").write_bytes(DEEP)
    r = _train(gmm_corpus, out, "--max-steps", "4")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr[-3000:]
    want = "step-00000003 at step 3" if damage == "deep_latest" else "step-00000002 at step 2"
    assert want in r.stdout, r.stdout
    assert ("latest.json" if damage == "deep_latest" else "step-00000003/state.json") in r.stderr
    assert not [p for p in ck.iterdir() if p.name.startswith("step--")]


@pytest.fixture(scope="module")
def sd3_corpus(sd3_dir, tmp_path_factory):
    from fixtures import write_prompt_file

    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    root = tmp_path_factory.mktemp("ckpt-sd3")
    prompts = write_prompt_file(root / "prompts.jsonl")
    return generate_in_process(GenerateConfig(
        teacher=f"diffusers:{sd3_dir}", out=str(root / "corpus"), num_trajectories=8, shard_size=4, batch_size=4,
        num_steps=8, stages=(4,), guidance=2.0, prompts=str(prompts), resolution=16, progress=False))


def _train_fsdp(corpus, out, max_steps, *extra) -> subprocess.CompletedProcess:
    args = [TRAJFLOW, "train", "--data", corpus, "--out", str(out), "--stages", "4", "--batch-size", "4", "--max-steps",
            str(max_steps), "--num-workers", "0", "--no-progress", "--checkpoint-every", "2", "--prompt-cache-size", "0",
            "--eval-every", "0", "--parallelism", "fsdp2", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_train_fsdp2_resume_with_another_lora_rank_is_one_line(sd3_corpus, tmp_path):
    """F7: `--lora-rank 4` then `8` on the sharded path: one line naming lora_rank, as the DDP path prints."""
    out = tmp_path / "lo"
    r = _train_fsdp(sd3_corpus, out, 2, "--lora-rank", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train_fsdp(sd3_corpus, out, 4, "--lora-rank", "8")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "CheckpointException" not in r.stderr, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("trajflow train: error: "), r.stderr[-3000:]
    assert "does not fit this run's student" in lines[0] and "lora_rank" in lines[0]
    assert "in the checkpoint" in lines[0] and "in this run" in lines[0]  # the loader's own one-line reason


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_train_fsdp2_never_resumes_from_a_damaged_sharded_checkpoint(sd3_corpus, tmp_path, damage):
    """F1/F5 through the CLI: the newest step's shard file truncated or deleted: no rc 0 resume from it (either one
    line naming the file, or a warning naming it and a resume from the step before)."""
    out = tmp_path / "r5"
    r = _train_fsdp(sd3_corpus, out, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    shard = out / "checkpoints" / "step-00000004" / "sharded" / "shard-00001-model-00001-of-00001.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    r = _train_fsdp(sd3_corpus, out, 6)
    assert "Traceback" not in r.stderr and "at step 4" not in r.stdout, r.stdout + r.stderr[-3000:]
    if r.returncode == 0:  # the lead's fallback: a warning naming the file, then step 2
        assert "step-00000002 at step 2" in r.stdout and shard.name in r.stderr
    else:
        lines = _error_lines(r.stderr)
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("trajflow train: error: "), r.stderr
        assert "shard-00001" in lines[0] or "sharded" in lines[0], lines[0]
