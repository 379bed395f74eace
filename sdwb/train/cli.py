"""`sdwb baseline ...`: train, evaluate and install the builtin tiny-shapes model and its judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdwb.errors import SdwbError

baseline_app = typer.Typer(
    rich_markup_mode=None,
    help="Train and evaluate the builtin tiny-shapes model and its judge.", no_args_is_help=True
)


@baseline_app.command("train")
def train(
    out: Path = typer.Option(Path("runs/baseline-train"), "--out", "-o", help="output directory"),
    fast: bool = typer.Option(False, "--fast", help="1-2 minute run with a handful of steps (tests)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="training config YAML"),
    install_assets: bool = typer.Option(False, "--install", help="copy the result into sdwb/assets/"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the final evaluation"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads"),
) -> None:
    """Train judge, VAE, text encoder and UNet from scratch; resumes an interrupted run in OUT."""
    import torch

    from sdwb.train.baseline import install, train_baseline
    from sdwb.train.config import load_train_config
    from sdwb.zoo import assets_dir

    if threads:
        torch.set_num_threads(threads)
    cfg = load_train_config(config, fast=fast)
    summary = train_baseline(cfg, out, evaluate=not no_eval)
    if install_assets:
        install(out, assets_dir())
    typer.echo(
        json.dumps({k: summary[k] for k in ("judge", "vae", "eval", "timings_s") if k in summary}, indent=2)
    )
    typer.echo(f"trained models in {out}")


GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@baseline_app.command("eval", short_help="Score a model on the held-out prompts with the judge.")
def evaluate(
    model: str = typer.Option("builtin:tiny-shapes", "--model", "-m",
                              help="The model to score: builtin:NAME or a directory."),
    judge: str = typer.Option("builtin:shapes-judge", "--judge", help="The CLIP judge that scores it."),
    prompts: int = typer.Option(270, "--prompts", help="How many held-out eval prompts."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Guidance scale."),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | euler | dpmpp | lcm"),
    seed: int = typer.Option(0, "--seed", help="Seed of image 0; image k uses seed+k."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Save a captioned image grid here (.png)."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", metavar="PATH",
        help="Also write the scores to this file (default with --grid: the grid's name with .json).",
    ),
    reconstructions: bool = typer.Option(
        False,
        "--reconstructions",
        help="Instead: judge accuracy on data-set images vs their VAE reconstructions.",
    ),
) -> None:
    """Score a model on the held-out eval prompts with the judge (accuracies, CLIP score).

    Prints the scores as JSON on stdout and, with --json or --grid, writes them to a file too.
    """
    from sdwb.generate import SCHEDULERS
    from sdwb.runs import atomic_write_json, check_writable_file
    from sdwb.train.baseline import evaluate_pipeline, evaluate_reconstructions

    if scheduler not in SCHEDULERS:
        raise SdwbError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if reconstructions and grid is not None:
        raise SdwbError("--grid: --reconstructions scores data-set images and writes no grid "
                        "(leave out --grid)")
    if grid is not None:  # checked before anything loads: a bad path is the user's, not a crash at the end
        grid = check_writable_file(grid, GRID_SUFFIXES)
    if json_out is None and grid is not None:
        json_out = grid.with_suffix(".json")
    if json_out is not None:
        json_out = check_writable_file(json_out, (".json",))
    if reconstructions:
        result = {"command": "baseline eval --reconstructions", "model": model, "judge": judge,
                  **evaluate_reconstructions(model, judge)}
    else:
        from sdwb.train.config import BaselineTrainConfig, EvalConfig

        cfg = BaselineTrainConfig(
            seed=seed, eval=EvalConfig(prompts=prompts, steps=steps, guidance=guidance, scheduler=scheduler)
        )
        result = {"command": "baseline eval", "model": model, "judge": judge, "seed": seed,
                  **evaluate_pipeline(model, judge, cfg, grid)}
    typer.echo(json.dumps(result, indent=2))
    written = [str(atomic_write_json(json_out, result))] if json_out is not None else []
    if grid is not None and grid.is_file():
        written.append(str(grid))
    if written:  # on stderr: stdout is for the JSON
        typer.echo(f"wrote {' and '.join(written)}", err=True)


@baseline_app.command("report")
def report(
    run: Path = typer.Option(
        Path("runs/baseline-train"), "--run", help="a `baseline train` output directory"
    ),
    out: Path = typer.Option(Path("reports"), "--out", "-o", help="where baseline.md and the grid go"),
) -> None:
    """Render OUT/baseline.md (+ grid) from a training run's eval.json: numbers, timings, command."""
    from sdwb.train.report import write_baseline_report

    typer.echo(f"wrote {write_baseline_report(run, out)}")
