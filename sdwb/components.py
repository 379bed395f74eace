"""Each component of a Stable Diffusion pipeline as a plain-tensor module, and the facts of a pipeline.

Why in the core: these modules are the one call every backend answers for a component (what
``sdwb export onnx`` traces, what ONNX Runtime / OpenVINO / TensorRT run, and what the torch
backend runs when the shared denoising loop of :class:`sdwb.backends.onnxruntime.ExportedPipeline`
drives a diffusers pipeline's own networks, as ``sdwb edit`` does). The export stage declares the
graphs' shapes and tolerances around them (``export/interfaces.py``).
"""

from __future__ import annotations

import torch

from sdwb.families import family_of


class TextEncoderWrapper(torch.nn.Module):
    """``input_ids`` (int32) -> ``last_hidden_state``; no attention mask, as diffusers' SD call."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class UNetWrapper(torch.nn.Module):
    """``(sample, timestep, encoder_hidden_states)`` -> ``noise_pred``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    """``latent`` (scheduler output) -> ``image`` in [-1, 1]; divides by scaling_factor inside."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent):
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """``image`` in [-1, 1] -> posterior mean times scaling_factor (deterministic)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0].mean * self.scaling_factor


class SdxlTextEncoderWrapper(torch.nn.Module):
    """SDXL: ``input_ids`` -> penultimate ``hidden_states`` (+ ``text_embeds`` for the second encoder)."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder, self.pooled = text_encoder, pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


class SdxlUNetWrapper(torch.nn.Module):
    """SDXL: ``(sample, timestep, encoder_hidden_states, text_embeds, time_ids)`` -> ``noise_pred``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


def wrapper(name: str, pipe) -> torch.nn.Module:
    """The plain-tensor module that is exported for component ``name`` of ``pipe``."""
    sdxl = family_of(pipe).name == "sdxl"
    if name in ("text_encoder", "text_encoder_2") and sdxl:
        return SdxlTextEncoderWrapper(getattr(pipe, name), pooled=name == "text_encoder_2").eval()
    if name == "text_encoder":
        return TextEncoderWrapper(pipe.text_encoder).eval()
    if name == "unet":
        return (SdxlUNetWrapper if sdxl else UNetWrapper)(pipe.unet).eval()
    if name == "vae_decoder":
        return VaeDecoderWrapper(pipe.vae).eval()
    if name == "vae_encoder":
        return VaeEncoderWrapper(pipe.vae).eval()
    raise ValueError(f"unknown component {name!r}")


def pipeline_facts(pipe) -> dict:
    """The numbers every interface is derived from (also stored in the manifest)."""
    unet, vae = pipe.unet.config, pipe.vae.config
    family = family_of(pipe).name
    facts = {
        "family": family,
        "latent_channels": int(unet.in_channels),
        "sample_size": int(unet.sample_size),
        "vae_scale_factor": 2 ** (len(vae.block_out_channels) - 1),
        "unet_factor": 2 ** (len(unet.block_out_channels) - 1),
        "max_length": int(pipe.tokenizer.model_max_length),
        "text_hidden": int(pipe.text_encoder.config.hidden_size),
        "vocab_size": int(pipe.text_encoder.config.vocab_size),
        "scaling_factor": float(vae.scaling_factor),
        "time_cond_proj_dim": unet.get("time_cond_proj_dim"),
    }
    if family == "sdxl":
        encoder_2 = pipe.text_encoder_2.config
        facts.update({
            "text_hidden_2": int(encoder_2.hidden_size),
            "context_dim": int(unet.cross_attention_dim),
            "pooled_dim": int(encoder_2.projection_dim),
            "max_length_2": int(pipe.tokenizer_2.model_max_length),
            "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        })
    return facts
