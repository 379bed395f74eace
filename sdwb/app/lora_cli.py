"""``sdwb lora ...``: train a LoRA adapter, fuse one into a model as a variant.

Loading an adapter without fusing is ``--lora`` of ``sdwb generate`` and the ``lora`` setting of a
bench variant (torch backend; projected onto a pruned variant's widths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.app.compress_cli import OutputOpt, OverwriteOpt, ProgressOpt, _check_output, _say, _set_option

lora_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                       help="LoRA adapters: train one (diffusers format), fuse one into a model.")
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:NAME, a diffusers dir / torch variant, "
                                       "a hub id.")]


@lora_app.command("train", short_help="Train a LoRA on the UNet (the shapes data with rings).")
def train_command(
    output: OutputOpt,
    model: ModelOpt = "builtin:tiny-shapes",
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/lora/*.yaml.")] = None,
    set_: _set_option("steps=500") = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a LoRA (peft, UNet attention projections) on shapes data where most shapes are rings and
    write OUTPUT/pytorch_lora_weights.safetensors (plain diffusers loads it with
    pipe.load_lora_weights(OUTPUT)) and OUTPUT/sdwb.json. Resumes from OUTPUT.work."""
    from sdwb.train.lora import load_lora_train_config, train_lora

    cfg = load_lora_train_config(config, set_)
    _check_output(output, overwrite)
    record = train_lora(model, cfg, output, overwrite=overwrite, progress=progress,
                        say=_say(progress) or (lambda _m: None))
    m = record["metrics"]
    typer.echo(f"wrote {output} (rank {cfg.rank}, {record['layers']} layers, "
               f"{record['trainable_params'] / 1e3:.1f} k parameters, {cfg.steps} steps in "
               f"{m['train_seconds']:.0f} s, loss {m['final_loss_smoothed']:.4f})")


@lora_app.command("fuse", short_help="Merge a LoRA into a model's weights; write the result as a variant.")
def fuse_command(
    output: OutputOpt,
    lora: Annotated[str, typer.Option("--lora", "-l", help="builtin:NAME, a LoRA dir or .safetensors file.")],
    model: ModelOpt = "builtin:tiny-shapes",
    scale: Annotated[float, typer.Option(min=0.0, max=4.0, help="LoRA strength (1.0: as trained).")] = 1.0,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Write MODEL with LORA merged into its float weights: quantize it, export it or distil from it
    like any float variant (the fused route). A pruned MODEL gets the adapter projected onto its kept
    channels; a quantized one is refused (fuse into its parent, then quantize)."""
    from compress.lora_fuse import fuse_variant

    _check_output(output, overwrite)
    record = fuse_variant(model, lora, output, scale=scale, overwrite=overwrite,
                          say=_say(progress) or (lambda _m: None))
    typer.echo(f"wrote {output} ({model} + {lora} fused at scale {scale:g}, "
               f"{record['lora']['pairs']} pairs) and {output}/sdwb.json")
