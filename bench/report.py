"""Render saved benchmark results into ``report.md`` and one self-contained ``report.html``.

Why: numbers only convince when they are read side by side with the machine they were measured
on and the images they produced. The report reads ``results.json`` files written by the bench
(one per machine or run) and never loads or runs a model, so it can be re-rendered anywhere and
committed next to the results. Several files merge into one table with a ``source`` column.

What it shows: the environment of every source; one table (latency median [p10–p90], speed-up
vs the baseline, memory, size, MACs, quality with 95 % intervals); plots (stacked per-component
latency, memory, quality vs latency with the Pareto front) drawn with matplotlib's Agg canvas
(no pyplot, no global backend state); an image grid per source (rows prompts, columns variants,
same seeds). ``report.html`` inlines CSS and every image as a base64 ``data:`` URI: no external
asset, no script. ``report.md`` links the same figures, written beside it under ``figures/``.

Missing metrics (not applicable, e.g. quality on ``sd15-arch``) render as "—", never 0;
a PSNR of ``inf`` (pixel-identical to the baseline) renders as "∞".

The baseline of a row is the row of the same source that its ``baseline`` string names, as
``bench`` writes it on every row (the config's ``baseline:``, else its first variant): a
compressed variant is its own model directory, and its speed-up is against the model it was made
from. Rows without that string (hand-made results) take the row of the same source and model
marked ``baseline: true`` or ``role: baseline``, else the first row of that source and model: a
speed-up across unrelated models (tiny-shapes vs sd15-arch) would mean nothing.
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


def _prompts_and_command(path: Path) -> tuple[list[str], str | None, bool]:
    """The prompts of a results file's images, the command that measured them (if recorded), and
    whether the results are complete (``results.partial.json`` / ``"complete": false`` are not)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # already checked by load_results; nothing to add then
        return [], None, path.name != PARTIAL_JSON
    if not isinstance(data, dict):
        return [], None, path.name != PARTIAL_JSON
    command = data.get("command")
    complete = data.get("complete") is not False and path.name != PARTIAL_JSON
    return [str(p) for p in data.get("prompts") or []], str(command) if command else None, complete


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
        prompts, command, complete = _prompts_and_command(_resolved(path))
        sources.append(Source(label, _resolved(path), env, images, prompts, command, complete))
    df["source"] = df["env_index"].map(dict(enumerate(labels)))
    return df, sources


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


def _speedup(row: dict, base: dict) -> str:
    t, t0 = _value(row.get("e2e_s_median")), _value(base.get("e2e_s_median"))
    if t is None or t0 is None or t <= 0:
        return MISSING
    return f"{t0 / t:.2f}×"


def _delta(row: dict, base: dict, key: str, digits: int) -> str:
    v, v0 = _value(row.get(key)), _value(base.get(key))
    if v is None or v0 is None or row is base:
        return MISSING
    return f"{v - v0:+.{digits}f}"


def summary_table(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the main table (one row per results row)."""
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    bases = _baselines(rows)
    header = [
        "source", "variant", "backend", "dtype", "steps", "s/image median [p10–p90]", "speed-up",
        "UNet ms/call", "peak RSS MB", "CUDA peak MB", "size MB", "params M", "GMACs/UNet call",
        "CLIP score [95% CI]", "Δ CLIP", "colour acc % [95% CI]", "shape acc % [95% CI]",
        "position acc % [95% CI]", "CMMD", "PSNR dB", "SSIM",
    ]
    body = []
    for row, base in zip(rows, bases):
        backend = _text(row.get("backend"))
        if row.get("device"):
            backend += f" ({row['device']})"
        e2e = _num(row.get("e2e_s_median"), None)
        if e2e != MISSING and _value(row.get("e2e_s_p10")) is not None:
            e2e += f" [{_num(row.get('e2e_s_p10'))}–{_num(row.get('e2e_s_p90'))}]"
        base_mark = " (baseline)" if row is base and len(rows) > 1 else ""
        body.append([
            _text(row.get("source")), _text(row["variant"]) + base_mark, backend, _text(row.get("dtype")),
            _text(row.get("steps")), e2e, _speedup(row, base), _num(row.get("unet_ms_per_call")),
            _num(row.get("peak_rss_mb")), _num(row.get("cuda_peak_mb")), _num(row.get("size_mb")),
            _num(row.get("params_m")), _num(row.get("unet_gmacs")),
            _with_interval(row.get("clip_score"), row.get("clip_score_lo"), row.get("clip_score_hi"), 2),
            _delta(row, base, "clip_score", 2),
            *(
                _with_interval(row.get(f"{a}_acc"), row.get(f"{a}_acc_lo"), row.get(f"{a}_acc_hi"), 1, 100.0)
                for a in ("color", "shape", "position")
            ),
            _num(row.get("cmmd"), 3), _num(row.get("psnr_vs_baseline"), 2),
            _num(row.get("ssim_vs_baseline"), 4),
        ])
    return header, body


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
    """Peak RSS, CUDA peak and size on disk per row (grouped bars, MB)."""
    metrics = [("peak_rss_mb", "peak RSS"), ("cuda_peak_mb", "CUDA peak"), ("size_mb", "size on disk")]
    metrics = [m for m in metrics if any(_value(r.get(m[0])) is not None for r in rows)]
    if not metrics:
        return None
    fig = _figure(8, 0.5 * len(rows) + 1.5)
    ax = fig.add_subplot()
    height = 0.8 / len(metrics)
    for k, (key, name) in enumerate(metrics):
        values = [_value(r.get(key)) or 0.0 for r in rows]
        ax.barh([i + k * height for i in range(len(rows))], values, height=height, label=name)
    ax.set_yticks([i + height * (len(metrics) - 1) / 2 for i in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.set_title("Memory and size")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
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


def pareto_figure(rows: list[dict], labels: list[str]) -> bytes | None:
    """Quality (first available: CLIP score, colour accuracy, SSIM) vs s/image, Pareto front drawn."""
    metric = _quality_metric(rows)
    if metric is None:
        return None
    key, name = metric
    idx = [i for i, r in enumerate(rows) if _value(r.get(key)) is not None
           and _value(r.get("e2e_s_median")) is not None]
    if not idx:
        return None
    pts = [(_value(rows[i]["e2e_s_median"]), _value(rows[i][key])) for i in idx]
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    lo = [_value(rows[i].get(f"{key}_lo")) for i in idx]
    hi = [_value(rows[i].get(f"{key}_hi")) for i in idx]
    if all(v is not None for v in lo + hi):
        err = [[max(y - a, 0.0) for (_, y), a in zip(pts, lo)],
               [max(b - y, 0.0) for (_, y), b in zip(pts, hi)]]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, fmt="o", capsize=3, label="95% CI")
    else:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red",
            label="Pareto front")
    for (x, y), i in zip(pts, idx):
        ax.annotate(labels[i], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if max(p[0] for p in pts) / max(min(p[0] for p in pts), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per image (median)")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs latency")
    ax.legend(fontsize=8)
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


def _markdown(header, body, notes, sources, figures: dict[str, str]) -> str:
    incomplete = _incomplete_text(sources)
    lines = ["# sd-workbench benchmark report" + (" (INCOMPLETE)" if incomplete else ""), ""]
    lines += [f"**{incomplete}**", ""] if incomplete else []
    lines += ["Rendered from saved results (no model was run):", ""]
    lines += [f"- `{s.label}`: `{s.path}`" + ("" if s.complete else " (**incomplete**)")
              for s in sources] + [""]
    lines += ["## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    lines += ["", f"{MISSING} = not measured / not applicable; speed-up and Δ are against the baseline row "
              "of the same source and model; intervals are 95% bootstrap over prompts.", ""]
    lines += [f"- {_md_cell(n)}" for n in notes] + ([""] if notes else [])
    lines += ["## Environment", ""]
    for s in sources:
        lines += [f"### {s.label}", ""] + ([f"Command: `{s.command}`", ""] if s.command else [])
        lines += [f"- **{k}**: {_md_cell(v)}" for k, v in environment_lines(s.environment)] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{title}]({path})" for title, path in figures.items()] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td.t{text-align:left}td.na{color:#999;text-align:center}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dt{font-weight:600}img{max-width:100%}.fig{margin:1em 0}.wide{overflow-x:auto}
"""


def _html(header, body, notes, sources, figures: dict[str, bytes]) -> str:
    e = html.escape
    incomplete = _incomplete_text(sources)
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>sd-workbench report</title>",
           f"<style>{_CSS}</style></head><body><h1>sd-workbench benchmark report"
           + (" (INCOMPLETE)" if incomplete else "") + "</h1>",
           *([f"<p><strong>{e(incomplete)}</strong></p>"] if incomplete else []),
           "<p>Rendered from saved results (no model was run): "
           + ", ".join(f"<code>{e(s.label)}</code> ({e(str(s.path))})"
                       + ("" if s.complete else " (incomplete)") for s in sources) + ".</p>",
           "<h2>Results</h2><div class='wide'><table><tr>"
           + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in body:
        cells = []
        for k, c in enumerate(row):
            cls = "na" if c == MISSING else "t" if k < 5 else ""
            cells.append(f"<td class='{cls}'>{e(c)}</td>" if cls else f"<td>{e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append(f"</table></div><p>{MISSING} = not measured / not applicable; speed-up and Δ are against the "
               "baseline row of the same source and model; intervals are 95% bootstrap over prompts.</p>")
    if notes:
        out.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    out.append("<h2>Environment</h2>")
    for s in sources:
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


def render_report(results_paths: list[Path], out_dir: Path, n_images: int = GRID_IMAGES) -> tuple[Path, Path]:
    """Read results.json files (or directories holding one), write ``report.md`` + ``report.html``."""
    from sdwb.runs import atomic_write_bytes, atomic_write_text

    df, sources = load_sources([Path(p) for p in results_paths])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SdwbError(f"--out {out_dir}: exists and is not a directory")
    header, body = summary_table(df)
    notes = row_notes(df)
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    labels = _row_labels(rows, multi_source=len(sources) > 1)
    figures: dict[str, bytes] = {}
    for title, make in (("Latency", latency_figure), ("Quality vs latency (Pareto)", pareto_figure),
                        ("Memory", memory_figure)):
        png = make(rows, labels)
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
    md = atomic_write_text(out_dir / "report.md", _markdown(header, body, notes, sources, files))
    page = atomic_write_text(out_dir / "report.html", _html(header, body, notes, sources, figures))
    return md, page
