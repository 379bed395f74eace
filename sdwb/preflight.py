"""Checks of a command's inputs that run before any work starts (before weights are loaded).

Why: a bad input noticed late costs minutes and says the wrong thing -- a non-UTF-8 prompt was
an internal ``TypeError`` after the model had loaded, ``--height 65536 --width 65536`` an
internal out-of-memory after 404 s, an existing ``x.json`` beside ``-o x.png`` was overwritten.
Each check here is cheap (it reads at most a model's config files) and raises one
:class:`SdwbError` line naming the input:

- :func:`check_prompts`: every prompt is text that encodes as UTF-8 (an argument with invalid
  bytes arrives as lone surrogates) and is not empty.
- :func:`check_resolution`: height / width are multiples of the model's VAE factor, at most
  ``MAX_SIDE_FACTOR`` times its native size per side, and the VAE decoder's activations at that
  size (the peak of a pipeline call) fit in the memory available now.
- :func:`check_sidecar`: the record written beside an output (``STEM.json``) replaces only a
  record that ``sdwb generate`` wrote for the same output, unless ``--overwrite``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdwb.errors import SdwbError

MAX_SIDE_FACTOR = 16  # per side, times the model's native size: far past what SD models generate well
ACTIVATIONS_ALIVE = 3  # full-resolution decoder tensors alive at once (input, output, a temporary)


def check_prompts(prompts: list[str], flag: str = "--prompt") -> None:
    """Refuse a prompt that is not UTF-8 text, or is empty, before any model is loaded."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise SdwbError(f"{flag} {i + 1}: expected text, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = prompt[exc.start]
            byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
            raise SdwbError(f"{flag} {i + 1}: not valid UTF-8 text at character {exc.start + 1}{byte}; "
                            "pass the prompt in UTF-8") from None
        if not prompt.strip():
            raise SdwbError(f"{flag} {i + 1}: empty prompt")


def _model_facts(spec: str) -> dict | None:
    """``{"native", "factor", "channels"}`` of a pipeline spec from its config files (nothing is
    loaded): native image side, VAE downscale factor, widest full-resolution decoder channels.
    None when they cannot be read (the loader names the problem then)."""
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin

    try:
        if spec.startswith(BUILTIN_PREFIX) and get_builtin(spec).asset is None:
            module = "sdwb.sdxl" if get_builtin(spec).family == "sdxl" else "sdwb.sd15"
            import importlib

            mod = importlib.import_module(module)
            prefix = "SDXL" if module == "sdwb.sdxl" else "SD15"
            unet, vae = getattr(mod, f"{prefix}_UNET"), getattr(mod, f"{prefix}_VAE")
        else:
            from sdwb.loading import resolve_spec

            root = resolve_spec(spec, "pipeline")
            unet = json.loads((root / "unet" / "config.json").read_text())
            vae = json.loads((root / "vae" / "config.json").read_text())
        channels = [int(c) for c in vae["block_out_channels"]]
        factor = 2 ** (len(channels) - 1)
        return {"native": int(unet["sample_size"]) * factor, "factor": factor, "channels": channels[0]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, SdwbError):
        return None


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of this machine (Linux), else None (no memory check then)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decode_bytes(height: int, width: int, images: int, channels: int, dtype_bytes: int = 4) -> int:
    """A lower bound of the VAE decoder's peak: its last block runs at full resolution with
    ``channels`` channels for every image of the call, several such tensors alive at once."""
    return ACTIVATIONS_ALIVE * images * height * width * channels * dtype_bytes


def check_resolution(spec: str, height: int | None, width: int | None, images: int = 1,
                     dtype_bytes: int = 4, device: str = "cpu") -> None:
    """Refuse a size the model cannot take or this machine cannot hold, before loading it."""
    if height is None and width is None:
        return
    facts = _model_facts(spec)
    for flag, value in (("--height", height), ("--width", width)):
        if value is None:
            continue
        if value < 8:
            raise SdwbError(f"{flag} {value}: expected at least 8 pixels")
        if facts is None:
            continue
        if value % facts["factor"]:
            raise SdwbError(f"{flag} {value}: expected a multiple of {facts['factor']} for {spec}")
        limit = MAX_SIDE_FACTOR * facts["native"]
        if value > limit:
            raise SdwbError(f"{flag} {value}: above {limit}, {MAX_SIDE_FACTOR}x the {facts['native']} px "
                            f"{spec} was made for")
    if facts is None or not str(device).startswith("cpu"):
        return
    h = height or facts["native"]
    w = width or facts["native"]
    need = decode_bytes(h, w, images, facts["channels"], dtype_bytes)
    have = available_memory_bytes()
    if have is not None and need > have:
        raise SdwbError(f"--height {h} --width {w}: decoding {images} image(s) of that size needs at least "
                        f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available; use a "
                        "smaller size or fewer images per call")


def check_sidecar(path: Path, output: Path, overwrite: bool, command: str = "generate") -> None:
    """Refuse to replace ``path`` (the ``.json`` beside ``output``) unless it is a record that
    ``sdwb <command>`` wrote for this same output, or ``overwrite``."""
    if overwrite or not path.exists():
        return
    if path.is_dir():
        raise SdwbError(f"{path}: is a directory; the record of {output} is written there (choose another "
                        "--output)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(data, dict) and data.get("command") == command and \
            Path(str(data.get("output"))).resolve() == output.resolve()
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise SdwbError(f"{path}: exists and is not the record of an earlier `sdwb {command}` of {output}; "
                        "refusing to overwrite it (choose another --output, or pass --overwrite)")
