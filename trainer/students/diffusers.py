"""What the diffusers students (SD3: ``trainer.students.sd3``; SD1.5/SD2/SDXL UNet: ``trainer.students.unet``) share.

``DiffusersStudentNet``: the teacher's denoiser prepared for training (LoRA or full fine-tune, gradient
checkpointing, the trainable weights, swapping the EMA in); ``PromptEmbeddingCache``; ``DiffusersStudent``:
the ``Student`` of diffusers corpora (the corpus checks, conditions from prompts, the export's run
metadata, the validation previews). The exported folder is ``trainer.students.folder``'s.

The corpus holds the teacher's trajectories, so the trainer needs the teacher only for its frozen
text encoders (prompt embeddings, computed here from the prompts in the records, no grad) and as
the student's initial weights. The student *is* the teacher's denoiser module (no second copy
in memory): with ``lora_rank`` set, its base weights stay frozen in the teacher's dtype and only
peft LoRA adapters on the attention projections train (optimizer state and EMA cover those only);
without, every weight trains in float32 (accelerate's ``mixed_precision`` autocasts the forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from trainer.students.base import Condition, Sampler, StudentBase, check_capabilities
from trainer.students.folder import base_pipeline_of, run_metadata
from trainer.teacher import teacher_from_card


class DiffusersStudentNet(torch.nn.Module):
    """What the SD3 and UNet students share: the diffusers model ``denoiser`` prepared for training,
    either with peft LoRA adapters on ``lora_targets`` (frozen base in its dtype, float32 adapters)
    or fully trainable in float32; optional gradient checkpointing. Subclasses define ``forward(x,
    sigma_B, *condition_tensors(cond))`` -> velocity and ``config()``."""

    def _prepare(self, denoiser: torch.nn.Module, lora_rank: int | None, lora_alpha: float | None,
                 lora_targets: Sequence[str], gradient_checkpointing: bool) -> torch.nn.Module:
        self.lora_rank = int(lora_rank) if lora_rank else None
        self.lora_targets = list(lora_targets) if self.lora_rank else None
        if self.lora_rank:
            try:
                from peft import LoraConfig
            except ImportError:
                raise ImportError("LoRA students need peft: pip install 'peft>=0.17'") from None
            denoiser.requires_grad_(False)
            denoiser.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=float(lora_alpha or self.lora_rank),
                                            init_lora_weights="gaussian", target_modules=list(lora_targets)))
            for p in denoiser.parameters():  # adapters train in float32 even on a bf16/fp16 base
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            denoiser.float().requires_grad_(True)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        return denoiser.train()

    @staticmethod
    def condition_tensors(cond) -> tuple:
        """The condition's tensors in ``forward``'s order (after x and sigma)."""
        raise NotImplementedError

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The blocks FSDP2 shards as units of their own (``Student.fsdp_units``)."""
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that train (LoRA adapters, or the whole network), by parameter name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        if set(own) != set(tensors):
            missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"checkpoint does not fit this student (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "was it trained with another --lora-rank?")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n].to(p.dtype))

    def reshard(self) -> None:
        """FSDP2 (``--parallelism fsdp2``): free the all-gathered parameters of every unit, so the module's
        parameters are the (sharded) ones the optimizer and the EMA see. After a forward without backward the
        root unit keeps its gathered parameters, which would go stale once the sharded ones change."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextlib.contextmanager
    def swapped_in(self, tensors: dict[str, torch.Tensor]):
        """Context manager: the trainable weights replaced by ``tensors`` (e.g. the EMA), restored after."""
        self.reshard()
        saved = {n: p.detach().clone() for n, p in self.trainable_state_dict().items()}
        self.load_trainable_state_dict(tensors)
        try:
            yield self
        finally:
            self.reshard()  # the swapped-in weights gathered by the forwards are dropped
            self.load_trainable_state_dict(saved)


class PromptEmbeddingCache:
    """Prompt text -> one row of the encoder's condition (``PromptCondition`` for SD3: embeds [L, D],
    pooled [P]; ``UNetCondition`` for SD1.5: embeds, SDXL: + pooled and time ids) through the frozen
    encoder, least-recently-used entries evicted beyond ``max_entries``; misses of one call are
    encoded in one batch. Returns a condition of the encoder's type with one row per text."""

    def __init__(self, encoder, max_entries: int = 1024):
        self.encoder, self.max_entries = encoder, int(max_entries)
        self._cache: OrderedDict[str, dict[str, torch.Tensor | None]] = OrderedDict()
        self._type = None
        self.hits = self.misses = 0

    @staticmethod
    def _row(cond, i: int) -> dict[str, torch.Tensor | None]:
        """Row i of every tensor field (a batch-1 shared tensor, e.g. SDXL time ids, gives its only row)."""
        B = cond.prompt_embeds.shape[0]
        out = {}
        for f in dataclasses.fields(cond):
            t = getattr(cond, f.name)
            out[f.name] = None if t is None else (t[i] if t.shape[0] == B else t[0])
        return out

    def __call__(self, texts: Sequence[str]):
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        if new:
            cond = self.encoder.encode(new)
            self._type = type(cond)
            for i, t in enumerate(new):
                self._cache[t] = self._row(cond, i)
        rows = []
        for t in texts:
            self._cache.move_to_end(t)
            rows.append(self._cache[t])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return self._type(**{k: None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                             for k in rows[0]})


def student_network(teacher, network: torch.nn.Module, *, init: str, seed: int, what: str) -> torch.nn.Module:
    """The network a diffusers student trains: the teacher's own ``network`` (``init="teacher"``; no
    second copy in memory) or a re-initialised one of its class and config (``init="scratch"``).
    Seeds the global RNG with ``seed`` afterwards (LoRA's gaussian init draws from it)."""
    if teacher.prompt_encoder is None:
        raise ValueError(f"the corpus's {what} teacher was loaded without text encoders; the trainer needs them to "
                         "encode the records' prompts (point the card's source.path at the whole pipeline folder)")
    if init == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = type(network).from_config(network.config).to(teacher.device)
    torch.manual_seed(seed)
    return network


class DiffusersStudent(StudentBase):
    """What the SD3 and UNet students share: the teacher's own network as the student (no second copy in
    memory; the teacher object is dropped after build: ``teacher`` is None), its frozen text encoders behind a
    ``PromptEmbeddingCache``, EMA over the trainable weights only (LoRA adapters, or the whole network).
    Subclasses set ``kind``/``teacher_kinds``/``capabilities``/``folder_kind``/``model_classes`` and define
    ``_network`` (and ``_discriminator``) and ``_export``. The sampler uses the current weights (swapping an
    EMA in would copy the weights twice per step)."""

    display_name: ClassVar[str] = "diffusers students"
    #: an SD3 transformer or an SD/SDXL UNet at 512-1024 px holds its whole network, activations and optimizer
    #: state on one GPU, so it starts small (measure yours with benchmarks/sd3_scale.py and raise it); bf16
    #: autocast on GPUs that have it
    DEFAULT_BUDGET: ClassVar[int] = 20000
    DEFAULT_BATCH_SIZE: ClassVar[int] = 4
    DEFAULT_MIXED_PRECISION_ON_BF16_GPU: ClassVar[str] = "bf16"
    #: the diffusers model classes (the card's ``teacher.config.model_class``) a student of this family is built around
    model_classes: ClassVar[tuple[str, ...]]

    def __init__(self, card, network: DiffusersStudentNet, prompts: PromptEmbeddingCache, device,
                 discriminator: torch.nn.Module | None = None):
        self.card, self.network, self.prompts, self.device = card, network, prompts, device
        self._disc = discriminator
        self._decoder, self._decoder_loaded = None, False  # the VAE of the sample grids, loaded at first use

    @classmethod
    def check_corpus(cls, card, cfg) -> None:
        """Clear errors for what the diffusers student paths do not do (yet)."""
        kind, model_class = card.teacher.kind, card.teacher.config.get("model_class")
        if model_class not in cls.model_classes:
            raise ValueError(f"diffusers students are SD3-class transformers or UNet2DConditionModels; this corpus's "
                             f"teacher ({kind}) is {model_class!r}")
        if not isinstance(card.solver.guidance, (int, float)):
            raise ValueError("a diffusers student has no guidance input: distil from a corpus generated with one "
                             "fixed --guidance (the student then samples with guidance_scale=1)")
        check_capabilities(cls, cfg)
        if card.conditioning.kind == "class":
            raise ValueError("a diffusers corpus cannot be class-conditioned")

    @classmethod
    def build(cls, card, cfg, *, device, main_process_first=None, progress: bool = False) -> DiffusersStudent:
        teacher = teacher_from_card(card, cfg.storage_options, device=device, root=cfg.data,
                                    allow=cfg.allow_teacher_locations)
        gc = cfg.gradient_checkpointing
        if gc is None:  # memory-aware default: activations dominate at 1024 px on a GPU; CPU runs are tiny
            gc = torch.device(device).type == "cuda"
        disc = None
        if cfg.adv_weight > 0:  # D copies the teacher's first blocks *before* LoRA adapters go into them
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                disc = cls._discriminator(teacher, cfg)
        network = cls._network(teacher, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, gradient_checkpointing=gc,
                               init=cfg.init, seed=cfg.seed)
        return cls(card, network, PromptEmbeddingCache(teacher.prompt_encoder, cfg.prompt_cache_size), device, disc)

    @classmethod
    def _network(cls, teacher, **kwargs) -> DiffusersStudentNet:
        raise NotImplementedError

    @classmethod
    def _discriminator(cls, teacher, cfg) -> torch.nn.Module:
        raise NotImplementedError

    # -- conditions --------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> Condition:
        return tuple(self.network.condition_tensors(self.prompts(list(texts)).to(device=self.device)))

    def corpus_condition(self, batch) -> Condition:
        return self._encode(batch.get("prompt") or [""] * len(batch["valid"]))  # unconditional: the empty prompt

    def online_condition(self, online) -> Condition:
        return self._encode(online.prompts or [""] * len(online.windows.x_BX))

    def discriminator_condition(self, cond: Condition) -> Condition:
        return cond

    def sampler(self, autocast, device) -> Sampler:
        net = self.network

        @torch.no_grad()
        def fn(x, sigma, *cond):
            with autocast():
                return net(x.to(device), sigma.to(device), *cond).float().to(x.device)

        return fn

    @contextlib.contextmanager
    def ema_sampler(self, ema=None, autocast=contextlib.nullcontext, device=None):
        with contextlib.ExitStack() as stack:
            if ema is not None:  # the EMA swapped into the network for the duration, the training weights restored
                stack.enter_context(self.network.swapped_in(ema))
            yield self.sampler(autocast, device or self.device)

    def build_discriminator(self, cfg) -> torch.nn.Module:
        if self._disc is None:
            raise ValueError(f"no discriminator was built for this {self.kind} student (adv-weight 0 at build)")
        return self._disc

    # -- weights -----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.trainable_state_dict()

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_trainable_state_dict(tensors)

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.network.trainable_state_dict().items()}

    def net_config(self) -> dict[str, Any]:
        return self.network.config()

    def fsdp_units(self) -> list[torch.nn.Module]:
        return self.network.fsdp_units()

    def export(self, weights: dict[str, torch.Tensor], folder: str, run: dict[str, Any]) -> list[str]:
        return self._export(self.network, weights, self.card, folder, extra=run_metadata(run))

    @staticmethod
    def _export(network, weights, card, folder, extra) -> list[str]:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, float]:
        return {"prompt_cache_hits": self.prompts.hits, "prompt_cache_misses": self.prompts.misses}

    # -- the validation sample grid -------------------------------------------------------------------
    def preview_images(self, x_BX: torch.Tensor, device) -> tuple[torch.Tensor, str]:
        """Latents decoded by the VAE of the card's base pipeline folder ("vae"), or, when that folder has no
        VAE, each latent channel as a grey image ("latent channels"; ``trainer.samples``). The VAE is loaded at
        the first call (float32, bf16 on a GPU with bf16) and kept on the CPU between calls."""
        from trainer.samples import latent_channel_images

        if not self._decoder_loaded:
            from models.diffusers.vae import LatentDecoder

            base = base_pipeline_of(self.card)
            cuda = torch.device(device).type == "cuda"
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
            self._decoder = LatentDecoder.from_pipeline(base, dtype) if base and os.path.isdir(base) else None
            self._decoder_loaded = True
            if self._decoder is None:
                where = f"at {base}/vae (config.json and .safetensors weights)" if base else "named by the card"
                print(f"note: no VAE {where}: the validation sample grids show the latent channels", file=sys.stderr)
        if self._decoder is None:
            return latent_channel_images(x_BX), "latent channels"
        return self._decoder.decode(x_BX, device), "vae"
