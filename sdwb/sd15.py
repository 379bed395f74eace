"""``builtin:sd15-arch``: Stable Diffusion 1.5's real architecture with seeded random weights.

Why: latency, memory and export behaviour depend on the architecture, not on the weights. This
module writes SD 1.5's published component configs in code (UNet ≈ 859.5 M params, VAE f=8,
a CLIP ViT-L/14-shaped text encoder, 77 tokens, 512x512) so full-scale numbers can be measured
with nothing downloaded. Quality metrics do not apply: the weights are random.

Tokenizer: OpenAI's CLIP vocabulary is not available offline, so the pipeline uses the domain
tokenizer of :mod:`sdwb.tokenizer` with ``model_max_length=77``. Its ids (a few hundred) all lie
inside the text encoder's 49408-entry embedding, and the sequence length (77) and the shapes of
every tensor are exactly those of SD 1.5, which is all the benchmarks and exports see.
"""

from __future__ import annotations

import copy
import tempfile

import torch

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER = {  # openai/clip-vit-large-patch14 text tower, as shipped in SD 1.5
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD15_SCHEDULER = {  # SD 1.5 ships PNDM; DDIM/Euler/DPM++ are built from the same config
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SD15_RESOLUTION = 512
SD15_MAX_TOKENS = 77


def sd15_configs() -> dict:
    """SD 1.5's component configs (deep copies): unet, vae, text_encoder, scheduler, resolution."""
    return copy.deepcopy(
        {
            "unet": SD15_UNET,
            "vae": SD15_VAE,
            "text_encoder": SD15_TEXT_ENCODER,
            "scheduler": SD15_SCHEDULER,
            "resolution": SD15_RESOLUTION,
            "max_tokens": SD15_MAX_TOKENS,
        }
    )


def _build_models(seed: int, meta: bool, dtype: torch.dtype) -> dict:
    """UNet, VAE and text encoder from the configs; random weights from ``seed`` (or on meta).

    Weights are always drawn on the CPU so a seed gives the same model on every device; each
    component is cast right after it is built to keep the peak memory to one fp32 component.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd15_configs()
    builders = {
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
    }
    models = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, build in builders.items():
            with torch.device("meta" if meta else "cpu"):
                model = build()
            if dtype != torch.float32:
                # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns about fp32-kept modules
                # on every dtype cast even when there are none.
                torch.nn.Module.to(model, dtype=dtype)
            models[name] = model.eval().requires_grad_(False)
    return models


def build_sd15_pipeline(
    seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, meta: bool = False
):
    """A ``StableDiffusionPipeline`` with SD 1.5's architecture and seeded random weights.

    ``meta=True`` builds it on ``torch.device("meta")`` (no memory, no compute: for counting
    parameters and inspecting shapes; it cannot run). Safety checker off. The scheduler is SD
    1.5's PNDM config; :func:`sdwb.generate.generate` swaps it for DDIM/Euler/DPM++.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from sdwb.tokenizer import save_tokenizer

    models = _build_models(seed, meta, dtype)
    with tempfile.TemporaryDirectory(prefix="sdwb-sd15-tok-") as tmp:
        tokenizer = save_tokenizer(tmp, model_max_length=SD15_MAX_TOKENS)
    pipe = StableDiffusionPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        unet=models["unet"],
        scheduler=PNDMScheduler.from_config(sd15_configs()["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not meta and device != "cpu":
        pipe = pipe.to(device)
    return pipe


def sd15_param_counts(meta: bool = True) -> dict[str, int]:
    """Parameters per component of sd15-arch (``unet``, ``vae``, ``text_encoder``, ``total``).

    Built on the meta device by default, so it takes about a second and no memory.
    """
    models = _build_models(seed=0, meta=meta, dtype=torch.float32)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    counts["total"] = sum(counts.values())
    return counts
