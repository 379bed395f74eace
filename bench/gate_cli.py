"""``sdwb gate``: the command-line face of :mod:`bench.gate` (exit 0 pass, 1 regression, 2 error).

Two forms. Saved results: ``--baseline reports/baselines/X.json --candidate DIR/results.json``
compares a committed baseline with a fresh ``sdwb bench`` run. Measured now: ``--ab BASELINE
CANDIDATE`` benchmarks both models interleaved in this process (``measure:`` of the gate
config) and compares them; same machine, same minute, so it is the form to trust on noisy CI
runners. Both write ``gate.md`` and ``gate.junit.xml`` to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError


def gate_command(
    baseline: Annotated[
        Optional[Path], typer.Option(help="Committed baseline results.json (reports/baselines/*.json).")
    ] = None,
    candidate: Annotated[Optional[Path], typer.Option(help="Candidate results.json (sdwb bench).")] = None,
    ab: Annotated[
        Optional[tuple[str, str]],
        typer.Option("--ab", metavar="BASELINE CANDIDATE", help="Two models to measure now, interleaved."),
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Gate config (configs/gate/*.yaml).")
    ] = None,
    variant: Annotated[
        Optional[str], typer.Option(help="Variant to compare in each file (default: the only one).")
    ] = None,
    candidate_variant: Annotated[
        Optional[str], typer.Option(help="Variant in the candidate file, when named differently.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for gate.md and gate.junit.xml.")
    ] = Path("runs/gate"),
    inject_slowdown: Annotated[
        float,
        typer.Option(help="--ab self-test: make the candidate's UNet calls this fraction slower (0.15)."),
    ] = 0.0,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a gate config key."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (--ab).")] = True,
) -> None:
    """Decide whether a candidate regressed against a baseline: latency by a bootstrap interval of the
    ratio over timed runs, memory / CLIP score / accuracy against thresholds from the gate config.
    Exit 0: passed; 1: regression; 2: bad input or an error."""
    try:
        code = _gate(
            baseline, candidate, ab, config, variant, candidate_variant, out, inject_slowdown, set_, progress
        )
    except SdwbError:
        raise
    except Exception as e:  # exit 1 means "regression": any other failure must not look like one
        raise SdwbError(f"gate: internal error: {type(e).__name__}: {e}", exit_code=2) from e
    raise typer.Exit(code)


def _gate(
    baseline, candidate, ab, config, variant, candidate_variant, out, inject_slowdown, set_, progress
) -> int:
    from bench import gate

    cfg = gate.load_gate_config(config, set_)
    if ab is not None and (baseline is not None or candidate is not None):
        raise SdwbError("give either --ab BASELINE CANDIDATE or --baseline/--candidate files, not both")
    if inject_slowdown and ab is None:
        raise SdwbError("--inject-slowdown: only with --ab (it slows the candidate's UNet while measuring)")
    if not 0 <= inject_slowdown <= 10:
        raise SdwbError(f"--inject-slowdown {inject_slowdown}: expected a fraction in [0, 10]")
    if ab is not None:
        from bench.cli import _quiet_library_progress
        from bench.harness import run_bench
        from bench.results import python_command

        bench_cfg = gate.ab_bench_config(ab[0], ab[1], cfg.measure, inject_slowdown=inject_slowdown)
        _quiet_library_progress()
        run_bench(bench_cfg, out / "bench", progress=progress, command=python_command())
        data = gate.read_results(out / "bench")
        base_row, base_samples = gate.pick_row(data, "baseline", "--ab")
        cand_row, cand_samples = gate.pick_row(data, "candidate", "--ab")
        context = [
            f"measured now, interleaved: baseline `{ab[0]}`, candidate `{ab[1]}`",
            f"results: `{out / 'bench' / 'results.json'}`",
        ]
        if inject_slowdown:
            context.append(f"self-test: the candidate's UNet calls were made {inject_slowdown:.0%} slower")
    else:
        if baseline is None or candidate is None:
            raise SdwbError("give --baseline FILE and --candidate FILE, or --ab BASELINE CANDIDATE")
        base_data, cand_data = gate.read_results(baseline), gate.read_results(candidate)
        base_row, base_samples = gate.pick_row(base_data, variant, str(baseline))
        cand_row, cand_samples = gate.pick_row(cand_data, candidate_variant or variant, str(candidate))
        context = [
            f"baseline `{baseline}` ({base_row.get('variant')}), candidate `{candidate}` "
            f"({cand_row.get('variant')})"
        ]
        for key in ("steps", "guidance", "batch", "backend", "dtype", "threads"):
            if base_row.get(key) != cand_row.get(key):
                context.append(f"note: {key} differs ({base_row.get(key)} vs {cand_row.get(key)})")
    checks = gate.compare(base_row, base_samples, cand_row, cand_samples, cfg)
    outcome = gate.verdict(checks)
    t = cfg.thresholds
    context.append(
        f"thresholds: latency +{t.latency_pct} %, memory +{t.memory_pct} %, CLIP -{t.clip_drop}, "
        f"accuracy -{t.accuracy_drop} points; {cfg.statistics.confidence:.0%} bootstrap, "
        f"{cfg.statistics.resamples} resamples"
    )
    md = gate.write_markdown(out / "gate.md", "sdwb gate", checks, outcome, context)
    junit = gate.write_junit(out / "gate.junit.xml", "sdwb-gate", checks)
    typer.echo(gate.summary_line(checks, outcome))
    typer.echo(f"wrote {md} and {junit}")
    return 1 if outcome == "regression" else 0
