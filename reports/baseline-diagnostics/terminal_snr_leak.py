"""How much of a shape survives late training steps of SD's own noise schedule, per VAE.

Matched-filter SNR of the shape's latent signal (scaled latent minus its background) under
sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, median over 256 held-out images. Above ~1 the
UNet can read the shape's position from its input at the last step (reports/baseline.md, Notes).

usage: python reports/baseline-diagnostics/terminal_snr_leak.py VAE [VAE ...]
  VAE: a diffusers AutoencoderKL directory (e.g. sdwb/assets/tiny-shapes/vae) or a
       `sdwb baseline train` VAE checkpoint (RUN/work/vae/checkpoint/weights.safetensors)
"""
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file

from sdwb import shapes
from sdwb.tiny_arch import scheduler_config, vae_config
from sdwb.train.vae import calibrate_and_evaluate, images_to_vae_input

torch.set_num_threads(1)
# tiny-shapes' betas without the zero-terminal-SNR rescale: SD 1.x's own schedule
SD_SCHEDULE = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k in ("num_train_timesteps", "beta_start",
                                                                                    "beta_end", "beta_schedule")})


def load_vae(spec: str) -> AutoencoderKL:
    if Path(spec).is_dir():
        return AutoencoderKL.from_pretrained(spec, torch_dtype=torch.float32).eval()
    vae = AutoencoderKL(**vae_config())
    vae.load_state_dict({k[4:]: v for k, v in load_file(spec).items() if k.startswith("vae.")})
    vae.eval()
    calibrate_and_evaluate(vae, 256)  # sets scaling_factor
    return vae


@torch.no_grad()
def leak(vae) -> dict:
    s = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 700_000 + i) for i in range(256)]
    z = vae.encode(images_to_vae_input(np.stack([q.render() for q in s]))).latent_dist.mean * vae.config.scaling_factor
    d = z - z[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)  # the corner is background
    energy = d.pow(2).sum(dim=(1, 2, 3)).sqrt()
    ab = SD_SCHEDULE.alphas_cumprod
    return {t: round(float((ab[t].sqrt() * energy / (1 - ab[t]).sqrt()).median()), 2) for t in (999, 981, 900, 800)}


for spec in sys.argv[1:]:
    print(spec, "matched-filter SNR by t:", leak(load_vae(spec)))
