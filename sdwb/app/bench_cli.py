"""``sdwb bench``: run a benchmark from a config file, or the quick form from ``--model`` flags.

``bench_command`` is a plain typer command function; ``sdwb/app/cli.py`` registers it with
``app.command("bench")(bench_command)``. It raises :class:`SdwbError` for bad input, which the
``sdwb`` entry point prints as one ``error:`` line with a non-zero exit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdwb.backends.registry import BACKENDS
from sdwb.errors import SdwbError


def bench_command(
    config: Annotated[
        Optional[Path], typer.Argument(metavar="CONFIG", help="Bench config YAML (configs/bench/...).")
    ] = None,
    model: Annotated[
        Optional[list[str]],
        typer.Option("--model", "-m", metavar="MODEL", help="Quick form: a model to bench (repeat)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory.")] = None,
    backend: Annotated[
        Optional[str],
        typer.Option(help=f"{' | '.join(BACKENDS)} (onnxruntime: a model spec is exported once)."),
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda | auto.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32 | bf16 | fp16.")] = None,
    compile_: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="torch rows: torch.compile the UNet "
                                     "(compiled and warmed at load time; its time is the compile_s column).")
    ] = None,
    compile_mode: Annotated[
        Optional[str], typer.Option(help="torch.compile mode: default | reduce-overhead | max-autotune | "
                                    "max-autotune-no-cudagraphs.")
    ] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="ddim | euler | dpmpp | lcm.")] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help="Number of prompts.")] = None,
    prompt_set: Annotated[
        Optional[str], typer.Option("--prompt-set", help="builtin:shapes-eval or a text file.")
    ] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Timed runs per variant.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warm-up runs per variant.")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Prompts per pipeline call.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads (torch, ONNX Runtime, OpenVINO).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of image 0.")] = None,
    metrics: Annotated[
        Optional[str], typer.Option(help="Comma list of latency,memory,quality (default all).")
    ] = None,
    judge: Annotated[Optional[str], typer.Option(help="CLIP judge for quality.")] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Benchmark variants side by side: latency (interleaved), memory (a fresh process each), quality.

    Either a bench config (configs/bench/*.yaml) or the quick form, one --model per variant.
    Flags set the config's defaults (a variant's own setting still wins); --set KEY=VALUE edits any
    key (defaults.steps=4, variants.1.dtype=bf16). Writes DIR/results.csv, DIR/results.json,
    DIR/config.resolved.yaml and DIR/images/<variant>/<i>.png (default DIR: runs/<name>-<hash>).
    --backend onnxruntime / openvino take an export directory (OpenVINO: ONNX or IR), or a model
    spec that is exported to ONNX (and validated) once into DIR/exports/<variant>/; --backend
    tensorrt takes an engine directory.
    """
    from bench.harness import run_bench
    from bench.results import python_command
    from bench.scenario import load_bench_config, quick_config

    settings: dict[str, Any] = {
        "backend": backend, "device": device, "dtype": dtype, "compile": compile_,
        "compile_mode": compile_mode, "steps": steps, "guidance": guidance,
        "scheduler": scheduler, "n_prompts": prompts, "prompts": prompt_set, "repeats": repeats,
        "warmup": warmup, "batch": batch, "threads": threads, "seed": seed, "judge": judge,
        "metrics": [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None,
    }
    if config is not None and model:
        raise SdwbError("give either a bench config file or --model flags, not both")
    if config is not None:
        cfg = load_bench_config(config, set_, settings)
    elif model:
        cfg = quick_config(model, overrides=set_, **settings)
    else:
        raise SdwbError("nothing to bench: give a bench config file or at least one --model")
    if out is None:
        from bench.scenario import resolved_dict
        from sdwb.app.recipe_schema import config_hash
        from sdwb.runs import run_dir

        out = run_dir(cfg.name, config_hash(resolved_dict(cfg)))
    from sdwb.app.recipe_run import resolve_recipe_models
    from sdwb.runs import check_writable_dir

    check_writable_dir(out, f"--out {out}")  # before any model is loaded or timed
    cfg = resolve_recipe_models(cfg)
    _quiet_library_progress()
    df = run_bench(cfg, out, progress=progress, command=python_command())
    if df is None:  # a helper process of accelerate launch: the main process reports
        return
    print_summary(df)
    typer.echo(f"wrote {Path(out) / 'results.csv'}, {Path(out) / 'results.json'} and images in {out}")


BENCH_HELP = bench_command.__doc__


def _quiet_library_progress() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_summary(df, console=None) -> None:
    """A compact rich table of the main columns (full precision is in results.csv)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
            console = Console(width=160)
    table = Table(title="sdwb bench", title_justify="left", pad_edge=False)
    headers = ("variant", "dtype", "steps", "s/img (p10-p90)", "img/s", "UNet ms", "calls",
               "RSS MB", "params M", "GMACs", "CLIP", "color", "PSNR")
    edits = "edit_success" in df and df["edit_success"].notna().any()
    headers += ("edit ok (95% CI)", "s/edit") if edits else ()
    for h in headers:
        table.add_column(h, justify="left" if h == "variant" else "right", no_wrap=True)
    for row in df.to_dict("records"):
        spread = f"{_fmt(row['e2e_s_median'])} ({_fmt(row['e2e_s_p10'])}-{_fmt(row['e2e_s_p90'])})"
        cells = [
            str(row["variant"]), str(row["dtype"]), _fmt(row["steps"]), spread, _fmt(row["images_per_s"]),
            _fmt(row["unet_ms_per_call"]), _fmt(row["unet_calls"]), _fmt(row["peak_rss_mb"], 4),
            _fmt(row["params_m"]), _fmt(row["unet_gmacs"]), _fmt(row["clip_score"]), _fmt(row["color_acc"]),
            _fmt(row["psnr_vs_baseline"]),
        ]
        if edits:
            ok = row.get("edit_success")
            cells += [f"{_fmt(ok)} ({_fmt(row['edit_success_lo'])}-{_fmt(row['edit_success_hi'])})"
                      if ok is not None and ok == ok else "-", _fmt(row.get("s_per_edit"))]
        table.add_row(*cells)
    console.print(table)
