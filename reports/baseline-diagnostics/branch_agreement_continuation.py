"""Continuation probe for the branch-agreement loss (reports/baseline.md, Notes).

Continues the shipped builtin:tiny-shapes (its stored EMA weights) for STEPS steps at 50 % empty
captions, plain MSE, constant LR (default 1.25e-4 = the shipped run's final LR), batch 64, bf16
autocast, a fresh AdamW and an EMA with decay 0.995, on a pool of 8192 pre-encoded training
images. With WEIGHT > 0 it adds the branch-agreement loss: for captioned samples with t < T0 the
empty-caption prediction on the same noisy input is trained toward the stop-gradient captioned
one (rows from sdwb.train.unet.agreement_rows, weighted by WEIGHT * rows / batch). Saves
OUT/model (a diffusers pipeline) and OUT/log.json; score it with
``sdwb baseline eval -m OUT/model --prompts 270``.

usage: python reports/baseline-diagnostics/branch_agreement_continuation.py OUT STEPS WEIGHT T0 [LR]
  e.g. ... runs/exp-agree/A 500 3.0 400    (agreement)
       ... runs/exp-agree/C 500 0.0 400    (control: the same continuation without it)
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdwb.loading import load_pipeline
from sdwb.train.baseline import save_pipeline
from sdwb.train.common import EMA, autocast, step_generator
from sdwb.train.config import load_train_config
from sdwb.train.unet import (
    _Denoiser,
    agreement_rows,
    build_latent_pool,
    tokenize,
    training_scheduler,
    training_target,
)

out = Path(sys.argv[1])
steps = int(sys.argv[2])
lam = float(sys.argv[3])
t0 = int(sys.argv[4])
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1.25e-4
out.mkdir(parents=True, exist_ok=True)
pipe = load_pipeline("builtin:tiny-shapes")
tok, vae = pipe.tokenizer, pipe.vae
den = _Denoiser(pipe.unet, pipe.text_encoder).train().float()
for p_ in den.parameters():
    p_.requires_grad_(True)
sched = training_scheduler()
pool = build_latent_pool(vae, tok, 8192, out.parent / "pool8192.safetensors", progress=False)
empty = tokenize([""], tok)[0]
opt = torch.optim.AdamW(den.parameters(), lr=lr, weight_decay=0.01)
ema = EMA(den, 0.995)
dev = torch.device("cpu")
B = 64
log = []
t_start = time.time()
for step in range(steps):
    gen = step_generator(0, 100000 + step, stream=200)
    idx = torch.randint(0, len(pool["mean"]), (B,), generator=gen)
    lat = (
        pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=gen)
    ) * vae.config.scaling_factor
    ids = pool["input_ids"][idx].clone()
    drop = torch.rand(B, generator=gen) < 0.5
    ids[drop] = empty
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    noisy = sched.add_noise(lat, noise, t)
    target = training_target(sched, lat, noise, t)
    agree_mask = agreement_rows(t, drop, t0, lam)
    k = int(agree_mask.sum())
    with autocast(dev, "bf16"):
        if k:
            x_in = torch.cat([noisy, noisy[agree_mask]])
            t_in = torch.cat([t, t[agree_mask]])
            id_in = torch.cat([ids, empty.expand(k, -1)])
            p = den(x_in, t_in, id_in).float()
            pred, pu = p[:B], p[B:]
        else:
            pred = den(noisy, t, ids).float()
    loss = F.mse_loss(pred, target)
    agree = torch.tensor(0.0)
    if k:
        agree = F.mse_loss(pu, pred[agree_mask].detach())
        loss = loss + lam * agree * k / B
    loss.backward()
    torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(den, 10**6)
    if step % 50 == 0:
        log.append({"step": step, "loss": loss.item(), "agree": agree.item(), "s": time.time() - t_start})
        print(log[-1], flush=True)
ema.copy_to(den)
den.eval()
cfg = load_train_config("configs/baseline/tiny-shapes.yaml")
save_pipeline(out / "model", vae, den.text_encoder, tok, den.unet, cfg)
(out / "log.json").write_text(json.dumps(log))
print("done", time.time() - t_start)
