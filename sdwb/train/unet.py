"""Train the tiny-shapes UNet and its text encoder jointly with the DDPM denoising loss.

Why: the model under test needs its own text encoder (sharing nothing with the judge); training
it end to end with the UNet, as Imagen/LDM-style small models do, is the cheapest way to get
captions that steer colour, shape and position. Details that matter at this size:
- a pool of pre-encoded latents (mean and std of the VAE posterior) keeps the VAE and the
  renderer out of the loop; each step samples a fresh posterior draw;
- ~10 % empty captions teach the unconditional branch for classifier-free guidance, tokenized
  exactly as ``StableDiffusionPipeline`` does (pad to max length with EOS, no attention mask);
- Min-SNR-gamma weighting (Hang et al. 2023) and an EMA of the weights for the saved model;
- late in training, a branch-agreement loss at low noise (:func:`agreement_rows`), so that
  guidance 7.5 does not amplify the empty-caption branch's error there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sdwb import shapes
from sdwb.tiny_arch import scheduler_config, text_encoder_config, unet_config
from sdwb.train.common import EMA, Checkpointer, autocast, cosine_lr, run_loop, step_generator
from sdwb.train.config import BaselineTrainConfig
from sdwb.train.vae import images_to_vae_input

UNET_STREAM_OFFSET = 0


class _Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so DDP and checkpoints see both."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy, timesteps, input_ids):
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, hidden).sample


@torch.no_grad()
def build_latent_pool(vae, tokenizer, count: int, path: Path, progress=True,
                      sample=None) -> dict[str, torch.Tensor]:
    """Render ``count`` train images, encode them once, tokenize their captions; cached on disk.
    ``sample(i)`` draws train image ``i`` (default: the shapes train stream; the LoRA's ring data
    passes :func:`sdwb.shapes_lora.train_sample`)."""
    if path.exists():
        pool = load_file(path)
        if len(pool["mean"]) == count:
            return pool
    from rich.progress import track

    means, stds, ids = [], [], []
    chunk = 256
    for start in track(range(0, count, chunk), description="latent pool", disable=not progress):
        n = min(chunk, count - start)
        samples = [sample(start + i) if sample is not None
                   else shapes.sample_from_seed(UNET_STREAM_OFFSET + start + i) for i in range(n)]
        x = images_to_vae_input(np.stack([s.render() for s in samples]))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        ids.append(tokenize([s.caption for s in samples], tokenizer))
    pool = {
        "mean": torch.cat(means).contiguous(),
        "std": torch.cat(stds).contiguous(),
        "input_ids": torch.cat(ids).contiguous(),
    }
    save_file(pool, path)
    return pool


def tokenize(captions: list[str], tokenizer) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def min_snr_weights(
    scheduler, timesteps: torch.Tensor, gamma: float | None, floor: float = 1.0
) -> torch.Tensor:
    """Per-sample loss weights (Min-SNR-gamma, Hang et al. 2023); 1 when ``gamma`` is None.

    epsilon: min(SNR, gamma) / SNR. v-prediction: min(max(SNR, floor), gamma) / (SNR + 1): the
    plain Min-SNR weight for v, min(SNR, gamma) / (SNR + 1), is 0 at zero terminal SNR, exactly
    where the layout is decided, so the SNR is floored (floor 1 = the x0-space weight max(SNR, 1)
    of Salimans & Ho, capped at gamma).
    """
    if gamma is None:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps.cpu()].double()
    snr = alphas / (1 - alphas)
    if scheduler.config.prediction_type == "v_prediction":
        return (torch.clamp(snr, min=min(floor, gamma), max=gamma) / (snr + 1)).float()
    return (torch.clamp(snr, max=gamma) / snr).float()


def agreement_rows(
    timesteps: torch.Tensor, dropped: torch.Tensor, t_max: int, weight: float
) -> torch.Tensor:
    """Which samples also train the branch-agreement loss: captioned ones with ``t < t_max``.

    Why: guidance 7.5 adds 6.5 times the gap between the captioned and the empty-caption
    prediction at every step. At low noise the shape is already visible in the input, so both
    branches should agree, but the empty-caption branch (trained on a minority of captions) errs
    more and guidance amplifies that error into star-like shapes (reports/baseline.md). For these
    rows the empty-caption prediction on the same noisy input is trained toward the captioned
    prediction (stop-gradient): a lower-variance target than the data's own velocity, and the
    property guidance needs. All-false when ``weight`` is 0.
    """
    if weight <= 0:
        return torch.zeros(len(timesteps), dtype=torch.bool)
    return (timesteps < t_max) & ~dropped


def training_scheduler():
    """The DDPM schedule the UNet trains on: tiny-shapes' scheduler config minus sampling-only keys."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **{k: v for k, v in scheduler_config().items() if k not in ("set_alpha_to_one", "steps_offset")}
    )


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def train_unet(cfg: BaselineTrainConfig, vae, tokenizer, work_dir: Path, accelerator, progress=True):
    """Train UNet + text encoder; returns (unet, text_encoder) in fp32 with the EMA weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    uc = cfg.unet
    torch.manual_seed(cfg.seed + 3)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**text_encoder_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id))
    )
    denoiser = _Denoiser(unet, text_encoder)
    noise_scheduler = training_scheduler()
    pool = build_latent_pool(vae, tokenizer, uc.latent_pool, work_dir / "latent_pool.safetensors", progress)
    empty_ids = tokenize([""], tokenizer)[0]
    scaling = vae.config.scaling_factor
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=uc.lr, weight_decay=0.01)
    ema = EMA(denoiser, uc.ema_decay)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device

    def step_fn(step: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = uc.lr * cosine_lr(step, uc.steps, uc.warmup, uc.lr_floor)
        phase = uc.phase_at(step)
        gen = step_generator(cfg.seed, step * world + rank, stream=200)
        idx = torch.randint(0, len(pool["mean"]), (uc.batch,), generator=gen)
        latents = pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=gen)
        latents = latents * scaling
        ids = pool["input_ids"][idx].clone()
        dropped = torch.rand(uc.batch, generator=gen) < phase.caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (uc.batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        agree = agreement_rows(t, dropped, uc.agreement_t_max, phase.agreement_weight)
        extra = int(agree.sum())
        with autocast(device, cfg.precision):  # agreement rows once more, captions emptied: one forward
            out = model(
                torch.cat([noisy, noisy[agree]]).to(device),
                torch.cat([t, t[agree]]).to(device),
                torch.cat([ids, empty_ids.expand(extra, -1)]).to(device),
            ).float()
        pred, uncond = out[: uc.batch], out[uc.batch :]
        target = training_target(noise_scheduler, latents, noise, t)
        per_sample = F.mse_loss(pred, target.to(device), reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(noise_scheduler, t, phase.min_snr_gamma, uc.min_snr_floor)
        loss = (per_sample * weights.to(device)).mean()
        gap = 0.0
        if extra:
            agreement = F.mse_loss(uncond, pred[agree.to(device)].detach())
            loss = loss + phase.agreement_weight * agreement * extra / uc.batch
            gap = agreement.item()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(denoiser, step)
        return {"loss": loss.item(), "mse": per_sample.mean().item(), "branch_gap": gap}

    ckpt = Checkpointer(work_dir / "checkpoint", {"denoiser": denoiser}, optimizer, ema=ema)
    run_loop(
        name="unet+text",
        total_steps=uc.steps,
        step_fn=step_fn,
        checkpointer=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        log_path=work_dir.parent / "train_log.jsonl",
        progress=progress,
    )
    ema.copy_to(denoiser)
    denoiser = denoiser.cpu().float().eval()
    return denoiser.unet, denoiser.text_encoder
