"""Shape accuracy when classifier-free guidance is applied only inside a timestep window.

DDIM from the model's scheduler config, seeded noise, the first N held-out prompts; guidance
``SCALE`` inside [LO, HI], none (one conditional call) outside. Prints shape accuracy overall and
for large / small shapes, scored by builtin:shapes-judge. The shipped pipeline always guides every
step (plain StableDiffusionPipeline); this only locates where guidance helps or hurts.

usage: python reports/baseline-diagnostics/guidance_by_timestep.py MODEL N STEPS SCALE,LO,HI [...]
  e.g. ... builtin:tiny-shapes 108 25 7.5,0,1000 7.5,400,1000 1,0,1000
"""

import json
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler

from sdwb import shapes
from sdwb.judge import load_judge
from sdwb.loading import load_pipeline

torch.set_num_threads(1)


def sample(pipe, cond, uncond, scale: float, lo: float, hi: float, steps: int) -> list[np.ndarray]:
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    size = pipe.unet.config.sample_size
    x = torch.randn((len(cond), 4, size, size), generator=torch.Generator().manual_seed(0))
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            if lo <= t <= hi and scale != 1:
                both = pipe.unet(
                    torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([uncond, cond])
                ).sample
                u, c = both.chunk(2)
                pred = u + scale * (c - u)
            else:
                pred = pipe.unet(inp, t, encoder_hidden_states=cond).sample
            x = scheduler.step(pred, t, x).prev_sample
        images = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    images = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return [(im * 255).round().astype(np.uint8) for im in images]


def main(model: str, n: int, steps: int, windows: list[str]) -> None:
    pipe = load_pipeline(model)
    samples = shapes.eval_samples(n)
    judge = load_judge("builtin:shapes-judge")
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt([s.caption for s in samples], "cpu", 1, True, [""] * n)
    size = np.array([s.attributes["size"] for s in samples])
    for window in windows:
        scale, lo, hi = (float(v) for v in window.split(","))
        images = sample(pipe, cond, uncond, scale, lo, hi, steps)
        right = judge.classify(images, [s.attributes for s in samples]).correct["shape"]
        print(
            json.dumps(
                {
                    "scale": scale,
                    "lo": lo,
                    "hi": hi,
                    "shape": round(100 * right.mean(), 1),
                    "large": round(100 * right[size == "large"].mean(), 1),
                    "small": round(100 * right[size == "small"].mean(), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
