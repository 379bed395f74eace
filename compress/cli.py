"""``sdwb compress quantize`` (a typer sub-app): a model and a method in, a guarded variant out.

Why a sub-app here: the compress stage owns its commands; ``sdwb/cli.py`` mounts it with
``app.add_typer(compress_app, name="compress")``. Errors are :class:`SdwbError` and reach the
root CLI's one-line ``error:`` handler unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError

compress_app = typer.Typer(
    help="Compress a model into a variant: quantize (prune and distill join later).",
    no_args_is_help=True,
)


def _components(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    from compress.quant_config import COMPONENTS

    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in COMPONENTS]
    if bad or not names:
        raise SdwbError(
            f"--components {text!r}: expected a comma-separated subset of {', '.join(COMPONENTS)}"
        )
    return names


def _quiet_libraries(method: str) -> None:
    """No tqdm bars from diffusers/transformers saving and loading; torchao imported quietly."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if method.startswith("torchao-"):
        from compress.quant_torch import _torchao

        try:
            _torchao()
        except SdwbError:
            pass  # quantize() reports it, after the clearer device checks


@compress_app.command("quantize")
def quantize_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Variant directory to create.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="builtin:NAME, a diffusers dir, an ONNX export (ort-* methods) or a cached hub id.",
        ),
    ] = "builtin:tiny-shapes",
    method: Annotated[
        Optional[str],
        typer.Option(
            help="torch-bf16 | torch-fp16 | torch-int8-dynamic | "
            "torchao-int8-weight-only | torchao-int4-weight-only | "
            "ort-int8-dynamic | ort-int8-static | ort-fp16."
        ),
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/quantize/*.yaml.")] = None,
    components: Annotated[
        Optional[str], typer.Option(help="Comma list of unet,text_encoder,vae_decoder (default: unet).")
    ] = None,
    calib_prompts: Annotated[
        Optional[int], typer.Option(help="Calibration prompts (ort-int8-static).")
    ] = None,
    min_psnr: Annotated[Optional[float], typer.Option(help="Guard floor, dB vs the float model.")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key, e.g. guard.steps=4."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists (only on success).")] = False,
) -> None:
    """Quantize a model with one method; probe it against the float model; write the variant + sdwb.json.

    torch methods write a diffusers directory (loads with `sdwb generate --model DIR`, benches with
    `sdwb bench`); ort-* methods write an ONNX export (`--backend onnxruntime`).
    """
    from compress.quant_config import backend_of, load_quant_config
    from compress.quantize import quantize

    if method is None and config is None:
        raise SdwbError("give --method METHOD or --config FILE (configs/quantize/*.yaml)")
    flags = {"method": method, "components": _components(components), "guard.min_psnr": min_psnr}
    cfg = load_quant_config(config, set_, **flags)
    if calib_prompts is not None:
        if cfg.method != "ort-int8-static":
            raise SdwbError(f"--calib-prompts: only ort-int8-static calibrates ({cfg.method} does not)")
        cfg = load_quant_config(config, set_, **flags, **{"calibration.prompts": calib_prompts})
    _quiet_libraries(cfg.method)
    from rich.console import Console

    with Console().status(f"quantizing {model} ({cfg.method})", spinner="dots") as status:
        variant = quantize(model, cfg, output, overwrite=overwrite, progress=lambda m: status.update(m))
    m = variant.metrics
    guard = m.get("guard")
    guard_text = (
        f"guard PSNR {guard['psnr']:.1f} dB >= {guard['min_psnr']:g}"
        if isinstance(guard, dict)
        else "guard disabled"
    )
    size = f", {m['size_mb']:.1f} MB" if "size_mb" in m else ""
    typer.echo(f"wrote {output} ({cfg.method}, {backend_of(cfg)}{size}; {guard_text}) and {output}/sdwb.json")
