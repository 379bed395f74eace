"""Tiny, seeded Stable Diffusion and CLIP components built in code, for tests.

Why: tests need a real diffusers ``StableDiffusionPipeline`` (same classes, same layout on disk,
same denoising loop) that builds and runs in well under a second on a CPU, with no download and
no dependency on the trained assets. Same ``seed`` -> identical weights.
"""

from __future__ import annotations

import tempfile

import torch

TINY_SAMPLE = 16  # latent side; the VAE has two levels (f=2), so images are 32x32
TINY_TOKENS = 32

_SD15_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _tokenizer(max_length: int = TINY_TOKENS):
    from sdwb.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory(prefix="sdwb-tok-") as tmp:
        return save_tokenizer(tmp, model_max_length=max_length)


def build_tiny_pipeline(seed: int = 0):
    """A ~0.3 M-param ``StableDiffusionPipeline`` (32x32 images, DDIM, safety checker off)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_SAMPLE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=TINY_SAMPLE * 2,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_TOKENS,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for model in (unet, vae, text_encoder):
        model.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SD15_BETAS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_judge(seed: int = 0, image_size: int = 32):
    """A tiny ``(CLIPModel, CLIPProcessor)`` with the domain tokenizer (random weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": TINY_TOKENS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model.eval().requires_grad_(False), processor


# Stable Diffusion families in miniature: the structural switches of each release (block layout,
# head convention, projection type, attention upcast, prediction type) with diffusers' default
# ``norm_num_groups: 32`` and the smallest widths that allow it. Overrides go to the UNet.
FAMILY_UNETS = {
    "sd1": {  # SD 1.x: CrossAttn down blocks then a plain one, 8 heads everywhere, conv proj_in/out
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
    },
    "sd2": {  # SD 2.x: heads per block, linear proj_in/out, attention upcast, v-prediction
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 128),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "upcast_attention": True,
    },
}
FAMILY_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}


def build_family_pipeline(family: str, seed: int = 0, **unet_overrides):
    """A small seeded ``StableDiffusionPipeline`` shaped like SD 1.x (``"sd1"``) or SD 2.x (``"sd2"``).

    Why: the tiny pipeline above uses 8 GroupNorm groups over 16/32 channels, which hides what
    real checkpoints do (32 groups; widths of 32 x k); code that reshapes the UNet (pruning) must be
    tested on the families' own settings (:data:`FAMILY_UNETS`: block types, head convention,
    ``use_linear_projection``, ``upcast_attention``, v-prediction for SD 2.x). ``unet_overrides``
    replace UNet config keys (e.g. ``block_out_channels=(32, 32)``). 16x16 latents, a two-level
    VAE with 32 groups (32x32 images), a 2-layer text encoder of the UNet's cross-attention width,
    DDIM; safety checker off. Same ``seed`` -> identical weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in FAMILY_UNETS:
        raise ValueError(f"family {family!r}: expected one of {sorted(FAMILY_UNETS)}")
    config = {**FAMILY_UNETS[family], **unet_overrides}
    hidden = config["cross_attention_dim"]
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=TINY_SAMPLE, in_channels=4, out_channels=4, **config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=32,
            latent_channels=4,
            sample_size=TINY_SAMPLE * 2,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_TOKENS,
                projection_dim=hidden,
                hidden_act="gelu" if family == "sd2" else "quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for model in (unet, vae, text_encoder):
        model.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SD15_BETAS, prediction_type=FAMILY_PREDICTION[family]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
