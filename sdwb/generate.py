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
def _progress(enabled: bool, total: int, label: str = "generating"):
    """A rich progress bar over denoising steps; yields an ``advance()`` callable."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from sdwb.progress import make_progress

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with make_progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
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


CAPTION_MIN_WIDTH = 192  # px: a caption column is at least this wide, however small the image
CAPTION_MAX_LINES = 4


def _caption_font(size: int):
    """PIL's default font at ``size`` px (scalable where PIL has FreeType, else its fixed bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow, or no FreeType: the 11 px bitmap font
        return ImageFont.load_default()


def _wrap_words(text: str, width: float, measure) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and measure(candidate) <= width:
            lines[-1] = candidate
            continue
        while word and measure(word) > width:  # one word wider than the line: split it
            cut = next((i for i in range(len(word) - 1, 0, -1) if measure(word[:i]) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        if word:
            lines.append(word)
    return lines


def wrap_caption(text: str, width: float, measure, max_lines: int = CAPTION_MAX_LINES) -> list[str]:
    """``text`` broken into lines no wider than ``width`` (``measure(s)`` gives a string's width):
    at spaces, a word wider than a line split where it must. Each ``\\n``-separated part starts a
    new line; past ``max_lines`` the first part is cut short, ending in ``...``, so later (short)
    parts such as a ``seed N`` line stay."""
    head, *rest = str(text).split("\n")
    tail = [line for part in rest for line in _wrap_words(part, width, measure)][: max_lines - 1]
    lines = _wrap_words(head, width, measure)
    room = max_lines - len(tail)
    if len(lines) > room:
        last = lines[room - 1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        lines = lines[: room - 1] + [last.rstrip() + "..."]
    return (lines + tail) or [""]


def captioned_grid(images: list, captions: list[str], columns: int, *,
                   min_width: int = CAPTION_MIN_WIDTH, max_lines: int = CAPTION_MAX_LINES, gap: int = 8):
    """Equally sized PIL images in a grid, row-major, each with its caption wrapped and centred underneath.

    Each cell is the image's width, or ``min_width`` for small images (the image centred above),
    so the text stays readable under a 64 px image; every cell of the grid keeps room for as
    many lines as the longest caption needs (at most ``max_lines``); cells are ``gap`` px apart."""
    from PIL import Image, ImageDraw

    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    w, h = images[0].size
    cell_w = max(w, min_width)
    pad = 4
    font = _caption_font(max(12, min(18, cell_w // 24)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_caption(c, cell_w - 2 * pad, lambda s: probe.textlength(s, font=font), max_lines)
               for c in captions]
    line_h = font.getbbox("Agjy|")[3] + 3  # bitmap fonts have no getmetrics()
    cap_h = 2 * pad + line_h * max(len(lines) for lines in wrapped)
    cell_h = h + cap_h
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell_w + gap) - gap, rows * (cell_h + gap) - gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped)):
        x0, y0 = (i % columns) * (cell_w + gap), (i // columns) * (cell_h + gap)
        grid.paste(img, (x0 + (cell_w - w) // 2, y0))
        for k, line in enumerate(lines):  # centred under the image
            x = x0 + (cell_w - draw.textlength(line, font=font)) / 2
            draw.text((x, y0 + h + pad + k * line_h), line, fill=(20, 20, 20), font=font)
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
    from sdwb.cache.config import check_steps

    check_steps(pipe, steps)  # a DeepCache variant asked for one step: nothing to reuse
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
