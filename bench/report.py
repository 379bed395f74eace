"""Render saved benchmark results into ``report.md`` and one self-contained ``report.html``.

Why: numbers only convince when they are read side by side with the machine they were measured
on and the images they produced. The report reads ``results.json`` files written by the bench
(one per machine or run) and never loads or runs a model, so it can be re-rendered anywhere and
committed next to the results. Several files merge into the same tables with a ``source`` column.

What it shows, in reading order: the verdict (one sentence per variant: how much faster than its
baseline, with a 95 % bootstrap interval where the file holds per-run samples, and whether its
quality losses stay within the limits of the performance gate, :mod:`bench.gate`); table 1
"Speed and quality" (what was done, precision, latency median [p10–p90], speed-up, quality with
95 % intervals); table 2 "Cost and details" (backend, threads, UNet call, memory, size at the
precision the files store, parameters, MACs, CMMD, SSIM); the environment of every source;
plots (stacked per-component latency, quality vs latency with the Pareto front and numbered
points, one memory panel per metric) drawn with matplotlib's Agg canvas (no pyplot, no global
backend state); an image grid per source (rows prompts, columns variants, same seeds).
``report.html`` inlines CSS and every image as a base64 ``data:`` URI: no external asset, no
script. ``report.md`` links the same figures, written beside it under ``figures/``.

Missing metrics (not applicable, e.g. quality on ``sd15-arch``) render as "—", never 0;
a PSNR of ``inf`` (pixel-identical to the baseline) renders as "∞".

The baseline of a row is the row of the same source that its ``baseline`` string names, as
``bench`` writes it on every row (the config's ``baseline:``, else its first variant): a
compressed variant is its own model directory, and its speed-up is against the model it was made
from. Rows without that string (hand-made results) take the row of the same source and model
marked ``baseline: true`` or ``role: baseline``, else the first row of that source and model: a
speed-up across unrelated models (tiny-shapes vs sd15-arch) would mean nothing.

The verdict's rules: a variant is **worse** when its CLIP score or its colour / shape / position
accuracy is lower than its baseline's by more than the performance gate allows
(``thresholds.clip_drop`` / ``accuracy_drop`` of :class:`bench.gate.GateConfig`: the defaults of
``sdwb gate``, or the gate config given; decided by :func:`bench.gate.row_checks`, so the report
and the gate never disagree); "quality held" when every measured one stays within; "quality not
measured" when the variant has no quality scores (never "held"). The speed-up's interval is the
percentile bootstrap of median(baseline runs) / median(variant runs) with each side's timed runs
resampled (:func:`bench.gate.bootstrap_ratio` with the gate's ``statistics``: confidence,
resamples, seed), given only where the results file holds at least ``statistics.min_runs``
per-run samples of both rows; older files without samples get the point estimate alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.results import PARTIAL_JSON, RESULTS_JSON, images_index, load_results
from sdwb.errors import SdwbError

MISSING = "—"
GRID_IMAGES = 4  # prompts (rows) per image grid
_ENV_ORDER = (  # bench.results.environment() keys first, in reading order; any others after
    "cpu", "cpu_flags", "cpu_count", "cpu_usable", "cores", "memory_gb", "torch_threads",
    "torch_interop_threads", "omp_num_threads", "threads", "gpu", "platform", "python", "sdwb",
    "git_revision", "timestamp_utc", "libraries",
)
# bench.gate.row_checks' quality metrics -> how the verdict names them
_QUALITY_CHECKS = {"CLIP score": "CLIP", "colour accuracy %": "colour", "shape accuracy %": "shape",
                   "position accuracy %": "position"}
_QUALITY_KEYS = ("clip_score", "color_acc", "shape_acc", "position_acc")


@dataclass
class Source:
    """One results file: its label in the report, environment, and images per variant."""

    label: str
    path: Path
    environment: dict
    images: dict[str, list[Path]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    command: str | None = None
    complete: bool = True  # False: partial results of a benchmark that did not finish (marked so)
    samples: dict[str, dict] = field(default_factory=dict)  # variant -> per-run lists (e2e_s, unet_ms)


@dataclass
class Table:
    """A formatted table: header, cells, which columns hold text (left-aligned, may wrap)."""

    title: str
    header: list[str]
    body: list[list[str]]
    text_columns: set[int] = field(default_factory=set)
    wrap_columns: set[int] = field(default_factory=set)


@dataclass
class Verdict:
    """One variant's sentence: ``head`` (speed and quality changes), ``outcome``, ``why``."""

    head: str
    outcome: str  # "worse" | "quality held" | "quality not measured" | ...
    why: str = ""

    @property
    def worse(self) -> bool:
        return self.outcome == "worse"

    def text(self, bold=lambda s: s) -> str:
        outcome = bold(self.outcome) if self.worse else self.outcome
        return f"{self.head}: {outcome}" + (f" ({self.why})" if self.why else "")


# --------------------------------------------------------------------------- loading


def _labels(paths: list[Path]) -> list[str]:
    """Short unique source labels: the results file's directory name, else more of its path."""
    dirs = [p if p.is_dir() else p.parent for p in paths]
    labels = [d.resolve().name or str(d) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    return labels


def _resolved(path: Path) -> Path:
    """A results file itself, or the one a directory holds (as ``bench.results`` resolves it)."""
    if path.is_dir():
        return next((path / n for n in (RESULTS_JSON, PARTIAL_JSON) if (path / n).is_file()), path)
    return path


def _file_extras(path: Path) -> tuple[list[str], str | None, bool, dict]:
    """The prompts of a results file's images, the command that measured them (if recorded),
    whether the results are complete (``results.partial.json`` / ``"complete": false`` are not)
    and the per-run ``samples`` of each variant (empty in files older than them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # already checked by load_results; nothing to add then
        return [], None, path.name != PARTIAL_JSON, {}
    if not isinstance(data, dict):
        return [], None, path.name != PARTIAL_JSON, {}
    command = data.get("command")
    complete = data.get("complete") is not False and path.name != PARTIAL_JSON
    samples = data.get("samples") if isinstance(data.get("samples"), dict) else {}
    return ([str(p) for p in data.get("prompts") or []], str(command) if command else None, complete,
            {str(k): v for k, v in samples.items() if isinstance(v, dict)})


def load_sources(results_paths: list[Path]) -> tuple[pd.DataFrame, list[Source]]:
    """All rows of all files in one DataFrame (``source`` = short label) and one ``Source`` each.

    Reading and checking the files is ``bench.results.load_results``' job (one-line errors).
    """
    paths = [Path(p) for p in results_paths]
    if not paths:
        raise SdwbError("results: expected at least one results.json")
    df, envs = load_results(paths)
    for i, path in enumerate(paths):
        rows = df[df["env_index"] == i].reset_index(drop=True)
        bad = rows.index[rows["variant"].isna()].tolist()
        if bad:
            raise SdwbError(f"{_resolved(path)}: rows[{bad[0]}] has no 'variant'")
    labels = _labels(paths)
    sources = []
    for label, path, env in zip(labels, paths, envs):
        try:
            images = {str(v): list(files) for v, files in images_index(path).items()}
        except (AttributeError, TypeError):
            raise SdwbError(f"{_resolved(path)}: 'images' must map each variant to a list of image "
                            "paths") from None
        env = env if isinstance(env, dict) else {}
        prompts, command, complete, samples = _file_extras(_resolved(path))
        sources.append(Source(label, _resolved(path), env, images, prompts, command, complete, samples))
    df["source"] = df["env_index"].map(dict(enumerate(labels)))
    return df, sources


def gate_config(path: str | Path | None = None):
    """The gate config whose thresholds and statistics the verdict uses, and where it came from."""
    from bench.gate import load_gate_config

    config = load_gate_config(path)
    return config, (str(path) if path is not None else "the default thresholds of sdwb gate")


# --------------------------------------------------------------------------- formatting


def _value(v) -> float | None:
    """A number, or None for null / NaN / non-numeric cells."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _num(v, digits: int | None = None) -> str:
    """Format a number for a table cell: "—" when missing, "∞" when infinite."""
    f = _value(v)
    if f is None:
        return MISSING
    if math.isinf(f):
        return "∞" if f > 0 else "-∞"
    if digits is not None:
        return f"{f:.{digits}f}"
    a = abs(f)
    return f"{f:.0f}" if a >= 100 else f"{f:.1f}" if a >= 10 else f"{f:.2f}" if a >= 0.1 else f"{f:.3g}"


def _with_interval(v, lo, hi, digits: int | None = None, scale: float = 1.0) -> str:
    f = _value(v)
    if f is None:
        return MISSING
    cell = _num(f * scale, digits)
    if _value(lo) is not None and _value(hi) is not None:
        cell += f" [{_num(_value(lo) * scale, digits)}–{_num(_value(hi) * scale, digits)}]"
    return cell


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _signed(v: float, digits: int) -> str:
    """``+1.2`` / ``−8.20`` (a real minus sign, as in running text)."""
    text = f"{v:+.{digits}f}"
    if float(text) == 0:
        return "±" + text[1:]  # "−0.00" of a tiny loss would read as a loss
    return "−" + text[1:] if text.startswith("-") else text


def _baselines(rows: list[dict]) -> list[dict]:
    """For every row, its baseline row (see the module docstring): the row of the same source that
    its ``baseline`` string names, else the marked (or first) row of its (source, model) group."""
    by_name = {(r.get("source"), r["variant"]): r for r in rows}
    named = {(r.get("source"), r["baseline"]) for r in rows if isinstance(r.get("baseline"), str)}

    def marked(row: dict) -> bool:
        flag = row.get("baseline")
        return ((isinstance(flag, bool) and flag) or str(row.get("role", "")).lower() == "baseline"
                or (row.get("source"), row["variant"]) in named)

    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("source"), _text(row.get("model")))
        if key not in groups or (marked(row) and not marked(groups[key])):
            groups[key] = row

    def base_of(row: dict) -> dict:
        name = row.get("baseline")
        if isinstance(name, str) and (row.get("source"), name) in by_name:
            return by_name[(row.get("source"), name)]
        return groups[(row.get("source"), _text(row.get("model")))]

    return [base_of(row) for row in rows]


def _row_labels(rows: list[dict], multi_source: bool) -> list[str]:
    """Names that tell rows apart: variant, plus backend/dtype/steps/batch where a variant repeats."""
    fields = (("backend", "{}"), ("device", "{}"), ("dtype", "{}"), ("steps", "{} steps"),
              ("batch", "batch {}"))
    labels = []
    for row in rows:
        same = [r for r in rows if r.get("source") == row.get("source") and r["variant"] == row["variant"]]
        parts = [f"{row['source']}: {row['variant']}" if multi_source else str(row["variant"])]
        for key, fmt in fields:
            if len({_text(r.get(key)) for r in same}) > 1:
                parts.append(fmt.format(_text(row.get(key))))
        labels.append(" ".join(parts))
    return labels


# --------------------------------------------------------------------------- speed-up and verdict


@dataclass
class Speedup:
    """median(baseline) / median(variant) and, with per-run samples, its bootstrap interval."""

    ratio: float
    lo: float | None = None
    hi: float | None = None
    runs: tuple[int, int] | None = None  # (baseline, variant) timed runs resampled

    def cell(self) -> str:
        return f"{self.ratio:.2f}×" + (f" [{self.lo:.2f}–{self.hi:.2f}]" if self.lo is not None else "")

    def words(self) -> str:
        """"2.70× faster [2.52–2.88]" / "1.18× slower [1.05–1.30]" (bounds inverted with it)."""
        if self.ratio >= 1:
            text = f"{self.ratio:.2f}× faster"
            interval = (self.lo, self.hi)
        else:
            text = f"{1 / self.ratio:.2f}× slower"
            interval = (1 / self.hi, 1 / self.lo) if self.lo is not None else (None, None)
        if interval[0] is not None:
            text += f" [{interval[0]:.2f}–{interval[1]:.2f}]"
        return text

    @property
    def within_noise(self) -> bool:
        """The interval holds 1×: no speed difference shown."""
        return self.lo is not None and self.lo <= 1 <= self.hi


def _samples(row: dict, sources: dict[str, Source], rows: list[dict]) -> list[float] | None:
    """The row's per-run seconds per image from its file's ``samples``; None when absent or when its
    variant name is not unique in its file (samples are kept per variant name)."""
    source = sources.get(row.get("source"))
    if source is None or sum(r["variant"] == row["variant"] and r.get("source") == row.get("source")
                             for r in rows) != 1:
        return None
    runs = (source.samples.get(str(row["variant"])) or {}).get("e2e_s")
    if not isinstance(runs, list) or not runs:
        return None
    values = [_value(v) for v in runs]
    return None if any(v is None or v <= 0 or math.isinf(v) for v in values) else values


def speedup(row: dict, base: dict, samples: tuple[list[float] | None, list[float] | None],
            stats) -> Speedup | None:
    """The row's speed-up over its baseline: medians' ratio, with the bootstrap interval of
    :func:`bench.gate.bootstrap_ratio` when both have ``stats.min_runs`` per-run samples."""
    from bench.gate import bootstrap_ratio

    t, t0 = _value(row.get("e2e_s_median")), _value(base.get("e2e_s_median"))
    if t is None or t0 is None or t <= 0 or t0 <= 0:
        return None
    runs, base_runs = samples
    if row is not base and runs and base_runs and min(len(runs), len(base_runs)) >= stats.min_runs:
        try:  # median(baseline) / median(variant): the variant's runs are the "baseline" argument
            ratio, lo, hi = bootstrap_ratio(runs, base_runs, confidence=stats.confidence,
                                            resamples=stats.resamples, seed=stats.seed)
            return Speedup(ratio, lo, hi, (len(base_runs), len(runs)))
        except SdwbError:
            pass
    return Speedup(t0 / t)


def _quality_measured(row: dict) -> bool:
    return any(_value(row.get(k)) is not None for k in _QUALITY_KEYS)


def verdict(label: str, row: dict, base: dict, base_label: str, speed: Speedup | None, config) -> Verdict:
    """One variant's sentence (see the module docstring for the rules)."""
    from bench.gate import row_checks

    speed_text = f"{speed.words()} than {base_label}" if speed is not None else "speed not measured"
    head = f"{label}: {speed_text}"
    if speed is not None and speed.within_noise:
        head += " (within noise: the interval holds 1×)"
    edits = edit_words(row, base, base_label)
    if edits:
        head += f"; {edits}"
    checks = [c for c in row_checks(base, row, config) if c.metric in _QUALITY_CHECKS]
    measured = [c for c in checks if c.baseline is not None and c.candidate is not None]
    if not measured:
        note = row.get("quality_note")
        if _quality_measured(row) and not _quality_measured(base):
            return Verdict(head, "quality not compared", f"{base_label} has no quality scores")
        why = note if isinstance(note, str) and note.startswith("not applicable") else ""
        return Verdict(head, "quality not measured", why)
    changes = []
    for c in measured:
        name = _QUALITY_CHECKS[c.metric]
        digits = 2 if name == "CLIP" else 1
        changes.append(f"{name} {_signed(c.candidate - c.baseline, digits)}")
    accuracy = [i for i, c in enumerate(measured) if _QUALITY_CHECKS[c.metric] != "CLIP"]
    if accuracy:
        changes[accuracy[-1]] += " points"
    head += "; " + ", ".join(changes)
    beyond = [_QUALITY_CHECKS[c.metric] for c in measured if c.status == "regression"]
    if beyond:
        names = beyond[0] if len(beyond) == 1 else ", ".join(beyond[:-1]) + " and " + beyond[-1]
        return Verdict(head, "worse", f"{names} beyond the gate's limits")
    if all(c.status == "skipped" for c in measured):  # every measured metric ungated in this config
        return Verdict(head, "quality not judged", "the gate config sets no quality limits")
    return Verdict(head, "quality held", "no loss beyond the gate's limits")


def edit_words(row: dict, base: dict, base_label: str) -> str:
    """``edit success 70.0 % [63.3–76.1] at strength 0.6 (−2.2 points vs B), 0.147 s/edit`` when the
    row measured the edit metric (the difference only against a baseline edited at the same strength)."""
    ok = _value(row.get("edit_success"))
    if ok is None:
        return ""
    share = _edit_share(row)
    text = f"edit success {share} % at strength {_num(row.get('edit_strength'))}"
    base_ok = _value(base.get("edit_success"))
    if row is not base and base_ok is not None and base.get("edit_strength") == row.get("edit_strength"):
        text += f" ({_signed(100 * (ok - base_ok), 1)} points vs {base_label})"
    seconds = _value(row.get("s_per_edit"))
    return text + (f", {_num(seconds)} s/edit" if seconds is not None else "")


def _edit_share(row: dict) -> str:
    lo, hi = row.get("edit_success_lo"), row.get("edit_success_hi")
    return _with_interval(row.get("edit_success"), lo, hi, 1, 100.0)


def edit_table(ctx: _Context) -> Table | None:
    """The edit metric's columns (builtin:shapes-edit), when any row measured it."""
    if not any(_value(r.get("edit_success")) is not None for r in ctx.rows):
        return None
    kinds = ("color", "shape", "position", "inpaint")
    header = ["variant", "strength", "steps", "edits", "edit success % [95% CI]",
              *(f"{k} %" for k in kinds), "kept region PSNR dB", "s/edit [95% CI]"]
    body = []
    for row, base in zip(ctx.rows, ctx.bases):
        if _value(row.get("edit_success")) is None:
            continue
        body.append([
            _variant_cell(row, base, len(ctx.rows)), _num(row.get("edit_strength")), _text(row.get("steps")),
            _text(row.get("n_edits")),
            _edit_share(row),
            *(_num(100 * v, 1) if (v := _value(row.get(f"edit_success_{k}"))) is not None else MISSING
              for k in kinds),
            _num(row.get("preserve_psnr"), 1),
            _with_interval(row.get("s_per_edit"), row.get("s_per_edit_lo"), row.get("s_per_edit_hi")),
        ])
    return _with_source(Table("Editing (builtin:shapes-edit)", header, body, {0}, {0}), ctx)


def weights_table(ctx: _Context) -> Table | None:
    """Which weights each row measured (``weights_sha256``, ``lineage``), when the results record it."""
    if not any(isinstance(r.get("weights_sha256"), str) for r in ctx.rows):
        return None
    def short(value) -> str:
        return str(value)[:16] if isinstance(value, str) else MISSING

    body = [[_variant_cell(row, base, len(ctx.rows)), short(row.get("weights_sha256")),
             _text(row.get("lineage")), short(row.get("lora_sha256"))]
            for row, base in zip(ctx.rows, ctx.bases)]
    return _with_source(Table("Weights measured", ["variant", "weights sha256", "made by (newest first)",
                                                   "LoRA sha256"], body, {0, 2}, {2}), ctx)


def limits_text(config, origin: str) -> str:
    """The thresholds and interval settings the verdict used, as one sentence."""
    t, st = config.thresholds, config.statistics
    clip = f"CLIP score at most {t.clip_drop:g} lower" if t.clip_drop is not None else "CLIP score not gated"
    acc = (f"colour / shape / position accuracy at most {t.accuracy_drop:g} points lower"
           if t.accuracy_drop is not None else "accuracies not gated")
    return (f"Quality limits of the performance gate ({origin}): {clip}, {acc}; a loss is beyond a limit "
            f"only when it exceeds it. Speed-up intervals: {st.confidence:.0%} percentile bootstrap of "
            f"median(baseline runs) / median(variant runs), {st.resamples} resamples, seed {st.seed}, "
            f"where the results hold at least {st.min_runs} timed runs of both; none otherwise.")


# --------------------------------------------------------------------------- tables


@dataclass
class _Context:
    """Everything the tables, the verdict and the plots share, computed once."""

    rows: list[dict]
    bases: list[dict]
    labels: list[str]  # unique row names (figures)
    speed: list[Speedup | None]
    multi_source: bool


def _context(df: pd.DataFrame, sources: list[Source], config) -> _Context:
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    bases = _baselines(rows)
    by_label = {s.label: s for s in sources}
    speed = [speedup(row, base, (_samples(row, by_label, rows), _samples(base, by_label, rows)),
                     config.statistics) for row, base in zip(rows, bases)]
    multi = len(sources) > 1
    return _Context(rows, bases, _row_labels(rows, multi_source=multi), speed, multi)


def _variant_cell(row: dict, base: dict, n_rows: int) -> str:
    return _text(row["variant"]) + (" (baseline)" if row is base and n_rows > 1 else "")


def _method_cell(row: dict) -> str:
    """What was done (``method`` row field); rows without it (older files) show their model spec."""
    method = row.get("method")
    if isinstance(method, str) and method:
        return method
    return f"model {_text(row.get('model'))}"


def speed_quality_table(ctx: _Context) -> Table:
    """Table 1: what each variant is, its speed and its quality (the columns the verdict reads)."""
    header = ["variant", "what was done", "precision", "steps", "s/image median [p10–p90]", "speed-up",
              "CLIP score [95% CI]", "Δ CLIP", "colour acc % [95% CI]", "shape acc % [95% CI]",
              "position acc % [95% CI]", "PSNR dB"]
    body = []
    for row, base, speed in zip(ctx.rows, ctx.bases, ctx.speed):
        e2e = _num(row.get("e2e_s_median"), None)
        if e2e != MISSING and _value(row.get("e2e_s_p10")) is not None:
            e2e += f" [{_num(row.get('e2e_s_p10'))}–{_num(row.get('e2e_s_p90'))}]"
        precision = row.get("precision") if isinstance(row.get("precision"), str) else _text(row.get("dtype"))
        body.append([
            _variant_cell(row, base, len(ctx.rows)), _method_cell(row), precision, _text(row.get("steps")),
            e2e, speed.cell() if speed is not None else MISSING,
            _with_interval(row.get("clip_score"), row.get("clip_score_lo"), row.get("clip_score_hi"), 2),
            _delta(row, base, "clip_score", 2),
            *(_with_interval(row.get(f"{a}_acc"), row.get(f"{a}_acc_lo"), row.get(f"{a}_acc_hi"), 1, 100.0)
              for a in ("color", "shape", "position")),
            _num(row.get("psnr_vs_baseline"), 2),
        ])
    table = Table("Speed and quality", header, body, {0, 1, 2}, {0, 1, 2})
    return _with_source(table, ctx)


def _delta(row: dict, base: dict, key: str, digits: int) -> str:
    v, v0 = _value(row.get(key)), _value(base.get(key))
    if v is None or v0 is None or row is base:
        return MISSING
    return f"{v - v0:+.{digits}f}"


def _size_cell(row: dict) -> str:
    size = _num(row.get("size_mb"))
    stored = row.get("weights_dtype")
    return f"{size} ({stored})" if size != MISSING and isinstance(stored, str) and stored else size


def _backend_cell(row: dict) -> str:
    cell = _text(row.get("backend"))
    if row.get("device"):
        cell += f" ({row['device']})"
    if isinstance(row.get("providers"), str) and row["providers"]:
        cell += f": {row['providers']}"
    return cell


def cost_table(ctx: _Context) -> Table:
    """Table 2: how each variant runs and what it costs; columns empty for every row are left out
    (CUDA peak of a CPU run)."""
    header = ["variant", "backend / providers", "threads", "UNet ms/call", "peak RSS MB", "CUDA peak MB",
              "size MB (stored as)", "params M", "GMACs/UNet call", "CMMD", "SSIM"]
    body = []
    for row, base in zip(ctx.rows, ctx.bases):
        body.append([
            _variant_cell(row, base, len(ctx.rows)), _backend_cell(row), _text(row.get("threads")),
            _num(row.get("unet_ms_per_call")), _num(row.get("peak_rss_mb")), _num(row.get("cuda_peak_mb")),
            _size_cell(row), _num(row.get("params_m")), _num(row.get("unet_gmacs")),
            _num(row.get("cmmd"), 3), _num(row.get("ssim_vs_baseline"), 4),
        ])
    keep = [0] + [k for k in range(1, len(header)) if any(r[k] != MISSING for r in body)]
    table = Table("Cost and details", [header[k] for k in keep], [[r[k] for k in keep] for r in body],
                  {keep.index(k) for k in (0, 1) if k in keep}, {keep.index(k) for k in (0, 1) if k in keep})
    return _with_source(table, ctx)


def _with_source(table: Table, ctx: _Context) -> Table:
    """A leading ``source`` column when the rows come from several results files."""
    if not ctx.multi_source:
        return table
    return Table(table.title, ["source", *table.header],
                 [[_text(row.get("source")), *cells] for row, cells in zip(ctx.rows, table.body)],
                 {0, *(k + 1 for k in table.text_columns)}, {0, *(k + 1 for k in table.wrap_columns)})


def verdicts(ctx: _Context, config) -> list[Verdict]:
    """One sentence per row that is not its own baseline."""
    out = []
    for row, base, label, speed in zip(ctx.rows, ctx.bases, ctx.labels, ctx.speed):
        if row is base:
            continue
        base_label = ctx.labels[next(i for i, r in enumerate(ctx.rows) if r is base)]
        if ctx.multi_source:  # "machine-a: int8 ... than fp32": the baseline is of the same source
            base_label = base_label.split(": ", 1)[-1]
        out.append(verdict(label, row, base, base_label, speed, config))
    return out


def row_notes(df: pd.DataFrame) -> list[str]:
    """"source: variant: note" for rows with a ``quality_note`` (why a metric is empty, etc.)."""
    if "quality_note" not in df.columns:
        return []
    return [f"{r['source']}: {r['variant']}: {r['quality_note']}"
            for r in df.to_dict("records") if isinstance(r.get("quality_note"), str) and r["quality_note"]]


def environment_lines(env: dict) -> list[tuple[str, str]]:
    """(key, value) pairs of one environment, the usual keys first, libraries as 'name version'."""
    keys = [k for k in _ENV_ORDER if k in env] + sorted(k for k in env if k not in _ENV_ORDER)
    out = []
    for key in keys:
        value = env[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None) or MISSING
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or MISSING
        out.append((key, _text(value)))
    return out


# --------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def latency_figure(rows: list[dict], labels: list[str]) -> bytes | None:
    """Stacked per-component latency per image (text encoder, UNet, VAE, rest) with p10–p90.

    Components follow bench.latency: ms per call, ``*_calls`` calls per pipeline call of ``batch``
    images; "other" is the rest of the end-to-end median (scheduler, guidance, copies).
    """
    idx = [i for i, r in enumerate(rows) if _value(r.get("e2e_s_median")) is not None]
    if not idx:
        return None
    fig = _figure(8, 0.45 * len(idx) + 1.5)
    ax = fig.add_subplot()
    y = list(range(len(idx)))
    left = [0.0] * len(idx)
    comps = {"text encoder": [], "UNet": [], "VAE decode": [], "other": []}
    for i in idx:
        r = rows[i]
        # component times are ms per call; a pipeline call makes *_calls of them for `batch` images
        per = 1.0 / 1000 / max(_value(r.get("batch")) or 1.0, 1.0)
        te = (_value(r.get("text_encoder_ms")) or 0.0) * (_value(r.get("text_encoder_calls")) or 1.0) * per
        unet = (_value(r.get("unet_ms_per_call")) or 0.0) * (_value(r.get("unet_calls")) or 0.0) * per
        unet += ((_value(r.get("unet_shallow_ms_per_call")) or 0.0)
                 * (_value(r.get("unet_shallow_calls")) or 0.0) * per)  # DeepCache's shallow calls
        vae = (_value(r.get("vae_decode_ms")) or 0.0) * (_value(r.get("vae_decode_calls")) or 1.0) * per
        total = _value(r.get("e2e_s_median"))
        for name, v in zip(comps, (te, unet, vae, max(total - te - unet - vae, 0.0))):
            comps[name].append(v)
    for name, values in comps.items():
        if any(values):
            ax.barh(y, values, left=left, label=name)
            left = [a + b for a, b in zip(left, values)]
    lo = [_value(rows[i].get("e2e_s_p10")) for i in idx]
    hi = [_value(rows[i].get("e2e_s_p90")) for i in idx]
    med = [_value(rows[i].get("e2e_s_median")) for i in idx]
    if all(v is not None for v in lo + hi):
        err = [[max(m - a, 0.0) for m, a in zip(med, lo)], [max(b - m, 0.0) for m, b in zip(med, hi)]]
        ax.errorbar(med, y, xerr=err, fmt="none", ecolor="black", capsize=3, label="p10–p90")
    ax.set_yticks(y, [labels[i] for i in idx])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per image (median)")
    ax.set_title("End-to-end latency by component")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig)


def memory_figure(rows: list[dict], labels: list[str]) -> bytes | None:
    """Peak RSS, CUDA peak and size on disk per row: one panel per metric, each on its own axis
    (a 10 MB model beside a 450 MB process would be an invisible bar on a shared one); the size
    bars say the precision their files store."""
    metrics = [("peak_rss_mb", "peak RSS (MB)"), ("cuda_peak_mb", "CUDA peak (MB)"),
               ("size_mb", "size on disk (MB)")]
    metrics = [m for m in metrics if any(_value(r.get(m[0])) is not None for r in rows)]
    if not metrics:
        return None
    fig = _figure(2.2 + 3.0 * len(metrics), 0.38 * len(rows) + 1.3)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    y = list(range(len(rows)))
    for k, (ax, (key, name)) in enumerate(zip(axes, metrics)):
        values = [_value(r.get(key)) for r in rows]
        ax.barh(y, [v or 0.0 for v in values], color=f"C{k}")
        top = max((v for v in values if v is not None), default=1.0) or 1.0
        for yi, v, row in zip(y, values, rows):
            text = MISSING if v is None else _num(v)
            if key == "size_mb" and v is not None and isinstance(row.get("weights_dtype"), str):
                text += f" ({row['weights_dtype']})"
            ax.text(v or 0.0, yi, " " + text, va="center", fontsize=7)
        ax.set_xlim(0, top * (1.9 if key == "size_mb" else 1.35))  # room for the value labels
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Memory and size", fontsize=10, y=1.04)
    return _png(fig)


def _quality_metric(rows: list[dict]) -> tuple[str, str] | None:
    for key, name in (("clip_score", "CLIP score"), ("color_acc", "colour accuracy"),
                      ("ssim_vs_baseline", "SSIM vs baseline")):
        if any(_value(r.get(key)) is not None for r in rows):
            return key, name
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (lower latency x and higher quality y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


_MARKERS = "osD^vP*X<>"


def _dodged(points_px: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """An offset (in points) per point for its number, chosen so that numbers stay apart: the first
    candidate whose label lands at least ``step`` pixels from every label already placed."""
    candidates = [(5, 5), (5, -12), (-13, 5), (-13, -12), (5, 15), (-13, 15), (5, -22), (-13, -22),
                  (15, -3), (-23, -3), (15, 15), (-23, 15), (15, -22), (-23, -22)]
    placed: list[tuple[float, float]] = []
    out = []
    for x, y in points_px:
        chosen = candidates[0]
        for dx, dy in candidates:
            spot = (x + dx * 1.5, y + dy * 1.5)  # points -> pixels at 110 dpi (about 1.5)
            if all(math.hypot(spot[0] - px, spot[1] - py) >= step for px, py in placed):
                chosen = (dx, dy)
                break
        placed.append((x + chosen[0] * 1.5, y + chosen[1] * 1.5))
        out.append(chosen)
    return out


def pareto_figure(rows: list[dict], labels: list[str]) -> bytes | None:
    """Quality (first available: CLIP score, colour accuracy, SSIM) vs s/image, Pareto front drawn.
    Each point is numbered and listed in the legend by its number, so no variant name is written
    on the plot (long names of close points overlapped); numbers are nudged apart."""
    metric = _quality_metric(rows)
    if metric is None:
        return None
    key, name = metric
    idx = [i for i, r in enumerate(rows) if _value(r.get(key)) is not None
           and _value(r.get("e2e_s_median")) is not None]
    if not idx:
        return None
    pts = [(_value(rows[i]["e2e_s_median"]), _value(rows[i][key])) for i in idx]
    fig = _figure(9, 4.6)
    ax = fig.add_subplot()
    if max(p[0] for p in pts) / max(min(p[0] for p in pts), 1e-12) > 20:
        ax.set_xscale("log")
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="0.6", zorder=1,
            marker="o", markersize=13, markerfacecolor="none", label="Pareto front (ringed)")
    for n, ((x, y), i) in enumerate(zip(pts, idx)):
        lo, hi = _value(rows[i].get(f"{key}_lo")), _value(rows[i].get(f"{key}_hi"))
        err = [[max(y - lo, 0.0)], [max(hi - y, 0.0)]] if lo is not None and hi is not None else None
        ax.errorbar([x], [y], yerr=err, fmt=_MARKERS[(n // 10) % len(_MARKERS)], color=f"C{n % 10}",
                    capsize=3, markersize=6, zorder=2, label=f"{n + 1}  {labels[i]}")
    ax.margins(0.08, 0.12)
    ax.get_xlim()  # settle the autoscaled limits before asking where the points are drawn
    offsets = _dodged([tuple(ax.transData.transform(p)) for p in pts], step=11)
    for n, ((x, y), off) in enumerate(zip(pts, offsets)):
        ax.annotate(str(n + 1), (x, y), textcoords="offset points", xytext=off, fontsize=7, zorder=3,
                    color=f"C{n % 10}", fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_xlabel("seconds per image (median)")
    ax.set_ylabel(name)
    with_ci = any(_value(rows[i].get(f"{key}_lo")) is not None for i in idx)
    ax.set_title(f"{name} vs latency" + (" (bars: 95% CI)" if with_ci else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _png(fig)


def grid_figure(source: Source, n_images: int = GRID_IMAGES) -> bytes | None:
    """Rows = the first prompts, columns = variants (same prompts and seeds); None without images."""
    import numpy as np
    from PIL import Image

    columns = {v: [p for p in files[:n_images]] for v, files in source.images.items() if files}
    columns = {v: files for v, files in columns.items() if any(p.is_file() for p in files)}
    if not columns:
        return None
    n_rows = max(len(files) for files in columns.values())
    fig = _figure(1.6 * len(columns) + 0.5, 1.6 * n_rows + 0.4)
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    for c, (variant, files) in enumerate(columns.items()):
        axes[0][c].set_title(variant, fontsize=8)
        for r in range(n_rows):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r < len(files) and files[r].is_file():
                try:
                    with Image.open(files[r]) as im:
                        ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
                except OSError:
                    ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            if c == 0:
                prompt = source.prompts[r] if r < len(source.prompts) else f"prompt {r}"
                ax.set_ylabel(textwrap.fill(prompt, 26, max_lines=4, placeholder="…"), fontsize=6)
    return _png(fig)


# --------------------------------------------------------------------------- rendering


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _incomplete_text(sources) -> str | None:
    partial = [s.label for s in sources if not s.complete]
    if not partial:
        return None
    return (f"INCOMPLETE: {', '.join(partial)} holds partial results (the benchmark did not finish); "
            "its rows are what was measured before it stopped.")


_TABLE_NOTE = (f"{MISSING} = not measured / not applicable; speed-up and Δ are against the baseline row of "
               "the same source and model; quality intervals are 95% bootstrap over prompts.")
_NO_VERDICT = "Every row is its own baseline: nothing to compare."


@dataclass
class _Page:
    """What both renderings show."""

    title: str
    sources: list[Source]
    verdicts: list[Verdict]
    limits: str
    tables: tuple[Table, ...]  # speed and quality, cost, then any more (editing)
    notes: list[str]


def _markdown(page: _Page, figures: dict[str, str]) -> str:
    incomplete = _incomplete_text(page.sources)
    lines = [page.title, "", "## Verdict", ""]
    lines += [f"- {_md_cell(v.text(lambda s: f'**{s}**'))}" for v in page.verdicts] or [_NO_VERDICT]
    lines += ["", page.limits, ""]
    lines += [f"**{incomplete}**", ""] if incomplete else []
    lines += ["Rendered from saved results (no model was run):", ""]
    lines += [f"- `{s.label}`: `{s.path}`" + ("" if s.complete else " (**incomplete**)")
              for s in page.sources] + [""]
    for table in page.tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |",
                  "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.body] + [""]
    lines += [_TABLE_NOTE, ""]
    lines += [f"- {_md_cell(n)}" for n in page.notes] + ([""] if page.notes else [])
    lines += ["## Environment", ""]
    for s in page.sources:
        lines += [f"### {s.label}", ""] + ([f"Command: `{s.command}`", ""] if s.command else [])
        lines += [f"- **{k}**: {_md_cell(v)}" for k, v in environment_lines(s.environment)] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{title}]({path})" for title, path in figures.items()] + [""]
    return "\n".join(lines)


# Table 1 must fit a 1280 px window: small type, text columns wrap, intervals on a second line.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 4px;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#f0f0f0;white-space:normal;text-align:center;font-weight:600;min-width:3em}
td.t{text-align:left}td.w{white-space:normal;overflow-wrap:anywhere;min-width:6em;max-width:13em}td.na{color:#999;text-align:center}
.ci{display:block;font-size:10px;color:#666}
ul.verdict{font-size:14px;padding-left:1.2em}ul.verdict li{margin:.25em 0}strong.worse{color:#a00}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dt{font-weight:600}img{max-width:100%}.fig{margin:1em 0}.wide{overflow-x:auto}p.note{font-size:12px}
"""
_SPLIT = re.compile(r"^(\S+) ([\[(].*[\])])$")  # "27.35 [27.01–27.70]", "5.6 (fp16)"


def _html_table(table: Table, wide: bool) -> str:
    e = html.escape
    out = [f"<h2>{e(table.title)}</h2>" + ("<div class='wide'>" if wide else "") + "<table><tr>"
           + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>"]
    for row in table.body:
        cells = []
        for k, c in enumerate(row):
            if c == MISSING:
                cells.append(f"<td class='na'>{e(c)}</td>")
            elif k in table.text_columns:
                cls = "t w" if k in table.wrap_columns else "t"
                cells.append(f"<td class='{cls}'>{e(c)}</td>")
            else:
                m = _SPLIT.match(c)
                inner = f"{e(m.group(1))}<span class='ci'>{e(m.group(2))}</span>" if m else e(c)
                cells.append(f"<td>{inner}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>" + ("</div>" if wide else ""))
    return "\n".join(out)


def _html(page: _Page, figures: dict[str, bytes]) -> str:
    e = html.escape
    incomplete = _incomplete_text(page.sources)
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>sd-workbench report</title>",
           f"<style>{_CSS}</style></head><body><h1>{e(page.title.removeprefix('# '))}</h1>",
           "<h2>Verdict</h2>"]
    if page.verdicts:
        items = []
        for v in page.verdicts:
            outcome = f"<strong class='worse'>{e(v.outcome)}</strong>" if v.worse else e(v.outcome)
            items.append(f"<li>{e(v.head)}: {outcome}" + (f" ({e(v.why)})" if v.why else "") + "</li>")
        out.append("<ul class='verdict'>" + "".join(items) + "</ul>")
    else:
        out.append(f"<p>{e(_NO_VERDICT)}</p>")
    out.append(f"<p class='note'>{e(page.limits)}</p>")
    if incomplete:
        out.append(f"<p><strong>{e(incomplete)}</strong></p>")
    out.append("<p class='note'>Rendered from saved results (no model was run): "
               + ", ".join(f"<code>{e(s.label)}</code> ({e(str(s.path))})"
                           + ("" if s.complete else " (incomplete)") for s in page.sources) + ".</p>")
    out.append(_html_table(page.tables[0], wide=False))
    out.append(_html_table(page.tables[1], wide=True))
    out += [_html_table(table, wide=False) for table in page.tables[2:]]
    out.append(f"<p class='note'>{e(_TABLE_NOTE)}</p>")
    if page.notes:
        out.append("<ul class='note'>" + "".join(f"<li>{e(n)}</li>" for n in page.notes) + "</ul>")
    out.append("<h2>Environment</h2>")
    for s in page.sources:
        out.append(f"<h3>{e(s.label)}</h3>")
        if s.command:
            out.append(f"<p>Command: <code>{e(s.command)}</code></p>")
        out.append("<dl>")
        out += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in environment_lines(s.environment)]
        out.append("</dl>")
    if figures:
        out.append("<h2>Figures</h2>")
        for title, png in figures.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(f"<div class='fig'><h3>{e(title)}</h3><img alt='{e(title)}' "
                       f"src='data:image/png;base64,{data}'></div>")
    out.append("</body></html>")
    return "\n".join(out)


def render_report(results_paths: list[Path], out_dir: Path, n_images: int = GRID_IMAGES,
                  gate: str | Path | None = None) -> tuple[Path, Path]:
    """Read results.json files (or directories holding one), write ``report.md`` + ``report.html``.

    ``gate``: a gate config (``configs/gate/*.yaml``) whose thresholds and statistics the verdict
    uses; default: the defaults of ``sdwb gate``.
    """
    from sdwb.runs import atomic_write_bytes, atomic_write_text

    config, origin = gate_config(gate)
    df, sources = load_sources([Path(p) for p in results_paths])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SdwbError(f"--out {out_dir}: exists and is not a directory")
    ctx = _context(df, sources, config)
    incomplete = _incomplete_text(sources)
    page = _Page("# sd-workbench benchmark report" + (" (INCOMPLETE)" if incomplete else ""), sources,
                 verdicts(ctx, config), limits_text(config, origin),
                 (speed_quality_table(ctx), cost_table(ctx),
                  *filter(None, [edit_table(ctx), weights_table(ctx)])), row_notes(df))
    figures: dict[str, bytes] = {}
    for title, make in (("Latency", latency_figure), ("Quality vs latency (Pareto)", pareto_figure),
                        ("Memory and size", memory_figure)):
        png = make(ctx.rows, ctx.labels)
        if png is not None:
            figures[title] = png
    for s in sources:
        png = grid_figure(s, n_images)
        if png is not None:
            figures[f"Images: {s.label}"] = png
    files: dict[str, str] = {}
    for k, (title, png) in enumerate(figures.items()):
        name = f"figures/{k:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.png"
        atomic_write_bytes(out_dir / name, png)
        files[title] = name
    md = atomic_write_text(out_dir / "report.md", _markdown(page, files))
    html_path = atomic_write_text(out_dir / "report.html", _html(page, figures))
    return md, html_path
