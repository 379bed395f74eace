"""``distill_decoder(source, config, out)``: a distilled tiny VAE decoder (the TAESD idea) as a variant.

Why: once a model samples in 4 steps, the VAE decode is a fixed cost the UNet no longer hides.
A small decoder trained to reproduce the model's own VAE decoder (Bohan's TAESD: diffusers'
``AutoencoderTiny``) takes its place; the UNet, text encoder and scheduler stay the parent's.

- Student: ``AutoencoderTiny`` whose decoder has one width (``channels``: ``DecoderTiny`` keeps
  the width across levels) and ``blocks`` AutoencoderTinyBlocks per level, as many levels as the
  parent VAE has (so the pipeline's ``vae_scale_factor`` is unchanged). Its ``scaling_factor`` is
  1.0 and ``shift_factor`` 0.0: the pipeline decodes ``latents / scaling_factor``, so the decoder
  is trained on (and receives) the UNet's latent space itself, ``z = scaling_factor_KL * x``,
  about unit variance -- what ``DecoderTiny``'s ``tanh(z / 3) * 3`` input clamp is made for.
- The encoder is **not trained** (a minimal one is kept because ``AutoencoderTiny`` always has
  one): the record says ``"vae": {"encoder": "untrained"}``, ``sdwb export onnx`` refuses the
  ``vae_encoder`` component of such a VAE, and prune / distill refuse the variant as a source
  (they encode their training data with the VAE): run this verb last.
- Data (pairs, built once into ``WORK/pairs.safetensors``): latents of the shapes train stream
  encoded by the model's own VAE (:func:`compress.distill.latent_pool`, one posterior draw each)
  and ``generated`` latents sampled by the model's own sampler (its recorded steps / scheduler /
  guidance) from train-stream captions, so the decoder sees what the UNet actually produces;
  targets are the full decoder's images of the same latents (clamped to [-1, 1], stored fp16).
  A batch draws ``generated_share`` of its latents from the generated set.
- Loss ``l1_weight * L1 + l2_weight * MSE`` on images in [-1, 1]; AdamW, warm-up + cosine; every
  batch is a function of (seed, step), checkpoints and progress through
  :func:`sdwb.train.common.run_loop` / :class:`~sdwb.train.common.Checkpointer`: re-running the
  same command resumes. ``WORK`` (default ``OUT.work``) is keyed by the resolved config and the
  source's content and removed on success.
- Fidelity (the record's ``metrics.fidelity``): PSNR / SSIM of the tiny decoder's images against
  the full decoder's on held-out latents of two kinds: eval-stream images encoded by the VAE
  (posterior mean) and latents sampled from eval prompts with seeds the training never used.
  ``metrics.decode_ms_per_image``: both decoders timed in torch (interleaved, median) at batch 1
  and 8.

Memory: the pairs hold ``latent_pool + generated`` images of the model's size (64 px tiny-shapes:
~25 KB each in fp16); a 512 px model needs a smaller pool.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdwb.errors import SdwbError

STAGE, METHOD = "decoder", "taesd"
POOL_FILE = "latent_pool.safetensors"
HELD_OUT_FILE = "held_out_pool.safetensors"
PAIRS_FILE = "pairs.safetensors"
GENERATED_SEED = 7_000_000  # sampler seeds of the training latents (image i: seed + i)
HELD_OUT_SEED = 9_000_000  # ... of the held-out generated latents (never used in training)
TIMED_BATCHES = (1, 8)


class DecoderConfig(BaseModel):
    """A tiny VAE decoder distilled from the model's own decoder (``configs/decoder/vae-decoder.yaml``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    channels: int = Field(32, ge=4, le=512, description="width of every decoder level")
    blocks: Optional[list[int]] = Field(
        None, description="AutoencoderTinyBlocks per level, lowest resolution first, one entry per level "
        "of the model's VAE; null: 2 per level and 1 at full resolution")
    steps: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps")
    batch: int = Field(16, ge=1, le=4096)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    warmup: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    l1_weight: float = Field(1.0, ge=0.0)
    l2_weight: float = Field(1.0, ge=0.0)
    latent_pool: int = Field(2048, ge=1, description="train-stream images encoded by the model's VAE")
    generated: int = Field(256, ge=0, description="latents sampled by the model from train captions")
    generated_share: float = Field(0.25, ge=0.0, le=1.0, description="fraction of a batch drawn from "
                                   "the generated latents")
    sample_steps: Optional[int] = Field(None, ge=1, le=1000, description="sampler steps of the generated "
                                        "latents; null: the model's own default")
    held_out: int = Field(64, ge=1, description="held-out latents of each kind for PSNR / SSIM")
    timing_runs: int = Field(20, ge=0, description="timed decode calls per decoder and batch (0: none)")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(100, ge=1)


def resolved(config: DecoderConfig) -> dict:
    return config.model_dump(mode="json")


def load_decoder_config(path: str | Path | None = None, overrides: list[str] | None = None,
                        **flags: Any) -> DecoderConfig:
    """Read the YAML (or start from the defaults), apply ``--set`` then flags; one-line errors."""
    from sdwb.schema_errors import fields_of, format_errors
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, flags)
    if not isinstance(data, dict):
        raise SdwbError(f"{source}: expected a mapping of decoder keys, got {type(data).__name__}")
    try:
        config = DecoderConfig.model_validate(data)
    except ValidationError as e:
        raise SdwbError(f"{source}: {format_errors(e, allowed=fields_of(DecoderConfig))}") from None
    if config.blocks is not None and (not config.blocks or any(b < 0 for b in config.blocks)):
        raise SdwbError(f"{source}: blocks: expected one count >= 0 per VAE level, got {config.blocks}")
    if config.l1_weight == 0 and config.l2_weight == 0:
        raise SdwbError(f"{source}: l1_weight and l2_weight are both 0: nothing to train")
    return config


@dataclass
class TinyDecoded:
    config: DecoderConfig
    pipeline: object
    record: dict
    path: Path | None = None

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]


# --------------------------------------------------------------------------- the student


def build_tiny_vae(vae, config: DecoderConfig):
    """An ``AutoencoderTiny`` decoding ``vae``'s latent space (levels, latent channels) per ``config``."""
    from diffusers import AutoencoderTiny

    levels = len(vae.config.block_out_channels)
    blocks = config.blocks if config.blocks is not None else [2] * (levels - 1) + [1]
    if len(blocks) != levels:
        raise SdwbError(f"blocks {blocks}: the model's VAE has {levels} levels "
                        f"({2 ** (levels - 1)}x upsampling); give {levels} counts")
    return AutoencoderTiny(
        in_channels=3, out_channels=int(vae.config.out_channels),
        encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,  # untrained, minimal
        decoder_block_out_channels=(config.channels,) * levels, num_decoder_blocks=tuple(blocks),
        latent_channels=int(vae.config.latent_channels), scaling_factor=1.0, shift_factor=0.0,
    )


def decoder_params(vae) -> int:
    """Parameters used to decode: the decoder (and a KL VAE's post_quant_conv)."""
    modules = [vae.decoder, getattr(vae, "post_quant_conv", None)]
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (unclamped) of UNet-space ``latents``, as the pipeline decodes them."""
    return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


# --------------------------------------------------------------------------- data


@torch.no_grad()
def sample_latents(pipe, count: int, seed: int, steps: int | None, captions: list[str],
                   chunk: int = 64) -> torch.Tensor:
    """``count`` UNet-space latents from the model's own sampler (its recorded defaults), image ``i``
    seeded with ``seed + i``; ``captions`` are cycled."""
    from sdwb.generate import scheduler_swapped
    from sdwb.inference import resolve

    if count == 0:
        return torch.zeros(0)
    chosen = resolve(pipe, steps=steps)
    out = []
    with scheduler_swapped(pipe, chosen["scheduler"]):
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            prompts = [captions[(start + i) % len(captions)] for i in range(n)]
            gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(n)]
            out.append(pipe(prompts, num_inference_steps=chosen["steps"], guidance_scale=chosen["guidance"],
                            generator=gens, output_type="latent").images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def full_decode(vae, latents: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """The full decoder's images of ``latents``, clamped to [-1, 1], in fp16 (training targets)."""
    return torch.cat([decode(vae, latents[i:i + chunk]).clamp(-1, 1).half()
                      for i in range(0, len(latents), chunk)])


def _captions(count: int, base: int) -> list[str]:
    from sdwb import shapes

    return [shapes.sample_from_seed(base + i).caption for i in range(max(1, count))]


def build_pairs(pipe, config: DecoderConfig, work: Path, progress: bool, say) -> dict[str, torch.Tensor]:
    """Training and held-out ``{latents, images}`` of both kinds, cached in ``work/PAIRS_FILE``."""
    from safetensors.torch import load_file, save_file

    from compress.distill import latent_pool
    from sdwb import shapes
    from sdwb.train.common import step_generator

    path = work / PAIRS_FILE
    if path.is_file():
        return load_file(path)
    scaling = float(pipe.vae.config.scaling_factor)
    say("encoding the latent pool")
    pool = latent_pool(pipe, config.latent_pool, work / POOL_FILE, progress=progress)
    noise = torch.randn(pool["mean"].shape, generator=step_generator(config.seed, 0, stream=800))
    encoded = (pool["mean"] + pool["std"] * noise) * scaling
    held = latent_pool(pipe, config.held_out, work / HELD_OUT_FILE, seed_base=shapes.EVAL_SEED_BASE)
    held_encoded = held["mean"] * scaling
    say(f"sampling {config.generated} + {config.held_out} latents with the model's own sampler")
    generated = sample_latents(pipe, config.generated, GENERATED_SEED + config.seed, config.sample_steps,
                               _captions(config.generated, shapes.TRAIN_SEED_BASE))
    held_generated = sample_latents(pipe, config.held_out, HELD_OUT_SEED, config.sample_steps,
                                    shapes.eval_prompts(min(config.held_out, shapes.EVAL_PROMPT_COUNT)))
    say("decoding the targets with the full decoder")
    pairs = {}
    for name, z in (("encoded", encoded), ("generated", generated), ("held_encoded", held_encoded),
                    ("held_generated", held_generated)):
        if len(z):
            pairs[f"{name}.latents"] = z.contiguous()
            pairs[f"{name}.images"] = full_decode(pipe.vae, z).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(pairs, tmp)
    tmp.replace(path)
    return pairs


# --------------------------------------------------------------------------- training


def image_loss(out: torch.Tensor, target: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    diff = out.float() - target.float()
    return config.l1_weight * diff.abs().mean() + config.l2_weight * diff.pow(2).mean()


@torch.no_grad()
def held_out_loss(tiny, pairs: dict, config: DecoderConfig, kind: str = "held_encoded") -> float:
    z, target = pairs[f"{kind}.latents"], pairs[f"{kind}.images"]
    return float(image_loss(decode(tiny, z), target, config))


def train(tiny, pairs: dict, config: DecoderConfig, work: Path, progress: bool) -> dict:
    """Train ``tiny``'s decoder (in place) on ``pairs``; resumable from ``work/checkpoint``."""
    from sdwb.train.common import Checkpointer, cosine_lr, make_accelerator, run_loop, step_generator

    accelerator = make_accelerator()
    device = accelerator.device
    tiny.to(device)
    before = held_out_loss(tiny, pairs, config)
    tiny.decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(tiny.decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(tiny.decoder, optimizer)
    enc_z, enc_x = pairs["encoded.latents"], pairs["encoded.images"]
    gen_z, gen_x = pairs.get("generated.latents"), pairs.get("generated.images")
    n_gen = 0 if gen_z is None else min(config.batch, round(config.batch * config.generated_share))

    def step_fn(step: int) -> dict[str, float]:
        for g in optimizer.param_groups:
            g["lr"] = config.lr * cosine_lr(step, config.steps, config.warmup)
        gen = step_generator(config.seed, step, stream=810)
        i = torch.randint(0, len(enc_z), (config.batch - n_gen,), generator=gen)
        z, x = [enc_z[i]], [enc_x[i]]
        if n_gen:
            j = torch.randint(0, len(gen_z), (n_gen,), generator=gen)
            z.append(gen_z[j])
            x.append(gen_x[j])
        z, x = torch.cat(z).to(device), torch.cat(x).to(device).float()
        out = model(z / tiny.config.scaling_factor)
        diff = out.float() - x
        l1, l2 = diff.abs().mean(), diff.pow(2).mean()
        loss = config.l1_weight * l1 + config.l2_weight * l2
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(tiny.decoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "l1": float(l1.detach()), "l2": float(l2.detach())}

    started = time.perf_counter()
    checkpointer = Checkpointer(work / "checkpoint", {"decoder": tiny.decoder}, optimizer)
    smoothed = run_loop(name="tiny decoder", total_steps=config.steps, step_fn=step_fn,
                        checkpointer=checkpointer, checkpoint_every=config.checkpoint_every,
                        log_path=work / "train_log.jsonl", progress=progress)
    seconds = time.perf_counter() - started
    tiny.eval().requires_grad_(False).cpu()
    return {"steps": config.steps, "seconds_this_run": round(seconds, 1),
            "held_out_loss_before": before, "held_out_loss_after": held_out_loss(tiny, pairs, config),
            "final_smoothed_losses": {k: round(v, 6) for k, v in smoothed.items()}}


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def fidelity(tiny, vae, pairs: dict) -> dict:
    """PSNR (dB) / SSIM of the tiny decoder's images vs the full decoder's, per held-out kind
    (images in [0, 1], float, mean over images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    result = {}
    for kind in ("encoded", "generated"):
        key = f"held_{kind}"
        if f"{key}.latents" not in pairs:
            continue
        z = pairs[f"{key}.latents"]
        full = ((full_decode(vae, z).double() + 1) / 2)
        mine = ((torch.cat([decode(tiny, z[i:i + 32]) for i in range(0, len(z), 32)]).clamp(-1, 1).double()
                 + 1) / 2)
        psnr = peak_signal_noise_ratio(mine, full, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(mine, full, data_range=1.0, reduction="none")
        result[kind] = {"psnr": round(float(psnr.clamp(max=100).mean()), 3),
                        "ssim": round(float(ssim.mean()), 5), "count": len(z)}
    return result


@torch.no_grad()
def decode_times(decoders: dict[str, object], latent_shape: tuple[int, ...], runs: int) -> dict:
    """Median ms per image of each decoder at batch 1 and 8 (torch, CPU, current threads; calls
    interleaved so that load from elsewhere hits every decoder alike)."""
    if runs < 1:
        return {}
    out: dict = {name: {} for name in decoders}
    for batch in TIMED_BATCHES:
        z = torch.randn((batch, *latent_shape), generator=torch.Generator().manual_seed(batch))
        samples: dict[str, list[float]] = {name: [] for name in decoders}
        for vae in decoders.values():
            decode(vae, z)  # warm-up
        for _ in range(runs):
            for name, vae in decoders.items():
                t0 = time.perf_counter()
                decode(vae, z)
                samples[name].append((time.perf_counter() - t0) * 1000 / batch)
        for name in decoders:
            out[name][f"batch_{batch}"] = round(statistics.median(samples[name]), 3)
    names = list(decoders)
    if len(names) == 2:
        a, b = names
        out["speedup"] = {k: round(out[a][k] / out[b][k], 2) for k in out[a] if out[b][k] > 0}
    out["threads"] = torch.get_num_threads()
    out["runs"] = runs
    return out


# --------------------------------------------------------------------------- the verb


def _load_source(source):
    from compress.variant_io import load_source
    from sdwb.loading import require_family
    from sdwb.variants.manifest import source_fingerprint

    require_family(source, "generate")
    src = load_source(source, refuse={
        "quantize": "{spec}: a quantized variant ({method}); distil the decoder of its float parent "
                    "({parent}) and quantize the result",
        STAGE: "{spec}: already has a distilled tiny decoder; distil from its parent ({parent})",
    }, export_error="{spec}: an ONNX export; decoder distillation needs the diffusers pipeline or builtin "
                    "model it was exported from")
    vae = src.pipe.vae
    if not hasattr(vae, "post_quant_conv") or not hasattr(vae.config, "block_out_channels"):
        raise SdwbError(f"{src.parent['spec']}: its VAE is a {type(vae).__name__}; decoder distillation "
                        "starts from an AutoencoderKL")
    if getattr(vae.config, "latents_mean", None) is not None:
        raise SdwbError(f"{src.parent['spec']}: its VAE has latents_mean/latents_std (the pipeline "
                        "de-normalises latents before decoding): not supported")
    fingerprint = source_fingerprint(src.parent["spec"]) if src.path is not None else None
    return src.pipe, src.parent, fingerprint


def distill_decoder(
    source,
    config: DecoderConfig,
    out: str | Path | None = None,
    *,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> TinyDecoded:
    """Train a tiny decoder for ``source`` (spec or pipeline) per ``config``; write the variant to
    ``out`` when given (``work_dir``, default ``OUT.work``, holds the resumable state)."""
    from sdwb.runs import prepare_work_dir

    say = say or (lambda _msg: None)
    from compress.variant_io import output_and_work

    out, work = output_and_work(out, work_dir, overwrite, "decoder")
    say("loading the model")
    pipe, parent, fingerprint = _load_source(source)
    torch.manual_seed(config.seed)  # seeded initialisation (a resumed run loads its checkpoint)
    tiny = build_tiny_vae(pipe.vae, config)  # refuses a blocks list of the wrong length before work
    prepare_work_dir(work, {"config": resolved(config), "source": fingerprint}, "decoder distillation")
    started = time.perf_counter()
    pairs = build_pairs(pipe, config, work, progress, say)
    training = train(tiny, pairs, config, work, progress)
    say("measuring fidelity and decode time")
    latent_shape = tuple(pairs["held_encoded.latents"].shape[1:])
    metrics = {
        "fidelity": fidelity(tiny, pipe.vae, pairs),
        "decoder_params": {"full": decoder_params(pipe.vae), "tiny": decoder_params(tiny)},
        "decode_ms_per_image": decode_times({"full": pipe.vae, "tiny": tiny}, latent_shape,
                                            config.timing_runs),
        "train": training,
    }
    full_class = type(pipe.vae).__name__
    pipe.vae = tiny  # DiffusionPipeline.__setattr__ updates model_index's ("diffusers", "AutoencoderTiny")
    metrics["decoder_seconds"] = round(time.perf_counter() - started, 3)
    from sdwb.variants.record import new_record

    record = new_record(
        stage=STAGE, method=METHOD, backend="torch",
        weights=f"float32 AutoencoderTiny decoder replacing the {full_class}; UNet, text encoder and "
                "scheduler are the parent's",
        parent=parent, config=resolved(config),
        vae={"class": "AutoencoderTiny", "replaces": full_class, "encoder": "untrained",
             "scaling_factor": 1.0, "decodes": "latents / scaling_factor: the UNet's latent space"},
        metrics=metrics,
    )
    if out is not None:
        from compress.variant_io import write_float_variant

        record = write_float_variant(pipe, out, record, overwrite, say)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return TinyDecoded(config, pipe, record, out)
