"""``sdwb edit``: img2img and inpainting on any model and backend (the loop is :mod:`sdwb.edit`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def edit_command(
    image: Annotated[Path, typer.Option("--image", "-i", help="The image to edit (the model's size).")],
    prompt: Annotated[
        list[str], typer.Option("--prompt", "-p", metavar="TEXT", help="What the edit shows (repeatable).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write (.png/.jpg).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="builtin:NAME, a directory, an ONNX / OpenVINO export.")
    ] = "builtin:tiny-shapes",
    strength: Annotated[
        float, typer.Option(help="0 keeps the image, 1 repaints it from noise; runs int(steps x strength).")
    ] = 0.6,
    mask: Annotated[
        Optional[Path], typer.Option(help="Inpainting: white is repainted, the rest kept (same size).")
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option(help="Denoising steps before strength (default: the model's).")
    ] = None,
    guidance: Annotated[
        Optional[float], typer.Option(help="Guidance scale (default: the model's, else 7.5).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of edit 0; edit k uses seed+k.")] = 0,
    scheduler: Annotated[
        Optional[str], typer.Option(help="ddim | euler | dpmpp | lcm (default: the model's, else ddim).")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="auto | torch | onnxruntime | openvino (auto: from the model directory).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a STEM.json beside OUTPUT that sdwb edit did not write.")
    ] = False,
) -> None:
    """Edit an image under a prompt: img2img (the image noised part-way, then denoised under the
    prompt, so its layout stays) or, with --mask, inpainting (only the white part of the mask is
    repainted). Same models, backends, schedulers and seeds as generate; a distilled student edits
    with its own steps. Writes OUTPUT (a captioned grid for several prompts) and STEM.json."""
    from sdwb import __version__
    from sdwb.app.cli_output import console, resolve_device, write_images
    from sdwb.backends.registry import backend_for, check_model, open_exported
    from sdwb.edit import check_edit_inputs, edit, read_image
    from sdwb.inference import resolve
    from sdwb.preflight import check_prompts, check_sidecar
    from sdwb.runs import atomic_write_json, check_writable_file

    check_prompts(prompt)
    picture = read_image(image)
    mask_image = read_image(mask, "--mask") if mask is not None else None
    check_edit_inputs(picture, strength, mask_image)
    if backend == "auto":
        backend = backend_for(model)
    if backend not in ("torch", "onnxruntime", "openvino"):
        raise SdwbError(f"--backend {backend}: sdwb edit runs on torch, onnxruntime or openvino")
    output = check_writable_file(output, OUTPUT_SUFFIXES)
    check_sidecar(output.with_suffix(".json"), output, overwrite, command="edit")
    device = resolve_device(device)
    from sdwb.loading import quiet_library_progress

    quiet_library_progress()  # diffusers' loading bars: ours replace them
    started = time.perf_counter()
    with console().status(f"loading {model}", spinner="dots"):
        if backend == "torch":
            from sdwb.cache.config import refuse_cache_variant
            from sdwb.loading import load_pipeline

            refuse_cache_variant(model, "sdwb edit")
            pipe = load_pipeline(model, device=device)
        else:
            pipe = open_exported(backend, check_model(backend, model), device=device)
    images = edit(pipe, picture, prompt, strength=strength, mask=mask_image, steps=steps, guidance=guidance,
                  seed=seed, scheduler=scheduler, progress=progress)
    captions = [f"{p}\nseed {seed + k}" for k, p in enumerate(prompt)]
    files = write_images(images, output, captions, columns=len(images) + 1, lead=(picture, "input"))
    record = {
        "command": "edit", "sdwb_version": __version__, "model": model, "backend": backend, "device": device,
        "image": str(image), "mask": str(mask) if mask is not None else None, "strength": strength,
        **resolve(pipe, steps=steps, guidance=guidance, scheduler=scheduler), "output": str(output),
        "edits": [{"prompt": p, "seed": seed + k, "file": f} for k, (p, f) in enumerate(zip(prompt, files))],
        "seconds": round(time.perf_counter() - started, 3),
    }
    meta = atomic_write_json(output.with_suffix(".json"), record)
    typer.echo(f"wrote {output} ({len(images)} edit{'s' if len(images) > 1 else ''}) and {meta}")
