"""`sdwb baseline ...`: train, evaluate and install the builtin tiny-shapes model and its judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdwb.errors import SdwbError

baseline_app = typer.Typer(
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


@baseline_app.command("eval")
def evaluate(
    model: str = typer.Option("builtin:tiny-shapes", "--model", "-m"),
    judge: str = typer.Option("builtin:shapes-judge", "--judge"),
    prompts: int = typer.Option(270, "--prompts"),
    steps: int = typer.Option(50, "--steps"),
    guidance: float = typer.Option(7.5, "--guidance"),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddim | euler | dpmpp | lcm"),
    seed: int = typer.Option(0, "--seed"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="save an image grid here"),
    reconstructions: bool = typer.Option(
        False,
        "--reconstructions",
        help="instead: judge accuracy on data-set images vs their VAE reconstructions",
    ),
) -> None:
    """Score a model on the held-out eval prompts with the judge (accuracies, CLIP score)."""
    from sdwb.train.baseline import evaluate_pipeline, evaluate_reconstructions

    if reconstructions:
        typer.echo(json.dumps(evaluate_reconstructions(model, judge), indent=2))
        return
    from sdwb.generate import SCHEDULERS
    from sdwb.train.config import BaselineTrainConfig, EvalConfig

    if scheduler not in SCHEDULERS:
        raise SdwbError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    cfg = BaselineTrainConfig(
        seed=seed, eval=EvalConfig(prompts=prompts, steps=steps, guidance=guidance, scheduler=scheduler)
    )
    result = evaluate_pipeline(model, judge, cfg, grid)
    typer.echo(json.dumps(result, indent=2))


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
