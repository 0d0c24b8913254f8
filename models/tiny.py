"""Tiny, random-weight diffusers pipelines built locally (tests, docs, demos; no hub, no downloads).

``make_tiny_sd3_pipeline(folder)`` writes a complete ``StableDiffusion3Pipeline`` folder with
``save_pretrained``: the tiny ``SD3Transformer2DModel`` of ``models.diffusers.sd3``
(``TINY_SD3_CONFIG``), a tiny ``AutoencoderKL`` (2 blocks: 16 px images <-> 8x8x4 latents), two
tiny ``CLIPTextModelWithProjection`` and a tiny ``T5EncoderModel`` with tokenizers built here from
a character vocabulary, and a ``FlowMatchEulerDiscreteScheduler`` config (shift 3, like SD3).
It loads with ``StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)`` and has
the real pipeline's shapes in miniature: prompt embeddings [B, 77 + 256, 32], pooled [B, 16].

The same code path then serves a real SD3-Medium folder; only the sizes differ.

``make_tiny_sd15_pipeline(folder)`` does the same for a ``StableDiffusionPipeline`` (SD1.5 layout:
unet/ + vae/ + text_encoder/ + tokenizer/ + scheduler/): the tiny ``UNet2DConditionModel`` of
``models.diffusers.unet`` (``TINY_UNET_CONFIG``, cross-attention width 32), a tiny ``AutoencoderKL``
(16 px images <-> 8x8x4 latents), a tiny ``CLIPTextModel`` (width 32) with the locally built
character tokenizer, SD1.5's ``DDIMScheduler`` config, and no safety checker. Prompt embeddings
are [B, 77, 32], as SD1.5's are [B, 77, 768].

``make_tiny_sdxl_pipeline(folder)`` writes a ``StableDiffusionXLPipeline`` folder (unet/ + vae/ +
text_encoder/ + text_encoder_2/ + tokenizer/ + tokenizer_2/ + scheduler/): the tiny SDXL-shaped
``UNet2DConditionModel`` (``TINY_SDXL_UNET_CONFIG``: text_time embeddings), a tiny ``AutoencoderKL``
(16 px <-> 8x8x4), a ``CLIPTextModel`` of width 12 and a ``CLIPTextModelWithProjection`` of width 20
with projection 16 (widths of unequal size, so a swapped concatenation would show), both with the
character tokenizer, SDXL base's ``EulerDiscreteScheduler`` config and
``force_zeros_for_empty_prompt=True``. Prompt embeddings are [B, 77, 12 + 20], pooled [B, 16], as
SDXL's are [B, 77, 768 + 1280] and [B, 1280].
"""

from __future__ import annotations

import os
from typing import Any

import torch

from models.diffusers.conditions import PromptCondition, UNetCondition

__all__ = ["make_tiny_sd3_pipeline", "make_tiny_sd15_pipeline", "make_tiny_sdxl_pipeline", "make_tiny_clip",
           "TINY_SD3_RESOLUTION", "TINY_SD15_RESOLUTION", "TINY_SDXL_RESOLUTION", "SDXL_SCHEDULER_CONFIG",
           "TINY_SD3_CONFIG", "TINY_UNET_CONFIG", "TINY_SDXL_UNET_CONFIG", "tiny_sd3_transformer", "tiny_unet",
           "random_prompt_condition", "random_unet_condition"]

#: image side in pixels of the tiny pipeline's native latent (8x8 latents, VAE scale factor 2)
TINY_SD3_RESOLUTION = 16

#: image side in pixels of the tiny SD1.5 pipeline's native latent (8x8 latents, VAE scale factor 2)
TINY_SD15_RESOLUTION = 16

#: image side in pixels of the tiny SDXL pipeline's native latent (8x8 latents, VAE scale factor 2)
TINY_SDXL_RESOLUTION = 16

#: SDXL base 1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler; PNDM-only keys left out)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # a byte-level BPE vocabulary of single characters (+ their word-final forms) and no merges:
    # every word is spelled out character by character, which is all a tiny random encoder needs
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # a Unigram vocabulary (sentencepiece-style, "\u2581" marks a word start); no extra ids
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_tiny_sd3_pipeline(folder: str | os.PathLike, seed: int = 0, shift: float = 3.0,
                           transformer_overrides: dict[str, Any] | None = None) -> str:
    """Write a tiny random-weight SD3 pipeline folder (see module docstring); returns the folder.

    Deterministic in ``seed``: the same seed writes the same weights. The global RNG is untouched.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


    folder = os.fspath(folder)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    transformer = tiny_sd3_transformer(seed, **(transformer_overrides or {}))
    cfg = transformer.config
    # SD3 concatenates the two CLIP hidden states (and zero-pads them to the T5 width = joint_attention_dim)
    # and the two CLIP projections (= pooled_projection_dim)
    if cfg.pooled_projection_dim % 2 or cfg.joint_attention_dim < cfg.pooled_projection_dim:
        raise ValueError("the tiny SD3 builder needs an even pooled_projection_dim <= joint_attention_dim")
    width = cfg.pooled_projection_dim // 2

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width, bos_token_id=0,
            eos_token_id=1, pad_token_id=1)).eval()

    def t5():
        return T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=cfg.joint_attention_dim, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()

    def vae():
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.in_channels, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=TINY_SD3_RESOLUTION,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=float(shift)),
        vae=_seeded(seed + 4, vae),
        text_encoder=_seeded(seed + 1, clip), tokenizer=clip_tok,
        text_encoder_2=_seeded(seed + 2, clip), tokenizer_2=clip_tok,
        text_encoder_3=_seeded(seed + 3, t5), tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(folder)
    return folder


def make_tiny_sd15_pipeline(folder: str | os.PathLike, seed: int = 0,
                            unet_overrides: dict[str, Any] | None = None) -> str:
    """Write a tiny random-weight SD1.5 ``StableDiffusionPipeline`` folder (see module docstring);
    returns the folder. Deterministic in ``seed``; the global RNG is untouched."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.diffusers.unet import SD15_SCHEDULER_CONFIG


    folder = os.fspath(folder)
    tok = _clip_tokenizer()
    unet = tiny_unet(seed, **(unet_overrides or {}))
    cfg = unet.config
    width = int(cfg.cross_attention_dim)

    def clip():
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)).eval()

    def vae():
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.in_channels, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=TINY_SD15_RESOLUTION,
            scaling_factor=0.18215).eval()

    # SD1.5's scheduler_config.json: PNDM there; DDIM with the same schedule and spacing here
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_seeded(seed + 2, vae), text_encoder=_seeded(seed + 1, clip),
        tokenizer=tok, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = 0,
                            unet_overrides: dict[str, Any] | None = None) -> str:
    """Write a tiny random-weight SDXL ``StableDiffusionXLPipeline`` folder (see module docstring);
    returns the folder. Deterministic in ``seed``; the global RNG is untouched.

    The encoders' widths follow the UNet config: text_encoder_2's hidden size is 5/8 of
    ``cross_attention_dim`` (rounded to even), text_encoder's the rest, and text_encoder_2's
    projection is the pooled width ``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


    folder = os.fspath(folder)
    tok = _clip_tokenizer()
    unet = tiny_unet(seed, sdxl=True, **(unet_overrides or {}))
    cfg = unet.config
    D = int(cfg.cross_attention_dim)
    pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
    width_2 = 2 * ((5 * D) // 16)
    width_1 = D - width_2
    if width_1 < 2 or width_1 % 2 or pooled < 1:
        raise ValueError(f"the tiny SDXL builder needs an even cross_attention_dim >= 8 and a positive pooled width, "
                         f"got {D} and {pooled}")

    def clip(cls, width, **extra):
        return lambda: cls(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            **extra)).eval()

    def vae():
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.in_channels, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=TINY_SDXL_RESOLUTION,
            scaling_factor=0.13025).eval()

    pipe = StableDiffusionXLPipeline(
        vae=_seeded(seed + 3, vae),
        text_encoder=_seeded(seed + 1, clip(CLIPTextModel, width_1)), tokenizer=tok,
        text_encoder_2=_seeded(seed + 2, clip(CLIPTextModelWithProjection, width_2, projection_dim=pooled)),
        tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_clip(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny random-weight ``CLIPModel`` + ``CLIPProcessor`` folder: a stand-in for the CLIP /
    PickScore evaluation models (``evaluation.image_metrics.CLIPScorer``) in tests. Returns the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = os.fspath(folder)
    tok = _clip_tokenizer()
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=16)
    model = _seeded(seed, lambda: CLIPModel(cfg).eval())
    model.save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                            crop_size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    proc.save_pretrained(folder)
    return folder


# ---- tiny networks and random conditions (tests, demos, benchmarks)

#: the tiny SD3 transformer used by tests and demos (random weights, ~30k parameters)
TINY_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,  # must equal num_attention_heads * attention_head_dim
    "pooled_projection_dim": 16,
    "out_channels": 4,
    "pos_embed_max_size": 16,  # in patches: latents up to 32x32 with patch_size 2
}


def tiny_sd3_transformer(seed: int = 0, **overrides):
    """A tiny ``SD3Transformer2DModel`` with random weights (``TINY_SD3_CONFIG`` + overrides), in
    eval mode. The global RNG state is left untouched."""
    from diffusers import SD3Transformer2DModel

    cfg = {**TINY_SD3_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**cfg)
    return model.eval()


def random_prompt_condition(
    transformer,
    batch: int,
    *,
    seq_len: int = 8,
    seed: int = 0,
    negative: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PromptCondition:
    """Random prompt embeddings shaped for ``transformer``'s config (tests, demos, benchmarks)."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    D, P = cfg.joint_attention_dim, cfg.pooled_projection_dim
    parts = [torch.randn(batch, seq_len, D, generator=g), torch.randn(batch, P, generator=g)]
    if negative:
        parts += [torch.randn(batch, seq_len, D, generator=g), torch.randn(batch, P, generator=g)]
    return PromptCondition(*(p.to(dtype) for p in parts))


#: a tiny SD1.5-shaped UNet (random weights) for tests and demos
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


#: a tiny SDXL-shaped UNet: text_time additional embeddings (pooled 16 + 6 time ids x 8)
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
    "use_linear_projection": True,
}


def tiny_unet(seed: int = 0, *, sdxl: bool = False, **overrides):
    """A tiny ``UNet2DConditionModel`` with random weights (``TINY_UNET_CONFIG``, or
    ``TINY_SDXL_UNET_CONFIG`` with ``sdxl=True``, + overrides), in eval mode. Global RNG untouched."""
    from diffusers import UNet2DConditionModel

    cfg = {**(TINY_SDXL_UNET_CONFIG if sdxl else TINY_UNET_CONFIG), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**cfg)
    return model.eval()


def random_unet_condition(unet, batch: int, *, seq_len: int = 8, seed: int = 0, negative: bool = False,
                          dtype: torch.dtype = torch.float32) -> UNetCondition:
    """Random embeddings shaped for ``unet``'s config (SDXL: + pooled embeddings and time ids)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    D = cfg.cross_attention_dim
    pe = torch.randn(batch, seq_len, D, generator=g)
    ne = torch.randn(batch, seq_len, D, generator=g) if negative else None
    pp = npool = ti = None
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        P = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pp = torch.randn(batch, P, generator=g)
        npool = torch.randn(batch, P, generator=g) if negative else None
        h = w = 8 * cfg.sample_size
        ti = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
    conv = [None if t is None else t.to(dtype) for t in (pe, ne, pp, npool)]
    return UNetCondition(*conv, ti)
