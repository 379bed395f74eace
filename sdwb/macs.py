"""The one MAC counter: multiply-accumulates and parameters of one UNet call.

Counted by torch-pruning's ``count_ops_and_params`` on one UNet call with one sample (timestep
999, the model's latent size and token count), so pruning's "-45 % GMACs" and the benchmark's
``unet_gmacs`` column are the same number: attention matmuls inside
``scaled_dot_product_attention`` are not counted.
"""

from __future__ import annotations

MACS_COUNTER = (
    "torch_pruning.utils.count_ops_and_params, one UNet call on one sample (timestep 999, the "
    "model's latent size and token count); attention matmuls inside SDPA are not counted"
)


def unet_example_inputs(pipe, height: int | None = None, width: int | None = None) -> dict:
    """One-sample UNet inputs of the shapes the pipeline uses at ``height x width`` (default size)."""
    import torch

    unet = pipe.unet
    factor = getattr(pipe, "vae_scale_factor", 8)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    h = height // factor if height else size[0]
    w = width // factor if width else size[1]
    channels = unet.conv_in.in_channels
    tokens = pipe.tokenizer.model_max_length
    hidden = unet.config.cross_attention_dim  # SDXL: both text encoders' hidden states, concatenated
    param = next(unet.parameters())
    inputs = {
        "sample": torch.zeros(1, channels, h, w, dtype=param.dtype, device=param.device),
        "timestep": torch.tensor([999], device=param.device),
        "encoder_hidden_states": torch.zeros(1, tokens, hidden, dtype=param.dtype, device=param.device),
    }
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL's micro-conditioning
        time_ids = torch.tensor([[h * factor, w * factor, 0, 0, h * factor, w * factor]], dtype=param.dtype,
                                device=param.device)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, pooled, dtype=param.dtype, device=param.device),
            "time_ids": time_ids,
        }
    return inputs


def unet_macs(unet, example_inputs: dict) -> dict:
    """``{"gmacs", "params_m"}`` of one UNet call on ``example_inputs``."""
    import contextlib
    import io

    import torch
    import torch_pruning as tp

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(unet, example_inputs=example_inputs)
    return {"gmacs": float(macs) / 1e9, "params_m": float(params) / 1e6}
