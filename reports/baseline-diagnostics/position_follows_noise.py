"""Does the shape land where the initial noise points? (the position-regression diagnostic of reports/baseline.md)

usage: python reports/baseline-diagnostics/position_follows_noise.py MODEL ["PROMPT"]
"""
import sys, torch, numpy as np
torch.set_num_threads(1)
from sdwb.loading import load_pipeline
from sdwb import shapes
from sdwb.train.vae import images_to_vae_input
pipe = load_pipeline(sys.argv[1]); vae = pipe.vae
# the mean latent direction of a shape vs background (scaled latents)
s = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 700_000 + i) for i in range(128)]
x = images_to_vae_input(np.stack([q.render() for q in s]))
with torch.no_grad(): z = vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
d = z - z[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)
w = d.abs().sum(1, keepdim=True); direction = (d * w).sum(dim=(0, 2, 3)); direction /= direction.norm()
print("direction", direction.numpy().round(2))
prompt = sys.argv[2] if len(sys.argv) > 2 else "a large red circle in the center on a black background"
hits = []; dists = []
for seed in range(24):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn((1, 4, 16, 16), generator=g)
    img = pipe(prompt, num_inference_steps=20, guidance_scale=7.5, latents=lat.to(pipe.unet.dtype), output_type="np").images[0]
    bgc = img[:2, :2].reshape(-1, 3).mean(0)
    m = np.abs(img - bgc).max(-1) > 0.2
    if m.sum() == 0: continue
    yy, xx = np.nonzero(m); cy, cx = yy.mean() / 4, xx.mean() / 4
    proj = torch.einsum("c,bchw->bhw", direction, lat)[0]
    blur = torch.nn.functional.avg_pool2d(proj[None, None], 5, 1, 2)[0, 0]
    iy, ix = np.unravel_index(int(blur.argmax()), blur.shape)
    dists.append(np.hypot(cy - iy, cx - ix))
    # the same distance for a random location, as a reference
    hits.append(np.hypot(cy - np.random.randint(16), cx - np.random.randint(16)))
print("median dist centroid<->noise argmax", np.median(dists), "vs random", np.median(hits), "n", len(dists))
