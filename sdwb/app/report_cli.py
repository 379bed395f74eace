"""The ``sdwb report`` command: saved results -> ``report.md`` + a self-contained ``report.html``.

Why a separate module: the rendering lives in ``bench.report`` and must stay importable without
typer; this is only the command-line face, wired into ``sdwb/app/cli.py`` with
``app.command("report")(report_command)``. It reads results files and never runs a model.

Inputs: ``results.json`` files, directories holding one, or recipe run directories (``sdwb run
... --out DIR``: a ``run.json`` / ``run.partial.json`` listing the stages), whose bench stages'
results are rendered together (:func:`run_results`). Where the report goes by default:
:func:`default_out`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError

RUN_REPORT_DIR = "bench-report"  # in a run directory, `report` is the link to the recipe's report stage


def _run_record(directory: Path) -> Path | None:
    """The run record of a recipe run directory (``run.json``, else ``run.partial.json``), if any."""
    from sdwb.app.recipe_run import RUN_FILE, RUN_PARTIAL

    if not directory.is_dir():
        return None
    return next((directory / n for n in (RUN_FILE, RUN_PARTIAL) if (directory / n).is_file()), None)


def _holds_results(path: Path) -> bool:
    from bench.results import PARTIAL_JSON, RESULTS_JSON

    return path.is_file() or any((path / n).is_file() for n in (RESULTS_JSON, PARTIAL_JSON))


def _artifact(recorded: str, run_dir: Path) -> Path:
    """A stage artifact path as the run recorded it: absolute, or relative to where ``sdwb run``
    ran (the working directory, or a folder above the run directory: runs/NAME -> the repo)."""
    path = Path(recorded)
    if path.is_absolute() or path.exists():
        return path
    for root in run_dir.resolve().parents:
        if (root / path).exists():
            return root / path
    return path


def run_results(run_dir: Path) -> list[Path]:
    """The results of every bench stage of a recipe run directory (several: one source each).

    One-line errors: no bench stage, or a bench stage without results yet (named with its status).
    """
    from bench.results import PARTIAL_JSON, RESULTS_JSON

    record = _run_record(run_dir)
    if record is None:
        raise SdwbError(f"{run_dir}: neither results.json nor a run record (run.json) here")
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        stages = [s for s in data["stages"] if isinstance(s, dict)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SdwbError(f"{record}: cannot read the run record: {' '.join(str(e).split())}") from None
    benches = [s for s in stages if s.get("kind") == "bench"]
    if not benches:
        kinds = ", ".join(str(s.get("name") or s.get("kind")) for s in stages) or "none"
        raise SdwbError(f"{run_dir}: the run has no bench stage to report (stages: {kinds})")
    found, missing = [], []
    for stage in benches:
        artifact = _artifact(str(stage.get("artifact", "")), run_dir)
        if (artifact / RESULTS_JSON).is_file() or (artifact / PARTIAL_JSON).is_file():
            found.append(artifact)  # partial results are rendered and marked INCOMPLETE
        else:
            missing.append(f"{stage.get('name')} ({stage.get('status') or 'no status'}, {artifact})")
    if missing:
        raise SdwbError(f"{run_dir}: bench stage{'s' if len(missing) > 1 else ''} without results: "
                        f"{'; '.join(missing)} (finish the run with `sdwb run` first)")
    return found


def resolve_inputs(paths: list[Path]) -> list[Path]:
    """Each input as the results it names: a run directory becomes its bench stages' results."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir() and not _holds_results(path) and _run_record(path) is not None:
            out += run_results(path)
        else:
            out.append(path)  # a results file or directory (bench.results reports what is wrong)
    return out


def default_out(first: Path) -> Path:
    """``DIR/report`` beside the first input's results (DIR: the directory given, or the results
    file's directory); ``DIR/bench-report`` for a recipe run directory, whose ``report`` is the
    link to the recipe's own report stage."""
    if first.is_dir():
        run = not _holds_results(first) and _run_record(first) is not None
        return first / (RUN_REPORT_DIR if run else "report")
    return first.parent / "report"


def report_command(
    results: Annotated[
        list[Path],
        typer.Argument(
            metavar="RESULTS...",
            help="results.json files written by `sdwb bench`, directories holding one, or recipe run "
            "directories (`sdwb run RECIPE --out DIR`: the results of its bench stages); several "
            "(e.g. from several machines) merge into one report with a source column.",
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Directory for report.md and report.html [default: DIR/report "
                     "beside the first results (DIR/bench-report for a recipe run directory)]."),
    ] = None,
    gate: Annotated[
        Optional[Path],
        typer.Option("--gate", "-c", metavar="GATE.yaml", help="Gate config (configs/gate/*.yaml) whose "
                     "quality thresholds decide the verdict's 'worse' "
                     "[default: the default thresholds of `sdwb gate`]."),
    ] = None,
) -> None:
    """Render saved benchmark results into DIR/report.md and one self-contained DIR/report.html,
    led by a verdict per variant: its speed-up and whether its quality held within the gate's limits."""
    from bench.report import render_report
    from sdwb.runs import check_writable_dir

    inputs = resolve_inputs(list(results))
    out = out if out is not None else default_out(results[0])
    check_writable_dir(out, f"--out {out}")
    md, page = render_report(inputs, out, gate=gate)
    typer.echo(f"wrote {md}")
    typer.echo(f"wrote {page}")
    title = md.read_text(encoding="utf-8").splitlines()[0]
    if "INCOMPLETE" in title:  # partial results are rendered, and said to be partial
        typer.echo("note: the report is marked INCOMPLETE: a results file holds partial results "
                   "(its benchmark did not finish)", err=True)
