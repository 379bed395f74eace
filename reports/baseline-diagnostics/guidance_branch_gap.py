"""Where guidance 7.5 bends shapes: the conditional and unconditional branches, per timestep.

For 128 held-out images noised to timestep t (one seeded noise draw each), the mean squared error
of the UNet's v prediction with the true caption (``mse_c``) and with the empty caption
(``mse_u``), and the mean squared difference of the two predictions (``gap``). At low noise the
shape is visible in the input and an ideal model's two branches agree, so ``gap`` there is mostly
the unconditional branch's extra error; classifier-free guidance multiplies it by (scale - 1) = 6.5
at every step. Shrinking it (more empty captions, no Min-SNR down-weighting of those steps) is what
moved shape accuracy at guidance 7.5 (reports/baseline.md, Notes).

usage: python reports/baseline-diagnostics/guidance_branch_gap.py MODEL [MODEL ...]
  MODEL: builtin:tiny-shapes or a diffusers pipeline directory
"""

import sys

import numpy as np
import torch
from diffusers import DDPMScheduler

from sdwb import shapes
from sdwb.loading import load_pipeline
from sdwb.train.unet import training_target

torch.set_num_threads(1)
TIMESTEPS = (20, 50, 100, 200, 300, 400, 600, 800, 950)


def branch_gap(spec: str, count: int = 128) -> list[dict]:
    pipe = load_pipeline(spec)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    samples = shapes.eval_samples(count)
    images = torch.tensor(np.stack([s.render() for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = []
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        cond, uncond = pipe.encode_prompt([s.caption for s in samples], "cpu", 1, True, [""] * count)
        gen = torch.Generator().manual_seed(0)
        for t in TIMESTEPS:
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.full((count,), t)
            noisy = scheduler.add_noise(latents, noise, steps)
            target = training_target(scheduler, latents, noise, steps)
            v_cond = pipe.unet(noisy, steps, encoder_hidden_states=cond).sample
            v_uncond = pipe.unet(noisy, steps, encoder_hidden_states=uncond).sample
            rows.append(
                {
                    "t": t,
                    "mse_c": round(float((v_cond - target).pow(2).mean()), 4),
                    "mse_u": round(float((v_uncond - target).pow(2).mean()), 4),
                    "gap": round(float((v_cond - v_uncond).pow(2).mean()), 4),
                }
            )
    return rows


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        print(spec)
        for row in branch_gap(spec):
            print(
                f"  t={row['t']:4d}  mse_c {row['mse_c']:.4f}  mse_u {row['mse_u']:.4f}  gap {row['gap']:.4f}"
            )
