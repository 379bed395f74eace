"""`sdwb baseline train`: judge -> VAE -> UNet + text encoder -> evaluation, resumable.

Why: the shipped `builtin:tiny-shapes` and `builtin:shapes-judge` must be reproducible from one
command on two CPU cores. Each stage writes its finished artifact atomically and is skipped on a
re-run; an interrupted stage resumes from its last checkpoint. Output layout::

    OUT/shapes-judge/   transformers CLIPModel + CLIPProcessor (HF layout)
    OUT/tiny-shapes/    diffusers StableDiffusionPipeline layout (+ sdwb.json)
    OUT/work/           checkpoints, latent pool (resumable state; safe to delete when done)
    OUT/train_log.jsonl OUT/config.resolved.yaml OUT/eval.json OUT/grid.png
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from sdwb.errors import SdwbError
from sdwb.train.config import BaselineTrainConfig


def _atomic_save(final: Path, save) -> None:
    """Call ``save(tmp_dir)`` then rename into ``final``: a crash leaves no complete-looking dir."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def train_baseline(cfg: BaselineTrainConfig, out: Path, progress: bool = True, evaluate: bool = True) -> dict:
    """Run every stage that is not finished yet; returns the summary also written to eval.json."""
    from sdwb.tokenizer import save_tokenizer
    from sdwb.train.common import make_accelerator
    from sdwb.train.judge import train_judge
    from sdwb.train.unet import train_unet
    from sdwb.train.vae import train_vae

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    summary_path = out / "eval.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("timings_s", {})
    summary["config"] = cfg.model_dump()
    summary["threads"] = torch.get_num_threads()
    accelerator = make_accelerator()
    work = out / "work"

    judge_dir = out / "shapes-judge"
    if not (judge_dir / "config.json").exists():
        t0 = time.time()
        (work / "judge").mkdir(parents=True, exist_ok=True)
        result = {}

        def save_judge(tmp: Path) -> None:
            result.update(train_judge(cfg, tmp, work / "judge", accelerator, progress))

        _atomic_save(judge_dir, save_judge)
        summary["judge"] = result
        summary["timings_s"]["judge"] = round(time.time() - t0, 1)
        _write_json(summary_path, summary)
        _print(f"judge: {result}")

    pipe_dir = out / "tiny-shapes"
    if not (pipe_dir / "sdwb.json").exists():
        t0 = time.time()
        (work / "vae").mkdir(parents=True, exist_ok=True)
        (work / "unet").mkdir(parents=True, exist_ok=True)
        vae, vae_eval = train_vae(cfg, work / "vae", accelerator, progress)
        summary["vae"] = vae_eval
        summary["timings_s"]["vae"] = round(time.time() - t0, 1)
        _print(f"vae: {vae_eval}")
        t0 = time.time()
        tokenizer = save_tokenizer(work / "unet" / "tokenizer")
        unet, text_encoder = train_unet(cfg, vae, tokenizer, work / "unet", accelerator, progress)
        summary["timings_s"]["unet_text_encoder"] = round(time.time() - t0, 1)
        _atomic_save(pipe_dir, lambda tmp: save_pipeline(tmp, vae, text_encoder, tokenizer, unet, cfg))
        _write_json(summary_path, summary)

    if evaluate:
        t0 = time.time()
        summary["eval"] = evaluate_pipeline(pipe_dir, judge_dir, cfg, out / "grid.png", progress)
        summary["timings_s"]["eval"] = round(time.time() - t0, 1)
        _print(f"eval: {summary['eval']}")
    summary["timings_s"]["total_train"] = round(
        sum(v for k, v in summary["timings_s"].items() if k in ("judge", "vae", "unet_text_encoder")), 1
    )
    _write_json(summary_path, summary)
    return summary


def save_pipeline(directory: Path, vae, text_encoder, tokenizer, unet, cfg: BaselineTrainConfig) -> None:
    """Save the StableDiffusionPipeline plus its sdwb.json.

    With ``store_dtype="fp16"`` the UNet and VAE are stored in fp16 (half the bytes) and the text
    encoder stays fp32: diffusers upcasts its own models to the pipeline's fp32 default on a plain
    ``from_pretrained(path)``, but transformers keeps a stored fp16 text encoder in fp16, which
    would feed fp16 states into an fp32 UNet.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdwb.tiny_arch import scheduler_config

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if cfg.store_dtype == "fp16":
        unet.to(torch.float16)
        vae.to(torch.float16)
    pipe.save_pretrained(directory, safe_serialization=True)
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    _write_json(
        directory / "sdwb.json",
        {
            "model": "builtin:tiny-shapes",
            "stage": "baseline",
            "parent": None,
            "store_dtype": cfg.store_dtype,
            "params": params,
            "config": cfg.model_dump(),
            "libraries": _library_versions(),
        },
    )


def evaluate_pipeline(
    model: str | Path,
    judge_spec: str | Path,
    cfg: BaselineTrainConfig,
    grid_path: Path | None,
    progress: bool = True,
) -> dict:
    """Generate the held-out eval prompts and score them with the judge (accuracies + CLIP score)."""
    from sdwb import shapes
    from sdwb.generate import generate
    from sdwb.judge import bootstrap_interval, load_judge
    from sdwb.loading import load_pipeline

    ec = cfg.eval
    pipe = load_pipeline(str(model))
    samples = shapes.eval_samples(ec.prompts) if ec.prompts >= 1 else ()
    prompts = [s.caption for s in samples]
    t0 = time.time()
    images = generate(
        pipe,
        prompts,
        steps=ec.steps,
        guidance=ec.guidance,
        seed=cfg.seed,
        scheduler=ec.scheduler,
        batch=ec.batch,
        progress=progress,
    )
    gen_s = time.time() - t0
    judge = load_judge(str(judge_spec))
    preds = judge.classify(images, [s.attributes for s in samples])
    scores = judge.clip_scores(images, prompts)
    clip, lo, hi = bootstrap_interval(scores)
    result = {
        "prompts": len(prompts),
        "steps": ec.steps,
        "guidance": ec.guidance,
        "scheduler": ec.scheduler,
        "clip_score": round(clip, 2),
        "clip_score_lo": round(lo, 2),
        "clip_score_hi": round(hi, 2),
        "generation_s_per_image": round(gen_s / max(1, len(prompts)), 4),
    }
    for name, correct in preds.correct.items():
        acc, acc_lo, acc_hi = bootstrap_interval(correct.astype(float))
        result.update(
            {
                f"{name}_acc": round(acc, 4),
                f"{name}_acc_lo": round(acc_lo, 4),
                f"{name}_acc_hi": round(acc_hi, 4),
            }
        )
    real = [s.render() for s in samples]
    real_scores = judge.clip_scores(real, prompts)
    result["clip_score_dataset_images"] = round(float(real_scores.mean()), 2)
    if grid_path is not None and ec.grid:
        save_grid(images[: ec.grid], prompts[: ec.grid], grid_path)
    return result


def save_grid(images, captions, path: Path, columns: int = 6) -> None:
    """A labelled image grid (2x upscaled tiles, captions underneath)."""
    from PIL import Image, ImageDraw

    cell_w, cell_h, tile = 200, 190, 128
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        x0, y0 = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(im.resize((tile, tile), Image.NEAREST), (x0 + (cell_w - tile) // 2, y0 + 4))
        words, line, lines = cap.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > 32:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:4]):
            draw.text((x0 + 4, y0 + tile + 8 + 11 * k), text, fill="black")
    grid.save(path)


def install(out: Path, assets: Path) -> None:
    """Copy the trained models into the package's assets directory (atomically per model)."""
    for name in ("tiny-shapes", "shapes-judge"):
        src = out / name
        if not src.is_dir():
            raise SdwbError(f"nothing to install: {src} does not exist (train first)")
        _atomic_save(assets / name, lambda tmp, src=src, name=name: _copy_listed(src, tmp, name))


def _copy_listed(src: Path, tmp: Path, name: str) -> None:
    """The trained model plus its ``sdwb-files.json`` (the sha256 list the loader verifies builtins by)."""
    from sdwb.verify import FILES_MANIFEST, write_files_manifest

    shutil.copytree(src, tmp, dirs_exist_ok=True)
    (tmp / FILES_MANIFEST).unlink(missing_ok=True)
    write_files_manifest(tmp, f"builtin:{name}")


def _print(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg)


@torch.no_grad()
def evaluate_reconstructions(model: str | Path, judge_spec: str | Path, count: int = 256) -> dict:
    """Judge accuracy on held-out data-set images and on their VAE reconstructions.

    Why: the UNet can never beat its VAE decoder. If colour or shape is lost in reconstruction,
    retraining the UNet is pointless; this is the gate to check before it.
    """
    import numpy as np

    from sdwb import shapes
    from sdwb.judge import load_judge
    from sdwb.loading import load_pipeline

    vae = load_pipeline(str(model)).vae
    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 900_000 + i) for i in range(count)]
    real = np.stack([s.render() for s in samples])
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = torch.cat(
        [vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, count, 64)]
    )
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    judge = load_judge(str(judge_spec))
    expected = [s.attributes for s in samples]
    mse = ((rec_u8.astype(np.float64) - real) / 255) ** 2
    return {
        "images": count,
        "recon_psnr_db": round(
            float(np.mean(10 * np.log10(1 / np.maximum(mse.mean(axis=(1, 2, 3)), 1e-10)))), 2
        ),
        "judge_on_originals": {
            k: round(v, 4) for k, v in judge.classify(list(real), expected).accuracy().items()
        },
        "judge_on_reconstructions": {
            k: round(v, 4) for k, v in judge.classify(list(rec_u8), expected).accuracy().items()
        },
    }
