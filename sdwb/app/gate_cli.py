"""``sdwb gate``: the command-line face of :mod:`bench.gate` (exit 0 pass, 1 regression, 2 error).

Three sources of a decision, and latency is only ever judged between measurements of one machine:

- ``--baseline FILE --candidate FILE``: saved results (a committed baseline, a fresh ``sdwb
  bench``). Memory and quality are compared; latency only when both files record the same CPU
  model, CPU flags and thread count, otherwise it is reported as "not comparable" and not judged.
- ``--ab-rev BASE``: the code of git revision BASE and the working tree, timed now by worker
  processes taking turns (:mod:`bench.gate_rev`): the latency decision CI makes. Combines with the files
  form, which then supplies memory and quality.
- ``--ab BASELINE CANDIDATE``: two models timed now, interleaved in this process.

All write ``gate.md``, ``gate.junit.xml`` and ``gate.json`` to ``--out``. The gate fails closed
(:mod:`bench.gate_inputs`): a side missing a metric the config gates, partial results, or two files
of different scenarios are refused with exit 2 before anything is decided.
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
    ab_rev: Annotated[
        Optional[str],
        typer.Option(
            "--ab-rev",
            metavar="REV",
            help="Time git revision REV's code and the working tree's now, in worker processes taking turns "
            "(measure.model, measure.rounds); the latency decision of CI.",
        ),
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
        Path, typer.Option("--out", "-o", help="Directory for gate.md, gate.junit.xml and gate.json.")
    ] = Path("runs/gate"),
    inject_slowdown: Annotated[
        float,
        typer.Option(
            help="Self-test of --ab / --ab-rev: make the candidate's (head's) UNet calls this fraction "
            "slower."
        ),
    ] = 0.0,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a gate config key."),
    ] = None,
    progress: Annotated[
        bool, typer.Option(help="Show progress (--ab: bars, --ab-rev: one line a round).")
    ] = True,
    allow_model_change: Annotated[
        bool,
        typer.Option(help="Files form: compare rows of two different models (every other scenario setting "
                     "must still match)."),
    ] = False,
) -> None:
    """Decide whether a candidate regressed against a baseline: latency by a bootstrap interval of the
    ratio (only between measurements of one machine), memory / CLIP score / accuracy against
    thresholds from the gate config. Exit 0: passed; 1: regression; 2: bad input or an error."""
    try:
        code = _gate(
            baseline, candidate, ab, ab_rev, config, variant, candidate_variant, out, inject_slowdown, set_,
            progress, allow_model_change,
        )
    except SdwbError:
        raise
    except Exception as e:  # exit 1 means "regression": any other failure must not look like one
        raise SdwbError(f"gate: internal error: {type(e).__name__}: {e}", exit_code=2) from e
    raise typer.Exit(code)


def _gate(
    baseline, candidate, ab, ab_rev, config, variant, candidate_variant, out, inject_slowdown, set_, progress,
    allow_model_change=False,
) -> int:
    from bench import gate, gate_inputs
    from sdwb.runs import check_writable_dir

    cfg = gate.load_gate_config(config, set_)
    if ab is not None and (baseline is not None or candidate is not None or ab_rev is not None):
        raise SdwbError("give either --ab BASELINE CANDIDATE or --baseline/--candidate files (and --ab-rev), "
                        "not both")
    if inject_slowdown and ab is None and ab_rev is None:
        raise SdwbError("--inject-slowdown: only with --ab or --ab-rev (it slows the candidate's UNet while "
                        "measuring)")
    if not 0 <= inject_slowdown <= 10:
        raise SdwbError(f"--inject-slowdown {inject_slowdown}: expected a fraction in [0, 10]")
    if (baseline is None) != (candidate is None):
        raise SdwbError("give --baseline FILE and --candidate FILE together")
    if ab is None and ab_rev is None and baseline is None:
        raise SdwbError("give --baseline FILE and --candidate FILE, --ab-rev REV, or --ab BASELINE CANDIDATE")
    check_writable_dir(out, f"--out {out}")  # before minutes of measuring
    context: list[str] = []
    record: dict = {}
    if ab is not None:
        checks = _ab(gate, cfg, ab, out, inject_slowdown, progress, context)
    else:
        checks = []
        files = None
        if baseline is not None:  # read (and refuse) the files before minutes of measuring
            base_data, cand_data = gate.read_results(baseline), gate.read_results(candidate)
            base_row, base_samples = gate.pick_row(base_data, variant, str(baseline))
            cand_row, cand_samples = gate.pick_row(cand_data, candidate_variant or variant, str(candidate))
            files = (base_data.get("environment"), cand_data.get("environment"))
            # fail closed: what the config gates must be measured on both sides, in one scenario
            need = gate_inputs.required_metrics(cfg.thresholds, latency="file_latency_pct")
            gate_inputs.check_measured(need, base_row, base_samples, f"baseline {baseline}")
            gate_inputs.check_measured(need, cand_row, cand_samples, f"candidate {candidate}")
            notes = gate_inputs.check_same_scenario(base_row, cand_row, base_data, cand_data,
                                                    allow_model_change=allow_model_change)
            context.append(f"files: baseline `{baseline}` ({base_row.get('variant')}), candidate "
                           f"`{candidate}` ({cand_row.get('variant')})")
            context += [gate.describe_side("baseline file", files[0]),
                        gate.describe_side("candidate file", files[1])]
            context += [f"note: {n}" for n in notes]
        if ab_rev is not None:
            checks += _ab_rev(gate, cfg, ab_rev, out, inject_slowdown, progress, context, record)
        if files is not None:
            mismatch = gate.cpu_mismatch(*files)
            checks += gate.file_latency_checks(base_samples, cand_samples, cfg, mismatch,
                                               prefix=" vs file" if ab_rev is not None else "")
            checks += gate.row_checks(base_row, cand_row, cfg, memory_mismatch=mismatch,
                                      memory_suffix=" vs file" if ab_rev is not None else "")
    outcome = gate.verdict(checks)
    t = cfg.thresholds
    file_limit = f"+{t.file_latency_pct} %" if t.file_latency_pct is not None else "reported, not judged"
    context.append(
        f"thresholds: latency measured now +{t.latency_pct} % ({cfg.statistics.rule}), against a file on the "
        f"same CPU {file_limit}, memory +{t.memory_pct} %, CLIP -{t.clip_drop}, accuracy "
        f"-{t.accuracy_drop} points; {cfg.statistics.confidence:.0%} bootstrap, "
        f"{cfg.statistics.resamples} resamples"
    )
    md = gate.write_markdown(out / "gate.md", "sdwb gate", checks, outcome, context)
    junit = gate.write_junit(out / "gate.junit.xml", "sdwb-gate", checks)
    gate.write_json(out / "gate.json", checks, outcome, context, {**record, "config": cfg.model_dump()})
    typer.echo(gate.summary_line(checks, outcome))
    typer.echo(f"wrote {md}, {junit} and {out / 'gate.json'}")
    return 1 if outcome == "regression" else 0


def _ab(gate, cfg, ab, out, inject_slowdown, progress, context) -> list:
    """``--ab``: both models benchmarked in this process, interleaved."""
    from bench.harness import run_bench
    from bench.results import python_command
    from sdwb.app.bench_cli import _quiet_library_progress
    from sdwb.app.recipe_run import resolve_recipe_models

    bench_cfg = resolve_recipe_models(
        gate.ab_bench_config(ab[0], ab[1], cfg.measure, inject_slowdown=inject_slowdown))
    _quiet_library_progress()
    run_bench(bench_cfg, out / "bench", progress=progress, command=python_command())
    data = gate.read_results(out / "bench")
    base_row, base_samples = gate.pick_row(data, "baseline", "--ab")
    cand_row, cand_samples = gate.pick_row(data, "candidate", "--ab")
    from bench.gate_inputs import check_measured, required_metrics

    need = required_metrics(cfg.thresholds, latency="latency_pct", measured=list(cfg.measure.metrics))
    check_measured(need, base_row, base_samples, f"--ab baseline {ab[0]}")
    check_measured(need, cand_row, cand_samples, f"--ab candidate {ab[1]}")
    context += [
        f"measured now, interleaved in one process: baseline `{ab[0]}`, candidate `{ab[1]}`",
        gate.describe_side("both", data.get("environment")),
        f"results: `{out / 'bench' / 'results.json'}`",
    ]
    if inject_slowdown:
        context.append(f"self-test: the candidate's UNet calls were made {inject_slowdown:.0%} slower")
    return gate.compare(base_row, base_samples, cand_row, cand_samples, cfg)


def _ab_rev(gate, cfg, rev, out, inject_slowdown, progress, context, record) -> list:
    """``--ab-rev``: revision ``rev``'s code and the working tree's, in worker processes taking turns."""
    from bench.gate_rev import measure_revisions, resolve_revision, write_sides

    m = cfg.measure
    resolve_revision(rev)  # a bad revision is refused before anything is printed or measured
    log = (lambda line: typer.echo(f"gate --ab-rev: {line}", err=True)) if progress else None
    if log:
        log(f"{m.rounds} rounds of one `sdwb bench` run per side in {m.processes} worker pair(s): {m.model}, "
            f"{m.steps or 'default'} steps, {m.warmup} warm-up + {m.repeats} timed runs each")
    base, head = measure_revisions(rev, m, m.model, out / "ab-rev", inject_slowdown=inject_slowdown, log=log)
    sides = write_sides(out / "ab-rev" / "sides.json", base, head, {"inject_slowdown": inject_slowdown})
    context += [
        f"latency measured now, worker processes taking turns: base = revision {base.revision}, head = the "
        f"working tree ({head.revision}); `{m.model}`, {m.rounds} rounds; samples in `{sides}`",
        gate.describe_side("base", base.environment),
        gate.describe_side("head", head.environment),
    ]
    mismatch = gate.cpu_mismatch(base.environment, head.environment)
    if mismatch:  # one machine, so only a changed thread default can do this: part of the change, judged
        context.append(f"note: the sides ran differently ({mismatch})")
    if inject_slowdown:
        context.append(f"self-test: the head side's UNet calls were made {inject_slowdown:.0%} slower")
    record["ab_rev"] = {"base": base.revision, "head": head.revision, "sides": str(sides)}
    keys = ("e2e_s", "unet_ms")
    rss = {s.label: s.memory.get("peak_rss_mb") for s in (base, head)}
    context.append("memory measured now: one fresh-process `sdwb bench --metrics memory` per side, peak RSS "
                   f"base {rss['base']:.0f} MB, head {rss['head']:.0f} MB")
    # one machine: the sides' memory is comparable (a changed thread default is part of the change)
    return gate.rounds_latency_checks({k: base.per_round(k) for k in keys},
                                      {k: head.per_round(k) for k in keys}, cfg) + gate.memory_checks(
        base.memory, head.memory, cfg)
