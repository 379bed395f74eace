"""The ``sdwb report`` command: saved results -> ``report.md`` + a self-contained ``report.html``.

Why a separate module: the rendering lives in ``bench.report`` and must stay importable without
typer; this is only the command-line face, wired into ``sdwb/app/cli.py`` with
``app.command("report")(report_command)``. It reads results files and never runs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report_command(
    results: Annotated[
        list[Path],
        typer.Argument(
            metavar="RESULTS.json...",
            help="results.json files written by `sdwb bench` (or directories holding one); several "
            "files (e.g. from several machines) merge into one report with a source column.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md and report.html.")],
) -> None:
    """Render saved benchmark results into DIR/report.md and one self-contained DIR/report.html."""
    from bench.report import render_report
    from sdwb.runs import check_writable_dir

    check_writable_dir(out, f"--out {out}")
    md, page = render_report(list(results), out)
    typer.echo(f"wrote {md}")
    typer.echo(f"wrote {page}")
    title = md.read_text(encoding="utf-8").splitlines()[0]
    if "INCOMPLETE" in title:  # partial results are rendered, and said to be partial
        typer.echo("note: the report is marked INCOMPLETE: a results file holds partial results "
                   "(its benchmark did not finish)", err=True)
