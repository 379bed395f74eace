"""The performance-regression gate: is a candidate slower, bigger or worse than a baseline?

What: :func:`compare` takes a baseline row and a candidate row of ``sdwb bench`` results (with
their per-run ``samples``) and decides each metric against a threshold from the gate config
(``configs/gate/*.yaml``): end-to-end latency and UNet call time (+x %), peak memory (+y %),
CLIP score (-z) and colour / shape / position accuracy (-w points).

Why statistics, not single numbers: one timed run of a small model on a shared CPU varies by
several per cent, so "the median got 6 % slower" is not evidence. Latency is decided on the
percentile-bootstrap interval of the ratio ``median(candidate) / median(baseline)``, resampling
each side's timed runs independently: a regression is declared only when the whole interval
lies above ``1 + x``, i.e. the slowdown beyond the allowance is significant at the configured
confidence. An interval that straddles the limit is reported as "inconclusive" and passes (more
repeats narrow it). Memory and quality are one number per variant (peak RSS of a fresh process;
scores over a fixed prompt set with fixed seeds, so the same model scores identically): they are
compared with their threshold directly, and the quality rows show their bootstrap intervals.

Outcome: ``passed`` (exit 0) or ``regression`` (exit 1); bad input is an :class:`SdwbError`
(exit 2 from ``sdwb gate``). :func:`write_markdown` and :func:`write_junit` write the summary
for people and for CI systems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional
from xml.etree import ElementTree as ET

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdwb.errors import SdwbError
from sdwb.yaml_io import Scheduler, apply_overrides, read_yaml

_STRICT = ConfigDict(extra="forbid", strict=True)
Status = Literal["pass", "regression", "inconclusive", "skipped"]


class Thresholds(BaseModel):
    """How much worse the candidate may be before the gate fails (None: metric not gated)."""

    model_config = _STRICT

    latency_pct: Optional[float] = Field(5.0, ge=0, description="end-to-end s/image, % slower allowed")
    unet_latency_pct: Optional[float] = Field(None, ge=0, description="UNet ms/call, % slower allowed")
    memory_pct: Optional[float] = Field(10.0, ge=0, description="peak RSS / CUDA peak, % more allowed")
    clip_drop: Optional[float] = Field(1.0, ge=0, description="CLIP score points lower allowed")
    accuracy_drop: Optional[float] = Field(
        3.0, ge=0, description="colour/shape/position points lower allowed"
    )


class Statistics(BaseModel):
    """The bootstrap behind the latency decisions."""

    model_config = _STRICT

    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided interval of the ratio")
    resamples: int = Field(4000, ge=200, le=100_000)
    seed: int = Field(0, ge=0)
    min_runs: int = Field(5, ge=2, description="fewer timed runs per side than this is an error")


class Measure(BaseModel):
    """How ``sdwb gate --ab`` benchmarks both models (unset keys: each model's own defaults)."""

    model_config = _STRICT

    steps: Optional[int] = Field(None, ge=1, le=1000)
    guidance: Optional[float] = Field(None, ge=0)
    scheduler: Optional[Scheduler] = None
    batch: int = Field(1, ge=1, le=256)
    n_prompts: int = Field(4, ge=1, description="prompts rotated through the timed runs")
    repeats: int = Field(15, ge=2, description="timed runs per model, interleaved A B A B ...")
    warmup: int = Field(2, ge=0)
    threads: Optional[int] = Field(None, ge=1)
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    metrics: list[Literal["latency", "memory", "quality"]] = Field(default_factory=lambda: ["latency"])


class GateConfig(BaseModel):
    """A whole gate config: thresholds, statistics and the ``--ab`` measurement."""

    model_config = _STRICT

    thresholds: Thresholds = Field(default_factory=Thresholds)
    statistics: Statistics = Field(default_factory=Statistics)
    measure: Measure = Field(default_factory=Measure)


def load_gate_config(path: str | Path | None, overrides: list[str] | None = None) -> GateConfig:
    """Read ``configs/gate/*.yaml`` (or the defaults), apply ``--set`` overrides, validate."""
    source = str(path) if path is not None else "gate defaults"
    data = read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        return GateConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"][:1].lower() + err["msg"][1:]
        raise SdwbError(f"{source}: {key}: {what}") from None


# --------------------------------------------------------------------------- statistics


def bootstrap_ratio(
    baseline, candidate, *, confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """``(ratio, lo, hi)``: median(candidate) / median(baseline) and its percentile-bootstrap interval.

    Each side's runs are resampled with replacement independently (the runs of the two sides are
    not paired: interleaving only spreads machine drift over both).
    """
    a, b = np.asarray(baseline, float), np.asarray(candidate, float)
    if len(a) < 2 or len(b) < 2:
        raise SdwbError(f"bootstrap: need at least 2 runs per side, got {len(a)} and {len(b)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.any(a <= 0):
        raise SdwbError("bootstrap: timings must be finite and positive")
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    ratios = mb / ma
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(np.median(b) / np.median(a)), float(lo), float(hi)


# --------------------------------------------------------------------------- decisions


@dataclass
class Check:
    """One metric's verdict."""

    metric: str
    status: Status
    baseline: float | None
    candidate: float | None
    change: str  # "+12.3 % [8.1, 16.0]" or "-0.4 points"
    limit: str  # "+5 %" or "-3 points"
    detail: str = ""


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _latency_check(
    metric: str, base: list[float], cand: list[float], pct: float | None, stats: Statistics, unit: str
) -> Check:
    limit = f"+{pct:g} %" if pct is not None else "not gated"
    if pct is None:
        return Check(metric, "skipped", None, None, "", limit, "no threshold set")
    if not base or not cand:
        return Check(
            metric,
            "skipped",
            None,
            None,
            "",
            limit,
            "no per-run samples in one of the results (re-run sdwb bench with latency)",
        )
    if min(len(base), len(cand)) < stats.min_runs:
        raise SdwbError(
            f"{metric}: {len(base)} baseline and {len(cand)} candidate timed runs; the gate needs "
            f"at least {stats.min_runs} each (statistics.min_runs) to bootstrap"
        )
    ratio, lo, hi = bootstrap_ratio(
        base, cand, confidence=stats.confidence, resamples=stats.resamples, seed=stats.seed
    )
    bound = 1 + pct / 100
    status: Status = "regression" if lo > bound else "inconclusive" if hi > bound else "pass"
    change = f"{(ratio - 1) * 100:+.1f} % [{(lo - 1) * 100:+.1f}, {(hi - 1) * 100:+.1f}]"
    detail = (
        f"median {np.median(base):.4g} -> {np.median(cand):.4g} {unit}; {len(base)} vs {len(cand)} runs, "
        f"{stats.confidence:.0%} bootstrap interval of the ratio"
    )
    return Check(metric, status, float(np.median(base)), float(np.median(cand)), change, limit, detail)


def _higher_is_worse(metric: str, base: float | None, cand: float | None, pct: float | None) -> Check:
    limit = f"+{pct:g} %" if pct is not None else "not gated"
    if pct is None or base is None or cand is None or base <= 0:
        return Check(
            metric, "skipped", base, cand, "", limit, "not measured in both" if pct is not None else ""
        )
    change = (cand / base - 1) * 100
    status: Status = "regression" if change > pct else "pass"
    return Check(metric, status, base, cand, f"{change:+.1f} %", limit, "one fresh-process measurement each")


def _drop_check(metric: str, row_b: dict, row_c: dict, key: str, allowed: float | None,
                scale: float = 1.0) -> Check:
    """Lower is worse; ``scale`` turns the stored value into the threshold's unit (accuracies are
    stored as fractions in results.json and gated in percentage points: scale 100)."""

    def value(row: dict, k: str) -> float | None:
        v = _num(row, k)
        return None if v is None else v * scale

    base, cand = value(row_b, key), value(row_c, key)
    limit = f"-{allowed:g} points" if allowed is not None else "not gated"
    if allowed is None or base is None or cand is None:
        return Check(
            metric, "skipped", base, cand, "", limit, "not measured in both" if allowed is not None else ""
        )
    delta = cand - base
    lo, hi = value(row_c, key + "_lo"), value(row_c, key + "_hi")
    interval = f"; candidate 95% interval [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
    status: Status = "regression" if -delta > allowed + 1e-9 else "pass"
    return Check(
        metric, status, base, cand, f"{delta:+.2f} points", limit, f"same prompts and seeds{interval}"
    )


def compare(
    base_row: dict, base_samples: dict, cand_row: dict, cand_samples: dict, config: GateConfig
) -> list[Check]:
    """Every metric's check of a candidate row against a baseline row (see the module docstring)."""
    t, stats = config.thresholds, config.statistics
    checks = [
        _latency_check(
            "latency (s/image)",
            base_samples.get("e2e_s", []),
            cand_samples.get("e2e_s", []),
            t.latency_pct,
            stats,
            "s/image",
        ),
        _latency_check(
            "UNet call (ms)",
            base_samples.get("unet_ms", []),
            cand_samples.get("unet_ms", []),
            t.unet_latency_pct,
            stats,
            "ms",
        ),
    ]
    for key, name in (("peak_rss_mb", "peak RSS (MB)"), ("cuda_peak_mb", "CUDA peak (MB)")):
        if _num(base_row, key) is not None or _num(cand_row, key) is not None:
            checks.append(_higher_is_worse(name, _num(base_row, key), _num(cand_row, key), t.memory_pct))
    checks.append(_drop_check("CLIP score", base_row, cand_row, "clip_score", t.clip_drop))
    for key in ("color_acc", "shape_acc", "position_acc"):
        checks.append(
            _drop_check(
                key.replace("_acc", " accuracy %").replace("color", "colour"),
                base_row,
                cand_row,
                key,
                t.accuracy_drop,
                scale=100.0,  # results.json stores accuracies as fractions
            )
        )
    return checks


def verdict(checks: list[Check]) -> str:
    """``"regression"`` when any check regressed, else ``"passed"``."""
    return "regression" if any(c.status == "regression" for c in checks) else "passed"


# --------------------------------------------------------------------------- results files


def read_results(path: str | Path) -> dict:
    """A complete ``results.json`` (or a directory holding one) as a dict, with one-line errors
    (read by :mod:`bench.results`; a directory's partial results are not taken)."""
    from bench.results import RESULTS_JSON, _read_json, _results_file

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    data = _read_json(_results_file(path))
    if not data["rows"]:
        raise SdwbError(f"{path}: not a results file (expected an object with a non-empty 'rows' list)")
    return data


def pick_row(data: dict, variant: str | None, source: str) -> tuple[dict, dict]:
    """``(row, samples)`` of ``variant`` (default: the only row, else an error listing them)."""
    rows = {r.get("variant"): r for r in data["rows"]}
    if variant is None:
        if len(rows) != 1:
            raise SdwbError(
                f"{source}: {len(rows)} variants ({', '.join(map(str, rows))}); pick one with --variant"
            )
        variant = next(iter(rows))
    if variant not in rows:
        raise SdwbError(f"{source}: no variant {variant!r} (has: {', '.join(map(str, rows))})")
    return rows[variant], (data.get("samples") or {}).get(variant, {})


# --------------------------------------------------------------------------- outputs


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def write_markdown(
    path: str | Path, title: str, checks: list[Check], outcome: str, context: list[str]
) -> Path:
    """A Markdown summary: the outcome, one table row per check, and where the numbers came from."""
    from sdwb.runs import atomic_write_text

    icon = {
        "pass": "pass",
        "regression": "**REGRESSION**",
        "inconclusive": "inconclusive (passes)",
        "skipped": "skipped",
    }
    lines = [f"# {title}: {'REGRESSION' if outcome == 'regression' else 'passed'}", ""]
    lines += [f"- {c}" for c in context] + [""]
    lines += [
        "| metric | baseline | candidate | change [interval] | allowed | verdict | how |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.metric} | {_fmt(c.baseline)} | {_fmt(c.candidate)} | {c.change or '—'} | {c.limit} "
            f"| {icon[c.status]} | {c.detail} |"
        )
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_junit(path: str | Path, suite: str, checks: list[Check]) -> Path:
    """JUnit XML: one testcase per check; a regression is a failure, a skipped check is skipped."""
    from sdwb.runs import atomic_write_text

    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(checks)),
        failures=str(sum(c.status == "regression" for c in checks)),
        skipped=str(sum(c.status == "skipped" for c in checks)),
    )
    for c in checks:
        case = ET.SubElement(root, "testcase", classname=suite, name=c.metric)
        text = (f"baseline {_fmt(c.baseline)}, candidate {_fmt(c.candidate)}, "
                f"change {c.change}, allowed {c.limit}")
        if c.status == "regression":
            ET.SubElement(case, "failure", message=f"{c.metric}: {c.change} beyond {c.limit}").text = text
        elif c.status == "skipped":
            ET.SubElement(case, "skipped", message=c.detail or "not gated")
        else:
            ET.SubElement(case, "system-out").text = f"{c.status}: {text}; {c.detail}"
    ET.indent(root)
    return atomic_write_text(path, ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")


def summary_line(checks: list[Check], outcome: str) -> str:
    """One line for the terminal: the outcome and each gated metric's change."""
    parts = [f"{c.metric} {c.change} ({c.status})" for c in checks if c.status != "skipped"]
    return f"gate {'REGRESSION' if outcome == 'regression' else 'passed'}: " + "; ".join(parts)


def ab_bench_config(
    baseline: str, candidate: str, measure: Measure, *, inject_slowdown: float = 0.0, name: str = "gate-ab"
) -> Any:
    """The two-variant ``BenchConfig`` that ``sdwb gate --ab`` runs (interleaved A B A B ...)."""
    from bench.scenario import BenchConfig

    defaults: dict[str, Any] = {k: v for k, v in measure.model_dump().items() if v is not None}
    variants = [{"name": "baseline", "model": baseline}, {"name": "candidate", "model": candidate}]
    if inject_slowdown:
        variants[1]["unet_slowdown"] = float(inject_slowdown)
    try:
        return BenchConfig.model_validate(
            {"name": name, "defaults": defaults, "variants": variants, "baseline": "baseline"}
        )
    except ValidationError as e:
        raise SdwbError(f"gate --ab: {e.errors(include_url=False)[0]['msg']}") from None
