"""Train the tiny-shapes VAE (diffusers ``AutoencoderKL``, f=4): reconstruction + a small KL term.

Why: Stable Diffusion denoises in a VAE latent, and so does tiny-shapes (4x16x16 for a 64x64
image), which makes the UNet cheap enough to train on a CPU. L1 + MSE keeps flat colours and
sharp edges, with shape pixels weighted up (``foreground_weight``) so colours survive; the KL
term keeps the latent smooth. After training, ``scaling_factor`` is set to 1/std of the latents
so the UNet sees unit-variance inputs, as in SD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdwb import shapes
from sdwb.tiny_arch import vae_config
from sdwb.train.common import Checkpointer, autocast, cosine_lr, run_loop, step_generator
from sdwb.train.config import BaselineTrainConfig

VAE_STREAM_OFFSET = 3_000_000


def images_to_vae_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1] (the pipeline's image range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def foreground_mask(images: np.ndarray, samples: list[shapes.ShapeSample]) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where a pixel differs from its sample's background colour.

    Why: the shape covers ~4% of an image, so a plain reconstruction loss is dominated by the
    flat background; the first shipped VAE, trained that way, merged six colours into two.
    """
    background = np.array([shapes.BACKGROUNDS[s.background] for s in samples], dtype=np.int16)
    differs = np.abs(images.astype(np.int16) - background[:, None, None, :]).max(axis=-1) > 8
    return torch.from_numpy(differs).float().unsqueeze(1)


class _Autoencode(torch.nn.Module):
    """encode -> reparameterised sample -> decode as one forward, so DDP sees the whole step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise):
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.mean + posterior.std * noise).sample
        return rec, posterior.kl()


def train_vae(cfg: BaselineTrainConfig, work_dir: Path, accelerator, progress=True):
    """Train the VAE; returns (vae in fp32 eval mode with scaling_factor set, eval dict)."""
    from diffusers import AutoencoderKL

    vc = cfg.vae
    torch.manual_seed(cfg.seed + 2)
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=vc.lr, weight_decay=0.0)
    trainer, optimizer = accelerator.prepare(_Autoencode(vae), optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    latent_numel = 4 * 16 * 16

    def step_fn(step: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = vc.lr * cosine_lr(step, vc.steps, vc.warmup)
        images, _, samples = shapes.train_batch(VAE_STREAM_OFFSET // vc.batch + step * world + rank, vc.batch)
        x = images_to_vae_input(images).to(accelerator.device)
        weight = 1.0 + vc.foreground_weight * foreground_mask(images, samples).to(x.device)
        gen = step_generator(cfg.seed, step, stream=100 + rank)
        noise = torch.randn((x.shape[0], 4, x.shape[2] // 4, x.shape[3] // 4), generator=gen).to(x.device)
        with autocast(accelerator.device, cfg.precision):
            rec, kl = trainer(x, noise)
        rec = rec.float()
        err = rec - x
        rec_loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        kl = kl.float().mean() / latent_numel
        loss = rec_loss + vc.kl_weight * kl
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"rec": rec_loss.item(), "kl": kl.item()}

    ckpt = Checkpointer(work_dir / "checkpoint", {"vae": vae}, optimizer)
    run_loop(
        name="vae",
        total_steps=vc.steps,
        step_fn=step_fn,
        checkpointer=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        log_path=work_dir.parent / "train_log.jsonl",
        progress=progress,
    )
    vae = vae.cpu().float().eval()
    return vae, calibrate_and_evaluate(vae, vc.calib_images)


@torch.no_grad()
def calibrate_and_evaluate(vae, count: int = 512) -> dict:
    """Set ``scaling_factor`` = 1/std of held-out latents; report reconstruction PSNR."""
    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 700_000 + i) for i in range(count)]
    x = images_to_vae_input(np.stack([s.render() for s in samples]))
    latents = torch.cat([vae.encode(x[i : i + 128]).latent_dist.mean for i in range(0, count, 128)])
    std = float(latents.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    rec = torch.cat([vae.decode(latents[i : i + 128]).sample for i in range(0, count, 128)]).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean()
    return {
        "latent_std": round(std, 4),
        "scaling_factor": round(1.0 / std, 4),
        "recon_psnr_db": round(float(psnr), 2),
    }
