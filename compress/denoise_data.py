"""Batches of the denoising task on shapes data, for Taylor importance and recovery fine-tuning.

Why a pool: rendering and VAE-encoding images inside the loop would cost more than the UNet
steps. The shapes train stream is encoded once by the model's own VAE (posterior mean and std,
:func:`sdwb.train.unet.build_latent_pool`, cached as safetensors in the work directory) and every
batch draws a fresh posterior sample, noise and timesteps from a generator seeded by
``(seed, step, stream)`` (:func:`sdwb.train.common.step_generator`): a resumed run sees exactly the
batches it would have seen, without saving RNG state. Captions are tokenized as
``StableDiffusionPipeline`` does, encoded as the pipeline's family does
(:mod:`sdwb.conditioning`: SDXL's pooled embeddings and time ids too), and dropped at
``caption_dropout`` so the unconditional branch used by classifier-free guidance keeps being
trained. The noise schedule is the pipeline's own
(its scheduler config read as a ``DDPMScheduler``); the target is the noise (epsilon models) or
the velocity (v-prediction models).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sdwb import conditioning as conditions
from sdwb.conditioning import TextConditioner

TAYLOR_STREAM = 400
TRAIN_STREAM = 500
EVAL_STREAM = 600


class DenoisingData:
    """``batch(step, size, stream)`` -> UNet inputs and the denoising target, on the CPU."""

    def __init__(self, pipe, config, pool_path: Path, progress: bool = False):
        from diffusers import DDPMScheduler

        from sdwb.train.unet import build_latent_pool, tokenize

        self.config = config
        self.pool = build_latent_pool(pipe.vae, pipe.tokenizer, config.latent_pool, Path(pool_path), progress)
        self.empty_ids = tokenize([""], pipe.tokenizer)[0]
        self.conditioner = TextConditioner(pipe)  # SDXL: both encoders, pooled embeds, time ids
        self.scaling = float(pipe.vae.config.scaling_factor)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def batch(self, step: int, size: int, stream: int) -> dict[str, torch.Tensor]:
        from sdwb.train.common import step_generator
        from sdwb.train.unet import training_target

        gen = step_generator(self.config.seed, step, stream)
        pool = self.pool
        idx = torch.randint(0, len(pool["mean"]), (size,), generator=gen)
        mean, std = pool["mean"][idx].float(), pool["std"][idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        ids = pool["input_ids"][idx].clone()
        ids[torch.rand(size, generator=gen) < self.config.caption_dropout] = self.empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=gen)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = training_target(self.scheduler, latents, noise, t)
        conditioning = conditions.to(self.conditioner(ids), "cpu")
        return {"sample": noisy, "timestep": t, **conditioning, "target": target}


def unet_inputs(batch: dict, device) -> dict:
    """The UNet keyword arguments of ``batch`` on ``device`` (the target left out)."""
    return conditions.to({k: v for k, v in batch.items() if k != "target"}, device)


def accumulate_gradients(unet, data: DenoisingData, batches: int, size: int) -> float:
    """Sum the gradients of the denoising loss over ``batches`` batches into ``unet``'s ``.grad``
    (for Taylor importance); returns the mean loss. The UNet is left with requires_grad on."""
    unet.requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    device = next(unet.parameters()).device
    total = 0.0
    for b in range(batches):
        batch = data.batch(b, size, TAYLOR_STREAM)
        pred = unet(**unet_inputs(batch, device)).sample
        loss = F.mse_loss(pred.float(), batch["target"].to(device))
        loss.backward()
        total += float(loss.detach())
    return total / batches
