"""Train a LoRA adapter on a model's UNet (``sdwb lora train``) and save it in diffusers' format.

Why a project-made adapter: what an adapter loses through pruning, quantization, distillation and
export can only be measured with an adapter whose effect is known. The default data teaches
tiny-shapes rings (:mod:`sdwb.shapes_lora`), a shape its own data never had.

How: peft's ``LoraConfig`` on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0``: diffusers' own default targets), the base frozen, the DDPM loss of the base training
(:mod:`sdwb.train.unet`: same target, Min-SNR weighting, empty captions for guidance) on a pool of
latents encoded once with the model's VAE. ``lora_alpha`` equals the rank, so scale 1.0 is the
trained strength. Saved with ``StableDiffusionPipeline.save_lora_weights`` (safetensors), so
``pipe.load_lora_weights(DIR)`` in plain diffusers loads it; ``sdwb.json`` beside it records the
base model's UNet hash, the config, the adapter's sha256 and the final loss.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sdwb.errors import SdwbError

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraTrainConfig(BaseModel):
    """``sdwb lora train`` settings (``--set key=value`` overrides any of them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r (lora_alpha = r: scale 1.0 is as trained)")
    targets: list[str] = Field(default_factory=lambda: list(TARGETS), min_length=1,
                               description="UNet Linear layers (module name suffixes) that get an adapter")
    steps: int = Field(1500, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(50, ge=0)
    lr_floor: float = Field(0.1, ge=0, le=1)
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty captions (for guidance)")
    min_snr_gamma: Optional[float] = Field(5.0, description="Min-SNR loss weighting; null = plain MSE")
    latent_pool: int = Field(4096, ge=8, description="train images encoded once with the model's VAE")
    seed: int = Field(0, ge=0)


def load_lora_train_config(path: str | Path | None = None,
                           overrides: list[str] | None = None) -> LoraTrainConfig:
    """Read a ``configs/lora/*.yaml`` file (or start empty), apply ``--set`` overrides, validate; every
    problem is one ``SdwbError`` line naming the key."""
    from sdwb.schema_errors import parse_model
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, {})
    return parse_model(LoraTrainConfig, data, source, "lora train")


def _check_targets(unet, targets: list[str]) -> list[str]:
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise SdwbError(f"lora train: no Linear layer of this UNet ends with any of {targets}")
    return names


def train_lora(model: str, config: LoraTrainConfig, out: Path, *, overwrite: bool = False,
               progress: bool = True, say: Callable[[str], None] = lambda _m: None) -> dict:
    """Train an adapter for ``model``'s UNet; write ``out`` (weights + sdwb.json); returns the record."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdwb.hash_cache import sha256_cached
    from sdwb.loading import load_pipeline, require_family, resolve_spec
    from sdwb.lora import RECORD, WEIGHTS_NAME
    from sdwb.runs import atomic_dir, atomic_write_json, prepare_work_dir
    from sdwb.shapes_lora import train_sample
    from sdwb.train.common import Checkpointer, cosine_lr, run_loop, step_generator
    from sdwb.train.unet import (
        build_latent_pool,
        min_snr_weights,
        tokenize,
        training_scheduler,
        training_target,
    )
    from sdwb.variants.files import hash_files
    from sdwb.variants.manifest import source_fingerprint

    if out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite; --overwrite)")
    require_family(model, "lora train")
    say(f"loading {model}")
    pipe = load_pipeline(model)
    if pipe.__class__.__name__ != "StableDiffusionPipeline":
        raise SdwbError(f"lora train: {pipe.__class__.__name__} is not supported yet (SD 1.x / 2.x UNets)")
    unet = pipe.unet
    layers = _check_targets(unet, config.targets)
    torch.manual_seed(config.seed)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                target_modules=list(config.targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    say(f"LoRA rank {config.rank} on {len(layers)} layers: {sum(p.numel() for p in params) / 1e3:.1f} k "
        f"trainable parameters; encoding {config.latent_pool} train images")
    work = out.with_name(out.name + ".work")  # resumable: only by a run of this config and model
    identity = {"config": config.model_dump(), "source": source_fingerprint(model)}
    prepare_work_dir(work, identity, "LoRA training")
    pool = build_latent_pool(pipe.vae, pipe.tokenizer, config.latent_pool,
                             work / "latent_pool.safetensors", progress, sample=train_sample)
    scheduler = training_scheduler()
    empty = tokenize([""], pipe.tokenizer)[0]
    scaling = pipe.vae.config.scaling_factor
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    unet.train()

    def step_fn(step: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = config.lr * cosine_lr(step, config.steps, config.warmup, config.lr_floor)
        gen = step_generator(config.seed, step, stream=300)
        idx = torch.randint(0, len(pool["mean"]), (config.batch,), generator=gen)
        latents = (pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=gen))
        latents = latents * scaling
        ids = pool["input_ids"][idx].clone()
        ids[torch.rand(config.batch, generator=gen) < config.caption_dropout] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=gen)
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        per_sample = F.mse_loss(pred, training_target(scheduler, latents, noise, t),
                                reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, config.min_snr_gamma)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    started = time.perf_counter()
    last = run_loop(name="lora", total_steps=config.steps, step_fn=step_fn,
                    checkpointer=Checkpointer(work / "checkpoint", {"unet": unet}, optimizer),
                    checkpoint_every=max(100, config.steps // 5), log_path=work / "train_log.jsonl",
                    progress=progress)
    seconds = time.perf_counter() - started
    unet.eval()
    path = resolve_spec(model, "pipeline")
    base_files = hash_files(path / "unet") if path else {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
        record = _record(model, config, base_files, len(layers), sum(p.numel() for p in params),
                         sha256_cached(tmp / WEIGHTS_NAME), last, seconds)
        atomic_write_json(tmp / RECORD, record)
    shutil.rmtree(work, ignore_errors=True)
    return record


def _record(model: str, config: LoraTrainConfig, base_files: dict, layers: int, params: int,
            sha256: str, last: dict, seconds: float) -> dict:
    """The adapter's ``sdwb.json``: its base model's UNet files by hash, config, size, sha256, loss."""
    from sdwb.variants.files import library_versions

    return {
        "format": "sdwb-lora",
        "version": 1,
        "stage": "lora",
        "method": "train",
        "base": {"spec": model, "unet_weights": base_files},
        "domain": "sdwb.shapes_lora (rings)",
        "config": config.model_dump(),
        "layers": layers,
        "trainable_params": params,
        "sha256": sha256,
        "metrics": {"final_loss_smoothed": round(last.get("loss", float("nan")), 6),
                    "train_seconds": round(seconds, 1), "steps": config.steps},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "libraries": library_versions(("peft",)),
    }
