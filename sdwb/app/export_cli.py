"""``sdwb export onnx|openvino|tensorrt`` (a typer sub-app) and the backend switch for ``sdwb generate``.

Why a module of its own: one module per verb group of the application layer; the root CLI
(``sdwb/app/cli.py``) only mounts ``export_app`` (``app.add_typer(export_app, name="export")``) and calls
:func:`generate_with_backend` for ``--backend onnxruntime|tensorrt``. Errors are
:class:`SdwbError` and reach the root CLI's one-line ``error:`` handler unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError
from sdwb.progress import status

export_app = typer.Typer(
    rich_markup_mode=None,
    help="Export a model to ONNX or OpenVINO IR (validated) or build TensorRT engines from an export.",
    no_args_is_help=True,
)


def _console():
    from rich.console import Console

    return Console()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _parse_components(text: str) -> list[str]:
    from export.interfaces import COMPONENTS

    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in COMPONENTS]
    if bad or not names:
        raise SdwbError(f"--components {text!r}: expected a comma-separated subset of "
                        f"{', '.join(COMPONENTS)}")
    return names


def _check_output(output: Path, overwrite: bool) -> None:
    """The export directory can be written: checked before any model is loaded (sdwb.runs)."""
    from sdwb.runs import check_writable_dir

    if output.exists() and not overwrite:
        raise SdwbError(f"{output}: already exists (refusing to overwrite a finished export; --overwrite)")
    check_writable_dir(output, f"--output {output}")


@export_app.command("onnx", short_help="Export a model to ONNX, each graph validated against PyTorch.")
def onnx_command(
    model: Annotated[str, typer.Option("--model", "-m", help="builtin:NAME, a variant dir, or a hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Export directory to create.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (17-21).")] = 18,
    components: Annotated[
        str, typer.Option(help="Comma-separated: text_encoder,unet,vae_decoder[,vae_encoder].")
    ] = "text_encoder,unet,vae_decoder",
    slim: Annotated[bool, typer.Option(help="ONNX Runtime offline optimisation (basic level).")] = False,
    max_batch: Annotated[int, typer.Option(help="Most images per call in the dynamic ranges.")] = 8,
    exporter: Annotated[str, typer.Option(help="auto | torchscript | dynamo.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists (only on success).")] = False,
) -> None:
    """Export a model's components to ONNX, validate each against PyTorch, write manifest.json."""
    from rich.table import Table

    from export.onnx import export_onnx

    names = _parse_components(components)
    _check_output(output, overwrite)  # before the model loads (minutes for a large one)
    console = _console()
    with status(f"exporting {model}", console=console) as update:
        manifest = export_onnx(model, output, opset=opset, components=names, slim=slim, max_batch=max_batch,
                               exporter=exporter, overwrite=overwrite,
                               progress=lambda msg: update(f"{model}: {msg}"))
    table = Table(title=f"{output} (opset {opset})")
    for col in ("component", "size", "exporter", "export s", "max abs err", "max rel err"):
        table.add_column(col)
    for name, entry in manifest["components"].items():
        size = sum(v["size"] for k, v in manifest["files"].items() if k.startswith(name + "/"))
        worst = max(entry["validation"], key=lambda r: r["max_abs"])
        table.add_row(name, _size(size), entry["exporter"], f"{entry['export_seconds']:.1f}",
                      f"{worst['max_abs']:.2e}", f"{worst['max_rel']:.2e}")
    console.print(table)
    count = len(manifest["components"])
    typer.echo(f"wrote {output} ({count} components, validated) and {output}/manifest.json "
               f"(process peak RSS {peak_rss_mb():.0f} MB)")


def peak_rss_mb() -> float:
    """This process's peak resident set size, MB (``VmHWM``; ``ru_maxrss`` where /proc is absent).

    ``VmHWM`` rather than ``ru_maxrss``: Linux carries a parent's high-water mark into a child's
    ``ru_maxrss`` across fork + exec, which would misreport an export started by a big process.
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@export_app.command("openvino", short_help="Convert a model or an ONNX export to OpenVINO IR, validated.")
def openvino_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="OpenVINO IR directory to create.")],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="builtin:NAME, a variant dir, or a hub id.")
    ] = None,
    onnx: Annotated[
        Optional[Path], typer.Option("--onnx", help="Or an ONNX export directory (sdwb export onnx).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images per call in the dynamic ranges.")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists (only on success).")] = False,
) -> None:
    """Convert a model (via ONNX) or an ONNX export to OpenVINO IR; validate each graph; write a manifest."""
    from rich.table import Table

    from export.openvino import export_openvino, ir_summary

    if (model is None) == (onnx is None):
        raise SdwbError("export openvino: give exactly one of --model SPEC or --onnx DIR")
    source = model if model is not None else onnx
    _check_output(output, overwrite)
    console = _console()
    with status(f"exporting {source} to OpenVINO IR", console=console) as update:
        manifest = export_openvino(source, output, max_batch=max_batch, overwrite=overwrite,
                                   progress=lambda msg: update(f"{source}: {msg}"))
    table = Table(title=f"{output} (OpenVINO {manifest['openvino'].split('-')[0]})")
    for col in ("component", "size", "max abs err", "validated against"):
        table.add_column(col)
    for name, size, worst, against in ir_summary(manifest):
        table.add_row(name, _size(size), f"{worst:.2e}", against)
    console.print(table)
    typer.echo(f"wrote {output} ({len(manifest['components'])} components, validated) and "
               f"{output}/manifest.json (process peak RSS {peak_rss_mb():.0f} MB)")


@export_app.command("tensorrt", short_help="Build TensorRT engines from an ONNX export (NVIDIA GPU).")
def tensorrt_command(
    onnx: Annotated[Path, typer.Option("--onnx", help="An ONNX export directory (sdwb export onnx).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Engine directory to create.")],
    fp16: Annotated[bool, typer.Option(help="Allow fp16 kernels.")] = False,
    int8: Annotated[bool, typer.Option(help="int8 from QDQ graphs (explicit quantization).")] = False,
    timing_cache: Annotated[
        Optional[Path], typer.Option(help="Timing cache file (default ~/.cache/sdwb/tensorrt/).")
    ] = None,
    strict_fp32: Annotated[bool, typer.Option(help="Disable TF32 in fp32 builds.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists (only on success).")] = False,
) -> None:
    """Build one TensorRT engine per component of an ONNX export (needs an NVIDIA GPU + tensorrt)."""
    from export.tensorrt import build_engines

    _check_output(output, overwrite)
    with status(f"building engines from {onnx}") as update:
        manifest = build_engines(onnx, output, fp16=fp16, int8=int8, timing_cache=timing_cache,
                                 strict_fp32=strict_fp32, overwrite=overwrite, progress=update)
    for name, entry in manifest["components"].items():
        typer.echo(f"{name}: {entry['file']} ({entry['build_seconds']:.0f} s)")
    built = f"TensorRT {manifest['tensorrt']}, {manifest['gpu']}"
    typer.echo(f"wrote {output} ({built}) and {output}/manifest.json")


def generate_with_backend(backend: str, model_dir: str | Path, prompts: list[str], *, providers=None,
                          threads: int | None = None, device: str = "cpu", dtype=None,
                          exported_dtype: str = "fp32", **kw) -> list:
    """PIL images for ``prompts`` from ``model_dir`` on ``backend`` (torch | onnxruntime | tensorrt).

    ``kw`` are :func:`sdwb.generate.generate`'s (steps, guidance, seed, scheduler, batch, height,
    width, progress). ``model_dir``: a model spec for torch, an ONNX export for onnxruntime, an
    engine directory for tensorrt (anything else: a one-line error saying which export to run
    first, see :func:`sdwb.backends.registry.check_model`). ``providers`` (default: from ``device``) and
    ``threads`` (intra-op) apply to onnxruntime only; ``dtype`` (a torch dtype) to torch only;
    ``exported_dtype`` ("fp32" | "bf16") to openvino's inference precision (ONNX Runtime runs the
    graph's own; engine precision is fixed when they are built).
    """
    from sdwb.backends.registry import check_model, open_exported

    if backend == "torch":
        import torch

        from sdwb.generate import generate
        from sdwb.loading import load_pipeline

        pipe = load_pipeline(str(model_dir), device=device, dtype=dtype or torch.float32)
        return generate(pipe, prompts, **kw)
    from sdwb.generate import generate

    directory = check_model(backend, model_dir)
    if backend == "onnxruntime" and providers is not None:
        from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

        pipe = OrtStableDiffusionPipeline.from_export(directory, providers=providers, threads=threads)
    else:
        pipe = open_exported(backend, directory, device=device, threads=threads,
                             dtype=exported_dtype if backend == "openvino" else "fp32")
    return generate(pipe, prompts, **kw)
