"""What the image commands (generate, edit) share: the device flag, the console, writing images.

Why a module of its own: ``sdwb.app.cli`` registers every command module, so a command module that
imported these from it would import in a circle (tests/test_layers.py refuses that).
"""

from __future__ import annotations

from pathlib import Path

from sdwb.errors import SdwbError


def resolve_device(device: str) -> str:
    """``--device``: auto (cuda when available, else cpu), cpu or cuda[:N], or a one-line error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdwbError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise SdwbError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return device


def console():
    from rich.console import Console

    return Console()


def write_images(images: list, output: Path, captions: list[str], columns: int, lead=None) -> list[str]:
    """One image: written to ``output``. Several: each written beside it as STEM-NNN.SUFFIX and a
    captioned grid to ``output`` (``lead``: an (image, caption) shown first, e.g. an edit's input).
    Returns the files of the images, in order."""
    from sdwb.generate import captioned_grid
    from sdwb.runs import atomic_save_image

    if len(images) == 1:
        atomic_save_image(images[0], output)
        return [str(output)]
    files = []
    for k, img in enumerate(images):
        path = output.with_name(f"{output.stem}-{k:03d}{output.suffix}")
        atomic_save_image(img, path)
        files.append(str(path))
    if lead is not None:
        images, captions = [lead[0], *images], [lead[1], *captions]
    atomic_save_image(captioned_grid(images, captions, columns=columns), output)
    return files
