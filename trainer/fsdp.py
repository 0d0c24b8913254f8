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
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import fsdp_precision_dtypes

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the subfolder of a checkpoint that holds the DCP shards
SHARDS_DIR = "sharded"
#: state.json "format" of a sharded checkpoint (DDP checkpoints have no "format")
SHARDED_FORMAT = "trajflow-fsdp2-dcp/1"


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

    def shard(self, module: torch.nn.Module) -> torch.nn.Module:
        """``fully_shard`` each of ``module.fsdp_units()`` then ``module`` itself (in place: the same object,
        its parameters now DTensors sharded on dim 0 over the mesh)."""
        from torch.distributed.fsdp import fully_shard

        units = module.fsdp_units() if hasattr(module, "fsdp_units") else []
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


def load_sharded(tensors: dict[str, torch.Tensor], folder: str) -> None:
    """Fill ``tensors`` in place (DTensors: this rank's chunks, whatever world size wrote them) from the DCP
    safetensors shards under the LOCAL ``folder``; a collective. KeyError names keys the checkpoint lacks."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(folder)
    saved = set(reader.read_metadata().state_dict_metadata)
    missing = sorted(set(tensors) - saved)
    if missing:
        raise KeyError(f"the sharded checkpoint lacks {missing[:3]}")
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(folder))

