"""``builtin:sdxl-arch``: SDXL base 1.0's real architecture with seeded random weights (and a tiny SDXL).

Why: SDXL is what most users bring, and its latency, memory and export behaviour depend on the
architecture (a 2.57 B-parameter UNet with ``transformer_layers_per_block`` [1, 2, 10], two text
encoders whose penultimate hidden states are concatenated to 2048 channels, a pooled embedding
and six micro-conditioning numbers fed through ``added_cond_kwargs``), not on the weights. This
module writes SDXL base 1.0's published component configs in code, so full-scale numbers can be
measured with nothing downloaded. Quality metrics do not apply: the weights are random.

Tokenizers: as for ``sd15-arch`` (:mod:`sdwb.sd15`), the domain tokenizer with 77 positions
stands in for OpenAI's / OpenCLIP's vocabularies; every tensor shape is SDXL's.

``tiny=True`` builds the same structure at toy widths (two text encoders, pooled embeddings,
``text_time`` added conditions, ``transformer_layers_per_block`` > 1): the SDXL pipeline of the
tests, built in well under a second.
"""

from __future__ import annotations

import copy
import tempfile

import torch

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 x 256 time ids
}
SDXL_VAE = {
    "sample_size": 1024,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # SDXL's VAE overflows in fp16: diffusers decodes it in fp32
}
_CLIP_COMMON = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SDXL_TEXT_ENCODER = {  # openai/clip-vit-large-patch14's text tower
    **_CLIP_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14's text tower, with its projection (pooled output)
    **_CLIP_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}
SDXL_SCHEDULER = {  # SDXL base 1.0 ships Euler (leading spacing); DDIM/DPM++ come from the same config
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "sample_max_value": 1.0,
}
SDXL_RESOLUTION = 1024
SDXL_MAX_TOKENS = 77
# Published parameter counts of SDXL base 1.0's components (the tests check the build against them).
SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
               "text_encoder_2": 694_659_840}

TINY_TOKENS = 32


def _tiny_configs() -> dict:
    """SDXL's structure at toy widths (32x32 images): the tests' SDXL pipeline."""
    text = {**_CLIP_COMMON, "max_position_embeddings": TINY_TOKENS, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "gelu"}
    return {
        "unet": {
            "sample_size": 16, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": 64, "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4], "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        },
        "vae": {
            "sample_size": 32, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True,
        },
        "text_encoder": {**text, "hidden_size": 32, "projection_dim": 32},
        "text_encoder_2": {**text, "hidden_size": 32, "projection_dim": 32},
        "scheduler": {**SDXL_SCHEDULER, "_class_name": "EulerDiscreteScheduler"},
        "resolution": 32,
        "max_tokens": TINY_TOKENS,
    }


def sdxl_configs(tiny: bool = False) -> dict:
    """SDXL base 1.0's component configs (deep copies), or the tiny ones: unet, vae, text_encoder,
    text_encoder_2, scheduler, resolution, max_tokens."""
    if tiny:
        return _tiny_configs()
    return copy.deepcopy({
        "unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": SDXL_TEXT_ENCODER,
        "text_encoder_2": SDXL_TEXT_ENCODER_2, "scheduler": SDXL_SCHEDULER,
        "resolution": SDXL_RESOLUTION, "max_tokens": SDXL_MAX_TOKENS,
    })


def _build_models(seed: int, meta: bool, dtype: torch.dtype, tiny: bool) -> dict:
    """The four networks from the configs; random weights from ``seed`` (or on meta), each cast
    right after it is built so the peak memory is one fp32 component."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = sdxl_configs(tiny)
    builders = {
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
    }
    models = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, build in builders.items():
            with torch.device("meta" if meta else "cpu"):
                model = build()
            if dtype != torch.float32:
                torch.nn.Module.to(model, dtype=dtype)  # not ModelMixin.to (spurious warnings)
            models[name] = model.eval().requires_grad_(False)
    return models


def build_sdxl_pipeline(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        meta: bool = False, tiny: bool = False):
    """A ``StableDiffusionXLPipeline`` with SDXL base 1.0's architecture (or the tiny one) and
    seeded random weights; ``meta=True`` builds it without memory (for counting parameters).
    ``force_zeros_for_empty_prompt`` as SDXL base ships it; no watermarker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdwb.tokenizer import save_tokenizer

    cfg = sdxl_configs(tiny)
    models = _build_models(seed, meta, dtype, tiny)
    with tempfile.TemporaryDirectory(prefix="sdwb-sdxl-tok-") as tmp:
        tokenizer = save_tokenizer(tmp, model_max_length=cfg["max_tokens"])
    pipe = StableDiffusionXLPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        text_encoder_2=models["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=copy.deepcopy(tokenizer),
        unet=models["unet"],
        scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if not meta and device != "cpu":
        pipe = pipe.to(device)
    return pipe


def sdxl_param_counts(meta: bool = True) -> dict[str, int]:
    """Parameters per component of sdxl-arch (and ``total``), built on the meta device."""
    models = _build_models(seed=0, meta=meta, dtype=torch.float32, tiny=False)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    counts["total"] = sum(counts.values())
    return counts
