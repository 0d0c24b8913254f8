"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for diffusers students and the SD3 discriminator.

``--parallelism fsdp2`` shards every trainable network over the ranks: each rank keeps 1/world of each
parameter (a ``DTensor`` sharded on dim 0), of its gradient and of its AdamW state; a unit's full
parameters exist only while that unit runs (all-gathered before its forward and again before its
backward, freed after). Units are the networks' blocks (``fsdp_units()``: SD3's joint transformer
blocks, a UNet's down/mid/up blocks, the discriminator's trunk blocks); embedders and heads belong to
the root unit. The mixed precision policy (``--fsdp-mixed-precision``) sets the dtype of the all-gathered
parameters (forward/backward compute) and of the gradient reduce-scatter; the sharded master weights, the
optimizer state and the EMA stay float32.

The EMA follows the local shards (``trainer.ema.EMA`` lerps each rank's own part), so it costs 1/world of
a full copy per rank; full tensors exist only at export, gathered by ``full_tensors``.

Checkpoints (``save_sharded`` / ``load_sharded``) go through ``torch.distributed.checkpoint`` with its
Hugging Face storage (``HuggingFaceStorageWriter(save_distributed=True)``): each rank writes the chunks it
owns to ``shard-<rank+1>-model-00001-of-00001.safetensors`` with the chunks' offsets in the safetensors
header; the reader rebuilds the global layout from those headers, so a checkpoint written by N ranks
loads on M ranks (any M, 1 included). No pickle: DCP's default ``FileSystemWriter`` would pickle a
``.metadata`` file, the HF storage writes none. The optimizer state is flattened
(``StateDictOptions(flatten_optimizer_state_dict=True)``: ``state.<param fqn>.exp_avg`` ...); its tensors
go to the safetensors shards, its scalars (``param_groups.<fqn>.lr``, betas, ...) to the checkpoint's
``state.json`` (the HF storage holds tensors only: its writer has no place for bytes items).

``load_sharded`` checks the files before anything reaches the live tensors (``check_sharded``): every file
whole (its safetensors header against its size), one file per rank of the world that wrote it, every chunk
where FSDP2's dim-0 sharding over that world puts it (a tampered offset is refused), and every tensor covered
exactly once. A damaged or missing file is a ``CheckpointCorrupt`` naming it (the caller falls back to an
older checkpoint); sound files of another student (other names, shapes or dtypes) a ``CheckpointMismatch``,
one line, raised before torch.distributed.checkpoint is called.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint import CheckpointCorrupt, CheckpointMismatch, parse_json_bounded, safetensors_header
from trainer.config import fsdp_precision_dtypes

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the subfolder of a checkpoint that holds the DCP shards
SHARDS_DIR = "sharded"
#: state.json "format" of a sharded checkpoint (DDP checkpoints have no "format")
SHARDED_FORMAT = "trajflow-fsdp2-dcp/1"
#: the file torch.distributed.checkpoint's HF storage writes for rank r (``shard-<r+1>-model-00001-of-00001``)
_SHARD_FILE = re.compile(r"shard-([0-9]{5})-model-([0-9]{5})-of-([0-9]{5})\.safetensors")
#: safetensors dtype names by torch dtype (the live tensors' dtypes as a checkpoint header writes them)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard; a plain tensor as it is)."""
    return t.to_local() if _is_dtensor(t) else t


class FSDP2:
    """The FSDP2 setup of one run: the process group (a 1-rank gloo group of its own for a single process), the
    device mesh over every rank, and the mixed precision policy named by ``precision``."""

    def __init__(self, precision: str, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.device = torch.device(device)
        self.own_group = False
        if not dist.is_initialized():  # one process (accelerate starts no group): FSDP2 still needs a mesh
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self.own_group = True
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        param, reduce = fsdp_precision_dtypes(precision)
        self.param_dtype, self.reduce_dtype = _DTYPES[param], _DTYPES[reduce]
        self.policy = MixedPrecisionPolicy(param_dtype=None if param == "fp32" else self.param_dtype,
                                           reduce_dtype=self.reduce_dtype)

    def shard(self, module: torch.nn.Module, units: list[torch.nn.Module] = ()) -> torch.nn.Module:
        """``fully_shard`` each of ``units`` (``Student.fsdp_units()``, ``Discriminator.fsdp_units()``: the blocks
        sharded as units of their own) then ``module`` itself (in place: the same object, its parameters now
        DTensors sharded on dim 0 over the mesh)."""
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit, mesh=self.mesh, mp_policy=self.policy)
        fully_shard(module, mesh=self.mesh, mp_policy=self.policy)
        # FSDP2 fixes each unit's gradient reduce dtype at the root's lazy init (normally the first forward) from
        # the parameters that require grad at that moment. The trainer's generator pass runs the discriminator
        # with its parameters frozen, and that is the discriminator's first forward: initialised there, its
        # gradients would be reduced in the compute dtype (bf16) and refused by its fp32 parameters. So the
        # lazy init runs now, while every trainable parameter requires grad (idempotent: later forwards skip it).
        module._get_fsdp_state()._lazy_init()
        return module

    @staticmethod
    def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
        """Gradient clipping over sharded gradients: the global norm (an all-reduce of the local shards'
        norms), then every local shard scaled by the same factor."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        if _is_dtensor(total):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def all_max(self, value: int) -> int:
        """The largest ``value`` over every rank (a collective)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def full_tensors(self, tensors: dict[str, torch.Tensor], *, keep: bool) -> dict[str, torch.Tensor]:
        """The full tensors of (possibly sharded) ``tensors`` on the CPU; a collective (every rank calls it),
        each tensor gathered in turn so at most one full tensor is in device memory at a time. ``keep``: this
        rank keeps the result (the others return {})."""
        out = {}
        for k, v in tensors.items():
            full = v.detach().full_tensor() if _is_dtensor(v) else v.detach()
            if keep:
                out[k] = full.to("cpu", copy=True)
            del full
        return out

    def close(self) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()
        self.own_group = False


def checkpoint_tensors(model: torch.nn.Module, optimizer, trainable: dict[str, torch.Tensor],
                       ema: dict[str, torch.Tensor] | None, prefix: str = "") -> tuple[dict, dict]:
    """(tensors, scalars) of one sharded network and its optimizer, by checkpoint key: ``model.<name>`` (the
    trainable weights, or every entry of ``trainable``), ``ema.<name>``, ``optimizer.<flattened key>``; the
    optimizer's non-tensor entries (param-group settings) in ``scalars``. Before the optimizer's first step
    its state is materialised (torch's state_dict API takes a zero step with lr 0), so the same call gives the
    tensors a resume loads into."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"{prefix}model.{k}": v for k, v in trainable.items()}
    if ema is not None:
        tensors.update({f"{prefix}ema.{k}": v for k, v in ema.items()})
    scalars = {}
    for k, v in osd.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}optimizer.{k}"] = v
        else:
            scalars[f"{prefix}optimizer.{k}"] = list(v) if isinstance(v, tuple) else v
    return tensors, scalars


def restore_optimizer(model: torch.nn.Module, optimizer, tensors: dict[str, torch.Tensor],
                      scalars: dict[str, Any], prefix: str = "") -> None:
    """Load the flattened optimizer state of ``checkpoint_tensors`` (after ``load_sharded`` filled ``tensors``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    head = f"{prefix}optimizer."
    osd: dict[str, Any] = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    for k, v in scalars.items():
        if k.startswith(head):
            osd[k[len(head):]] = tuple(v) if isinstance(v, list) else v
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(flatten_optimizer_state_dict=True))


def save_sharded(tensors: dict[str, torch.Tensor], folder: str) -> list[str]:
    """Write this rank's part of ``tensors`` (DTensors: the local chunks; plain tensors: once, by one rank)
    under the LOCAL ``folder`` as DCP safetensors shards; a collective. Returns the files this rank wrote."""
    import torch.distributed.checkpoint as dcp

    os.makedirs(folder, exist_ok=True)
    before = set(os.listdir(folder))
    dcp.save({k: v.detach() for k, v in tensors.items()}, storage_writer=dcp.HuggingFaceStorageWriter(folder, save_distributed=True))
    return sorted(set(os.listdir(folder)) - before)


def shard_file_name(rank: int) -> str:
    """The DCP safetensors file that rank ``rank`` writes."""
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


def _layout(n0: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) on dim 0 of rank ``rank``'s chunk of a dim-0 size ``n0`` under FSDP2's ``Shard(0)`` over
    ``world`` ranks (torch.chunk: chunks of ceil(n0 / world) rows, the last ones shorter or empty)."""
    c = -(-n0 // world) if n0 else 0
    start = min(rank * c, n0)
    return start, max(0, min(c, n0 - start))


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _cover_problem(chunks: list[tuple[int, list[int], list[int]]], shape: list[int],
                   world: int) -> tuple[int, str] | None:
    """Why the chunks (rank, offsets, sizes) do not tile a tensor of ``shape`` written by ``world`` ranks, as
    (the rank whose file is at fault, the reason): each chunk inside the tensor at the place its rank's dim-0
    shard has, or one chunk holding the whole tensor (a replicated tensor, saved once), every element exactly
    once. None when they do."""
    nd = len(shape)
    for rank, off, size in chunks:
        if len(off) != nd or len(size) != nd:
            return rank, f"rank {rank}'s chunk has {len(size)} dimensions, the tensor {nd}"
        if any(o + n > d for o, n, d in zip(off, size, shape)):
            return rank, f"rank {rank}'s chunk at {list(off)} of size {_fmt(size)} lies outside {_fmt(shape)}"
    whole = [c for c in chunks if list(c[1]) == [0] * nd and list(c[2]) == list(shape)]
    nonempty = [c for c in chunks if all(n > 0 for n in c[2])]
    if nd == 0:
        return None if len(chunks) == 1 else (chunks[1][0], f"{len(chunks)} copies of a scalar")
    if whole and nonempty and whole[0] in nonempty:
        others = [c for c in nonempty if c is not whole[0]]
        return None if not others else (others[0][0], "a chunk overlaps a whole copy of the tensor")
    rows = 0
    present = set()
    for rank, off, size in chunks:
        start, length = _layout(shape[0], world, rank)
        if length == 0 and size[0] == 0:
            continue
        if off[0] != start or size[0] != length or list(off[1:]) != [0] * (nd - 1) or list(size[1:]) != list(shape[1:]):
            return rank, (f"rank {rank}'s chunk at {list(off)} of size {_fmt(size)} is not where {world} ranks shard "
                          f"{_fmt(shape)} (offset {start}, {length} rows)")
        rows += length
        present.add(rank)
    if rows != shape[0]:
        missing = [r for r in range(world) if _layout(shape[0], world, r)[1] > 0 and r not in present]
        return missing[0], f"rank {missing[0]}'s rows are missing ({rows} of {shape[0]} rows present)"
    return None


def check_sharded(folder: str, expected: dict[str, torch.Tensor] | None = None, *, world_size: int | None = None,
                  where: str | None = None) -> dict[str, dict[str, Any]]:
    """Check the DCP safetensors shards under the LOCAL ``folder`` before anything is loaded; returns
    ``{key: {"shape", "dtype"}}`` of the tensors they hold.

    - every file is one rank's (``shard-<r+1>-model-00001-of-00001.safetensors``), of ranks 0 .. ``world_size``
      - 1 (``world_size``: state.json's; None: the highest rank present), none missing;
    - every file whole: its safetensors header checked against its size (``trainer.checkpoint
      .safetensors_header``), its ``DCP_SHARDING_INFO`` bounded JSON giving each tensor's offsets;
    - every tensor's chunks where FSDP2's dim-0 sharding over that world puts them, each element once.

    ``expected`` (the live tensors, DTensors by their global shape): the checkpoint must hold each of its keys
    with that shape and dtype. Damaged or missing files: :class:`CheckpointCorrupt` naming the file (``where``:
    how the folder is named in messages, e.g. its URL; default ``folder``). Sound files of another student:
    :class:`CheckpointMismatch`, one line."""
    where = (where or folder).rstrip("/")
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise CheckpointCorrupt(where, f"unreadable ({' '.join(str(e).split())[:120]})") from None
    files: dict[int, str] = {}
    for name in names:
        if not name.endswith(".safetensors"):
            continue  # torch's reader takes *.safetensors only
        m = _SHARD_FILE.fullmatch(name)
        if m is None or m.group(2, 3) != ("00001", "00001") or int(m.group(1)) < 1:
            raise CheckpointCorrupt(f"{where}/{name}", "not a shard file of this format "
                                                       "(shard-NNNNN-model-00001-of-00001.safetensors)")
        files[int(m.group(1)) - 1] = name
    if not files:
        if isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 1:
            raise CheckpointCorrupt(f"{where}/{shard_file_name(0)}",
                                    f"missing (the folder holds none of its {world_size} shard files)")
        raise CheckpointCorrupt(where, "holds no shard files")
    world = world_size if world_size is not None else max(files) + 1
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointCorrupt(f"{where}/../state.json", f"its world_size {world!r} is not a positive integer")
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise CheckpointCorrupt(f"{where}/{files[extra[0]]}", f"a shard of rank {extra[0]}, but {world} ranks wrote "
                                                              "this checkpoint (a leftover of another save)")
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise CheckpointCorrupt(f"{where}/{shard_file_name(missing[0])}",
                                f"missing (rank {missing[0]}'s chunks; {len(files)} of {world} shard files present)")
    chunks: dict[str, list[tuple[int, list[int], list[int]]]] = {}
    dtypes: dict[str, str] = {}
    for rank, name in sorted(files.items()):
        label = f"{where}/{name}"
        header = safetensors_header(os.path.join(folder, name), label)
        meta = header.get("__metadata__", {})
        info = parse_json_bounded(meta.get("DCP_SHARDING_INFO", "{}").encode(), f"{label} (DCP_SHARDING_INFO)",
                                  max_bytes=64 << 20, max_depth=8)
        if not isinstance(info, dict):
            raise CheckpointCorrupt(label, "its DCP_SHARDING_INFO is not a JSON object")
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            off = (info.get(key) or {}).get("saved_offsets") if isinstance(info.get(key), dict) else None
            if not (isinstance(off, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in off)
                    and len(off) == len(entry["shape"])):
                raise CheckpointCorrupt(label, f"tensor {key!r} has no valid offsets in DCP_SHARDING_INFO")
            if dtypes.setdefault(key, entry["dtype"]) != entry["dtype"]:
                raise CheckpointCorrupt(label, f"tensor {key!r} is {entry['dtype']} here, {dtypes[key]} in another file")
            chunks.setdefault(key, []).append((rank, off, list(entry["shape"])))
    found: dict[str, dict[str, Any]] = {}
    mismatches: list[str] = []
    for key, parts in chunks.items():
        extent = [max(o[d] + n[d] for _, o, n in parts) for d in range(len(parts[0][1]))]
        live = expected.get(key) if expected is not None else None
        want = list(live.shape) if live is not None else extent
        problem = _cover_problem(parts, want, world)
        if problem is None:
            found[key] = {"shape": want, "dtype": dtypes[key]}
            live_dtype = _ST_DTYPES.get(live.dtype) if live is not None else None
            if live_dtype is not None and live_dtype != dtypes[key]:
                mismatches.append(f"{key} is {dtypes[key]} in the checkpoint, {live_dtype} in this run")
            continue
        if live is not None and extent != want and _cover_problem(parts, extent, world) is None:
            # sound chunks of a tensor of another shape: another student, not damage
            found[key] = {"shape": extent, "dtype": dtypes[key]}
            mismatches.append(f"{key} is {_fmt(extent)} in the checkpoint, {_fmt(want)} in this run")
            continue
        rank, why = problem
        raise CheckpointCorrupt(f"{where}/{files[rank] if rank in files else shard_file_name(rank)}",
                                f"tensor {key!r} is not covered: {why}")
    if expected is not None:
        absent = sorted(set(expected) - set(chunks))
        if absent:
            mismatches.insert(0, f"the checkpoint lacks {len(absent)} of this run's tensors ({', '.join(absent[:2])}"
                                 f"{', ...' if len(absent) > 2 else ''})")
    if mismatches:
        more = f" (and {len(mismatches) - 1} more differences)" if len(mismatches) > 1 else ""
        raise CheckpointMismatch(f"{mismatches[0]}{more}")
    return found


def _agree(failed: int, tensors: dict[str, torch.Tensor]) -> int:
    """The largest ``failed`` code over every rank (a collective; 0 where there is no process group of > 1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = next((local(t).device for t in tensors.values() if local(t).device.type == "cuda"),
                      torch.device("cuda", torch.cuda.current_device()))
    t = torch.tensor([failed], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def load_sharded(tensors: dict[str, torch.Tensor], folder: str, *, world_size: int | None = None,
                 where: str | None = None) -> None:
    """Fill ``tensors`` in place (DTensors: this rank's chunks, whatever world size wrote them) from the DCP
    safetensors shards under the LOCAL ``folder``; a collective. The files are checked first (``check_sharded``
    with ``tensors`` as the expected keys, shapes and dtypes; ``world_size``: the state.json's, which lets a
    missing last rank's file be told from another student): :class:`CheckpointCorrupt` naming a damaged or
    missing file, :class:`CheckpointMismatch` for another student, both one line and raised on every rank
    (the ranks agree before torch.distributed.checkpoint runs), nothing loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    where = (where or folder).rstrip("/")
    error: ValueError | None = None
    try:
        check_sharded(folder, tensors, world_size=world_size, where=where)
    except (CheckpointCorrupt, CheckpointMismatch) as e:
        error = e
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below, whatever happened
        error = CheckpointCorrupt(where, f"could not be checked ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
    agreed = _agree(0 if error is None else 2 if isinstance(error, CheckpointMismatch) else 1, tensors)
    if error is not None:
        raise error
    if agreed == 2:
        raise CheckpointMismatch("another rank found that this run's student differs from the checkpoint")
    if agreed == 1:
        raise CheckpointCorrupt(where, "another rank found a damaged or missing file")
    try:
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(folder))
    except CheckpointException as e:  # torch's is a BaseException with every rank's traceback: one line here
        first = next(iter(getattr(e, "failures", {}).values()), e)
        detail = " ".join(str(getattr(first, "exc", first)).split())[:200] or type(first).__name__
        raise CheckpointCorrupt(where, f"torch.distributed.checkpoint could not read it ({detail})") from None
