"""Prompt-guided image editing on any backend: img2img and, with a mask, inpainting.

Why one driver: the edit loop is :class:`sdwb.backends.onnxruntime.ExportedPipeline`'s (diffusers'
img2img / 4-channel inpaint semantics), whatever runs the networks: ONNX Runtime / OpenVINO /
TensorRT sessions, or a diffusers pipeline's own torch modules
(:func:`sdwb.backends.torch_components.components_pipeline`). So an export edits as its torch
source does, and every variant (quantized, pruned, a distilled student with its own steps and
sampler) edits with the settings it generates with.

Seeds as in :func:`sdwb.generate.generate`: edit ``i`` draws its noise from a CPU
``torch.Generator`` seeded ``seed + i``; at ``strength`` 1 that noise is all it starts from, so the
edit equals text-to-image from the same seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdwb.errors import SdwbError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image(path: str | Path, what: str = "--image"):
    """An RGB PIL image from ``path``, or a one-line error (missing, not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise SdwbError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB") if what == "--image" else img.convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise SdwbError(f"{what} {path}: not a readable image ({type(e).__name__})") from None


def image_tensor(image) -> torch.Tensor:
    """A PIL RGB image as ``[1, 3, H, W]`` float32 in [-1, 1] (the VAE encoder's input)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def mask_tensor(mask) -> torch.Tensor:
    """A PIL mask as ``[1, 1, H, W]`` in [0, 1]; white (>= 0.5) is repainted, as in diffusers."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None].contiguous()


def check_edit_inputs(image, strength: float, mask=None) -> None:
    """One-line errors for a strength outside [0, 1] or a mask of another size than the image."""
    if not 0.0 <= float(strength) <= 1.0:
        raise SdwbError(f"--strength {strength}: expected a number in [0, 1] (0 keeps the image, 1 repaints)")
    if mask is not None and mask.size != image.size:
        (mw, mh), (iw, ih) = mask.size, image.size
        raise SdwbError(f"--mask is {mw}x{mh} but --image is {iw}x{ih}: they must be the same size")


def edit_runner(pipe):
    """The pipeline that runs edits for ``pipe``: an exported one as it is, a diffusers one through
    its own modules (built once per pipeline). Cache variants (DeepCache, ToMe) are refused: their
    per-generation reset follows diffusers' own call."""
    from sdwb.backends.onnxruntime import ExportedPipeline

    if isinstance(pipe, ExportedPipeline):
        return pipe
    from sdwb.cache.config import applied

    if applied(pipe) is not None:
        raise SdwbError("a cache variant (DeepCache / ToMe) does not edit; edit the model it was made from")
    runner = getattr(pipe, "_sdwb_edit_runner", None)
    if runner is None:
        from sdwb.backends.torch_components import can_encode, components_pipeline

        if not can_encode(pipe):
            raise SdwbError("this model's VAE is a tiny decoder (AutoencoderTiny, `sdwb compress decoder`) "
                            "with no trained encoder: it cannot encode the image to edit")
        runner = components_pipeline(pipe)
        object.__setattr__(pipe, "_sdwb_edit_runner", runner)
    return runner


def edit(
    pipe,
    image,
    prompts: list[str],
    *,
    strength: float = 0.6,
    mask=None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
    output_type: str = "pil",
) -> list:
    """One edit of the PIL ``image`` per prompt (edit ``i`` seeded ``seed + i``); ``mask`` (a PIL
    image, white = repaint) makes it inpainting. ``steps``, ``guidance`` and ``scheduler`` left at
    None take the model's own defaults (:mod:`sdwb.inference`), as :func:`sdwb.generate.generate`.
    ``strength`` s runs the last ``int(steps * s)`` of the ``steps`` (diffusers' rule). Returns PIL
    images, or ``[1, C, h, w]`` latents per prompt with ``output_type="latent"``."""
    from PIL import Image

    from sdwb.generate import _progress, scheduler_swapped
    from sdwb.inference import resolve

    check_edit_inputs(image, strength, mask)
    runner = edit_runner(pipe)
    chosen = resolve(runner, steps=steps, guidance=guidance, scheduler=scheduler)
    steps, guidance, scheduler = chosen["steps"], chosen["guidance"], chosen["scheduler"]
    if steps < 1:
        raise SdwbError(f"steps must be >= 1 (got {steps})")
    pixels = image_tensor(image)
    masked = mask_tensor(mask) if mask is not None else None
    runner.latent_size(pixels.shape[-2], pixels.shape[-1])  # a size this model cannot take: one line
    results: list = []
    runs = min(int(steps * strength), steps)  # the steps an edit runs (diffusers' rule)
    with scheduler_swapped(runner, scheduler), _progress(progress, len(prompts) * runs, "editing") as advance:

        def on_step(_pipe, _i, _t, kwargs):
            advance()
            return kwargs

        for i, prompt in enumerate(prompts):
            out = runner(prompt, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(seed + i), image=pixels,
                         strength=strength, mask_image=masked, callback_on_step_end=on_step,
                         output_type="latent" if output_type == "latent" else "np").images
            if not torch.isfinite(torch.as_tensor(out)).all():
                raise SdwbError(f"the edit produced NaN/inf for prompt {i} ('{prompt}') with scheduler "
                                f"{scheduler}, {steps} steps, strength {strength}")
            if output_type == "latent":
                results.append(out)
            else:
                results += [Image.fromarray((x * 255).round().clip(0, 255).astype(np.uint8)) for x in out]
    return results
