"""Generate images on any backend: scheduler by name, per-prompt seeds, NaN guard.

Every backend's pipeline answers diffusers' ``StableDiffusionPipeline.__call__`` (a diffusers
pipeline for torch; :class:`sdwb.backends.onnxruntime.ExportedPipeline` for ONNX Runtime and
TensorRT), so :func:`generate` is the one loop driver and never asks which kind it holds.

Why per-prompt seeds: image ``i`` always starts from the noise of ``torch.Generator`` seeded
with ``seed + i`` (drawn on the CPU), so an image depends on its prompt, seed and model only,
never on the batch size or the device the noise lands on. That is what lets PSNR/SSIM compare a
compressed variant with its baseline image by image.
"""

from __future__ import annotations

import contextlib
import math
from typing import get_args

import numpy as np
import torch

from sdwb.errors import SdwbError
from sdwb.yaml_io import Scheduler

SCHEDULERS = get_args(Scheduler)  # one list of names: the recipe schema's


def make_scheduler(name: str, config):
    """A fresh scheduler of kind ``name`` (ddim | euler | dpmpp | lcm) built from a scheduler ``config``.

    ``lcm`` is for consistency-distilled students (``compress distill --method lcm``): their saved
    ``LCMScheduler`` config carries the teacher grid (``original_inference_steps``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    key = name.lower().replace("-", "").replace("+", "p")
    if key == "ddim":
        return DDIMScheduler.from_config(config)
    if key == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if key in ("dpmpp", "dpmsolverpp"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if key == "lcm":
        return LCMScheduler.from_config(config)
    raise SdwbError(f"unknown scheduler '{name}': expected one of {', '.join(SCHEDULERS)}")


@contextlib.contextmanager
def scheduler_swapped(pipe, name: str):
    """``with scheduler_swapped(pipe, "ddim"):`` the pipeline samples with a fresh scheduler of kind
    ``name`` (built from its own scheduler's config) and draws no progress bar of its own; its
    scheduler is restored afterwards. Every backend's pipeline has a swappable ``scheduler``."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """A rich progress bar over denoising steps; yields an ``advance()`` callable."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        yield lambda: bar.advance(task)


def image_grid(images: list, columns: int):
    """Paste equally sized PIL images into a grid, row-major."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def _describe(pipe) -> str:
    """``dtype torch.float32`` for a diffusers pipeline; the backend of an exported one."""
    describe = getattr(pipe, "describe", None)
    return describe() if callable(describe) else f"dtype {pipe.unet.dtype}"


def generate(
    pipe,
    prompts: list[str],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> list:
    """One PIL image per prompt, in chunks of ``batch``; image ``i`` is seeded with ``seed + i``.

    The pipeline's scheduler is swapped for ``scheduler`` for this call only. ``steps``,
    ``guidance`` and ``scheduler`` left at None take the model's own defaults (a distilled
    variant's ``sdwb.json``, see :mod:`sdwb.inference`), else the global defaults. Raises
    :class:`SdwbError` on bad arguments or when an output holds NaN/inf.
    """
    from PIL import Image

    from sdwb.inference import resolve

    chosen = resolve(pipe, steps=steps, guidance=guidance, scheduler=scheduler)
    steps, guidance, scheduler = chosen["steps"], chosen["guidance"], chosen["scheduler"]
    prompts = list(prompts)
    if steps < 1 or batch < 1:
        raise SdwbError(f"steps and batch must be >= 1 (got steps={steps}, batch={batch})")
    images: list = []
    with scheduler_swapped(pipe, scheduler), _progress(progress, len(prompts) * steps) as advance, \
            torch.inference_mode():

        def on_step(_pipe, _i, _t, kwargs):
            advance()
            return kwargs

        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generators = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
            out = pipe(
                chunk,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                height=height,
                width=width,
                output_type="np",
                callback_on_step_end=on_step,
            ).images
            if not np.isfinite(out).all():
                first = start + int(np.argmax(~np.isfinite(out).reshape(len(chunk), -1).all(axis=1)))
                raise SdwbError(
                    f"generation produced NaN/inf for prompt {first} ('{prompts[first]}') with "
                    f"scheduler {scheduler}, {steps} steps, {_describe(pipe)}"
                )
            images += [Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8)) for img in out]
    return images
