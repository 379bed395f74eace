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
(exit 2 from ``sdwb gate``), and so is anything the gate would otherwise have to skip or trust:
partial results, a metric the config gates but a side did not measure, rows of different
scenarios (:mod:`bench.gate_inputs`). :func:`write_markdown` and :func:`write_junit` write the summary
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

from sdwb.backends.registry import Backend
from sdwb.errors import SdwbError
from sdwb.schema_errors import format_errors, lower
from sdwb.yaml_io import Scheduler, apply_overrides, read_yaml

_STRICT = ConfigDict(extra="forbid", strict=True)
Status = Literal["pass", "regression", "inconclusive", "skipped"]


class Thresholds(BaseModel):
    """How much worse the candidate may be before the gate fails (None: metric not gated)."""

    model_config = _STRICT

    latency_pct: Optional[float] = Field(
        5.0, ge=0, description="end-to-end s/image measured now (--ab, --ab-rev), % slower allowed"
    )
    unet_latency_pct: Optional[float] = Field(
        None, ge=0, description="UNet ms/call measured now (--ab, --ab-rev), % slower allowed"
    )
    file_latency_pct: Optional[float] = Field(
        5.0,
        ge=0,
        description="end-to-end s/image against a saved results file, % slower allowed; judged only "
        "when both files were timed on the same CPU model, CPU flags and thread count",
    )
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
    min_rounds: int = Field(4, ge=2, description="--ab-rev: fewer rounds than this is an error")
    rule: Literal["interval-above-limit", "significant-and-above-limit"] = Field(
        "interval-above-limit",
        description="when a latency ratio is a regression: the whole interval lies above 1 + limit; or "
        "(asv's rule) the interval lies above 1 and the estimate above 1 + limit",
    )


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
    backend: Backend = "torch"
    metrics: list[Literal["latency", "memory", "quality"]] = Field(default_factory=lambda: ["latency"])
    model: str = Field("builtin:tiny-shapes", description="--ab-rev: the model both revisions benchmark")
    rounds: int = Field(
        16, ge=2, le=200, description="--ab-rev: pairs of `sdwb bench` runs (base, head), order alternating"
    )
    processes: int = Field(
        2, ge=1, le=50, description="--ab-rev: fresh worker processes per side over the rounds"
    )


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
        raise SdwbError(f"{source}: " + format_errors(e, limit=1, empty_key="(top level)",
                                                      got=lambda err: lower(err["msg"]))) from None


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


def paired_rounds_ratio(
    baseline: list[list[float]], candidate: list[list[float]], *, confidence: float = 0.95,
    resamples: int = 4000, seed: int = 0,
) -> tuple[float, float, float]:
    """``(ratio, lo, hi)`` for rounds of paired measurements (``sdwb gate --ab-rev``).

    Round ``i`` holds the timed runs of one baseline and one candidate `sdwb bench` run made back to
    back; its ratio is median(candidate runs) / median(baseline runs). The estimate is the median
    of the rounds' ratios, and the interval a percentile bootstrap of that median over rounds
    (rounds resampled with replacement, each keeping its pair together). Pairing is what makes
    the decision robust to a machine that drifts: a slow minute slows both halves of its round;
    the median makes it robust to a burst that spoils one half of a few rounds. Resampling
    rounds, not single runs, carries the differences between runs of separate ``sdwb bench``
    invocations into the interval.
    """
    if len(baseline) != len(candidate):
        raise SdwbError(f"paired rounds: {len(baseline)} baseline and {len(candidate)} candidate rounds")
    if len(baseline) < 2:
        raise SdwbError(f"paired rounds: need at least 2 rounds, got {len(baseline)}")
    logs = []
    for a, b in zip(baseline, candidate):
        a, b = np.asarray(a, float), np.asarray(b, float)
        if not len(a) or not len(b) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) \
                or np.any(a <= 0) or np.any(b <= 0):
            raise SdwbError("paired rounds: every round needs finite, positive timings on both sides")
        logs.append(np.log(np.median(b) / np.median(a)))
    logs = np.asarray(logs)
    rng = np.random.default_rng(seed)
    boot = np.median(logs[rng.integers(0, len(logs), (resamples, len(logs)))], axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(np.exp(np.median(logs))), float(np.exp(lo)), float(np.exp(hi))


def cpu_signature(env: dict | None) -> dict[str, Any] | None:
    """What must match for two timings to be comparable: CPU model, its vector/matrix flags and the
    thread count (None when a results file does not record them)."""
    if not env or not env.get("cpu") or env.get("cpu_flags") is None:
        return None
    return {"cpu": env["cpu"], "flags": sorted(env["cpu_flags"]), "threads": env.get("torch_threads")}


def cpu_mismatch(base_env: dict | None, cand_env: dict | None) -> str | None:
    """None when both were timed on the same kind of CPU, else why not (for "not comparable")."""
    a, b = cpu_signature(base_env), cpu_signature(cand_env)
    if a is None or b is None:
        which = "baseline" if a is None else "candidate"
        return f"the {which} does not record its CPU model and flags"
    if a["cpu"] != b["cpu"]:
        return f"CPU differs: {a['cpu']} vs {b['cpu']}"
    if a["flags"] != b["flags"]:
        only_a = sorted(set(a["flags"]) - set(b["flags"]))
        only_b = sorted(set(b["flags"]) - set(a["flags"]))
        parts = ([f"baseline only {' '.join(only_a)}"] if only_a else []) + (
            [f"candidate only {' '.join(only_b)}"] if only_b else [])
        return f"CPU differs: flags {'; '.join(parts)}"
    if a["threads"] != b["threads"]:
        return f"threads differ: {a['threads']} vs {b['threads']}"
    return None


def describe_side(label: str, env: dict | None) -> str:
    """One context line naming where a side was measured: revision, CPU, flags, threads."""
    env = env or {}
    flags = " ".join(env.get("cpu_flags") or []) or "not recorded"
    return (f"{label}: git {env.get('git_revision') or 'unknown'}, CPU {env.get('cpu') or 'not recorded'} "
            f"(flags: {flags}), {env.get('torch_threads') or '?'} threads, measured "
            f"{env.get('timestamp_utc') or 'at an unrecorded time'}")


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
    detail = (
        f"median {np.median(base):.4g} -> {np.median(cand):.4g} {unit}; {len(base)} vs {len(cand)} runs, "
        f"{stats.confidence:.0%} bootstrap interval of the ratio"
    )
    return _ratio_check(metric, (ratio, lo, hi), pct, float(np.median(base)), float(np.median(cand)), detail,
                        stats.rule)


def _ratio_check(
    metric: str, interval: tuple[float, float, float], pct: float, base: float, cand: float, detail: str,
    rule: str = "interval-above-limit",
) -> Check:
    """Decide a latency ratio by ``statistics.rule``: a regression when the whole interval lies above
    ``1 + pct`` ("interval-above-limit": slower than allowed, significantly), or when it lies above 1
    and the estimate above ``1 + pct`` ("significant-and-above-limit": significantly slower, and by
    more than allowed; asv's rule, more power for the same runs). Anything else whose interval
    reaches past the limit is "inconclusive" (passes)."""
    ratio, lo, hi = interval
    bound = 1 + pct / 100
    if rule == "significant-and-above-limit":
        regression = lo > 1 and ratio > bound
    else:
        regression = lo > bound
    status: Status = "regression" if regression else "inconclusive" if hi > bound else "pass"
    return Check(metric, status, base, cand, _change_text(interval), f"+{pct:g} %", detail)


def _change_text(interval: tuple[float, float, float]) -> str:
    """``+12.3 % [+8.1, +16.0]``: a ratio and its interval as a change in per cent."""
    ratio, lo, hi = interval
    return f"{(ratio - 1) * 100:+.1f} % [{(lo - 1) * 100:+.1f}, {(hi - 1) * 100:+.1f}]"


def rounds_latency_checks(
    base_rounds: dict[str, list[list[float]]], cand_rounds: dict[str, list[list[float]]], config: GateConfig
) -> list[Check]:
    """End-to-end and UNet-call latency of ``--ab-rev`` rounds (``{"e2e_s": [[runs of round 0],
    ...], "unet_ms": ...}`` per side), decided on :func:`paired_rounds_ratio`."""
    t, stats = config.thresholds, config.statistics
    checks = []
    for key, metric, pct, unit in (("e2e_s", "latency (s/image)", t.latency_pct, "s/image"),
                                   ("unet_ms", "UNet call (ms)", t.unet_latency_pct, "ms")):
        if pct is None:
            checks.append(Check(metric, "skipped", None, None, "", "not gated", "no threshold set"))
            continue
        base, cand = base_rounds.get(key, []), cand_rounds.get(key, [])
        if min(len(base), len(cand)) < stats.min_rounds:
            raise SdwbError(f"{metric}: {len(base)} baseline and {len(cand)} candidate rounds; the gate "
                            f"needs at least {stats.min_rounds} (statistics.min_rounds)")
        interval = paired_rounds_ratio(base, cand, confidence=stats.confidence,
                                       resamples=stats.resamples, seed=stats.seed)
        med_b = float(np.median([np.median(r) for r in base]))
        med_c = float(np.median([np.median(r) for r in cand]))
        runs = sum(map(len, base))
        detail = (f"median of round medians {med_b:.4g} -> {med_c:.4g} {unit}; {len(base)} rounds of "
                  f"one `sdwb bench` per side ({runs} timed runs per side), {stats.confidence:.0%} "
                  f"bootstrap interval of the median paired ratio")
        checks.append(_ratio_check(metric, interval, pct, med_b, med_c, detail, stats.rule))
    return checks


def _reported_only(metric: str, base: list[float], cand: list[float], stats: Statistics) -> Check:
    """A latency ratio shown with its interval but not judged (``file_latency_pct: null``)."""
    if len(base) < 2 or len(cand) < 2:
        return Check(metric, "skipped", None, None, "", "not gated", "no per-run samples in one of the files")
    interval = bootstrap_ratio(base, cand, confidence=stats.confidence, resamples=stats.resamples,
                               seed=stats.seed)
    return Check(metric, "skipped", float(np.median(base)), float(np.median(cand)), _change_text(interval),
                 "not gated",
                 "reported only (file_latency_pct: null): same CPU, but timed at another time")


def file_latency_checks(
    base_samples: dict, cand_samples: dict, config: GateConfig, mismatch: str | None, *, prefix: str = ""
) -> list[Check]:
    """Latency against a saved results file: judged (with ``file_latency_pct``) only when both
    were timed on the same CPU model, flags and threads; otherwise "not comparable", not judged."""
    t = config.thresholds
    names = [f"latency{prefix} (s/image)", f"UNet call{prefix} (ms)"]
    if mismatch is not None:
        return [Check(name, "skipped", None, None, "", "not judged", f"not comparable ({mismatch})")
                for name in names]
    if t.file_latency_pct is None:  # reported for the reader, never decided on
        return [_reported_only(name, base_samples.get(key, []), cand_samples.get(key, []), config.statistics)
                for name, key in zip(names, ("e2e_s", "unet_ms"))]
    unet_pct = t.file_latency_pct if t.unet_latency_pct is not None else None
    return [
        _latency_check(names[0], base_samples.get("e2e_s", []), cand_samples.get("e2e_s", []),
                       t.file_latency_pct, config.statistics, "s/image"),
        _latency_check(names[1], base_samples.get("unet_ms", []), cand_samples.get("unet_ms", []),
                       unet_pct, config.statistics, "ms"),
    ]


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
    """Every metric's check of a candidate row against a baseline row measured in one run
    (``--ab``): latency from the per-run samples, then :func:`row_checks`."""
    t, stats = config.thresholds, config.statistics
    return [
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
    ] + row_checks(base_row, cand_row, config)


MEMORY_KEYS = (("peak_rss_mb", "peak RSS"), ("cuda_peak_mb", "CUDA peak"))


def memory_checks(base: dict, cand: dict, config: GateConfig, *, mismatch: str | None = None,
                  suffix: str = "") -> list[Check]:
    """Peak RSS / CUDA peak, higher is worse by more than ``memory_pct``. Judged only between
    measurements of the same kind of CPU: a process's peak RSS depends on the kernels its CPU
    gets (oneDNN/AMX buffers, ISA code paths: 440 MB on an AMD EPYC, 505 MB on a Sapphire Rapids for
    the same code), so across CPUs it is "not comparable" (``mismatch``), like latency."""
    checks = []
    for key, name in MEMORY_KEYS:
        b, c = _num(base, key), _num(cand, key)
        if b is None and c is None:
            continue
        metric = f"{name}{suffix} (MB)"
        if mismatch is not None:
            checks.append(Check(metric, "skipped", b, c, "", "not judged", f"not comparable ({mismatch})"))
        else:
            checks.append(_higher_is_worse(metric, b, c, config.thresholds.memory_pct))
    return checks


def row_checks(base_row: dict, cand_row: dict, config: GateConfig, *, memory_mismatch: str | None = None,
               memory_suffix: str = "") -> list[Check]:
    """Memory (see :func:`memory_checks`), CLIP score and accuracies: one number per variant;
    quality is comparable across machines (fixed prompts and seeds)."""
    t = config.thresholds
    checks: list[Check] = memory_checks(base_row, cand_row, config, mismatch=memory_mismatch,
                                        suffix=memory_suffix)
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
    (read by :mod:`bench.results`; partial results, ``"complete": false``, are refused)."""
    from bench.gate_inputs import check_complete
    from bench.results import RESULTS_JSON, _read_json, _results_file

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    data = _read_json(_results_file(path))
    if not data["rows"]:
        raise SdwbError(f"{path}: not a results file (expected an object with a non-empty 'rows' list)")
    check_complete(data, str(path))
    return data


def pick_row(data: dict, variant: str | None, source: str) -> tuple[dict, dict]:
    """``(row, samples)`` of ``variant`` (default: the only row, else an error listing them)."""
    rows = {r.get("variant"): r for r in data["rows"]}
    names = [r.get("variant") for r in data["rows"]]
    if variant is None:
        if len(rows) != 1:
            raise SdwbError(
                f"{source}: {len(rows)} variants ({', '.join(map(str, rows))}); pick one with --variant"
            )
        variant = next(iter(rows))
    if variant not in rows:
        raise SdwbError(f"{source}: no variant {variant!r} (has: {', '.join(map(str, rows))})")
    if names.count(variant) > 1:
        raise SdwbError(f"{source}: {names.count(variant)} rows of variant {variant!r} (a sweep); the gate "
                        "compares one row each: bench one scenario")
    samples = (data.get("samples") or {}).get(variant) or {}
    if not isinstance(samples, dict) or not all(isinstance(v, list) for v in samples.values()):
        raise SdwbError(f"{source}: samples.{variant}: expected an object of per-run lists (e2e_s, unet_ms)")
    return rows[variant], samples


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


def write_json(path: str | Path, checks: list[Check], outcome: str, context: list[str], extra: dict) -> Path:
    """The decision as data: outcome, every check, the context lines and ``extra`` (config, sides)."""
    import json
    from dataclasses import asdict

    from sdwb.runs import atomic_write_text

    data = {"outcome": outcome, "checks": [asdict(c) for c in checks], "context": context, **extra}
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def summary_line(checks: list[Check], outcome: str) -> str:
    """One line for the terminal: the outcome, each gated metric's change, and each latency that
    was not comparable (so a skipped latency check is never silent)."""
    parts = [f"{c.metric} {c.change} ({c.status})" if c.status != "skipped" else
             f"{c.metric} {c.change} (not gated)" if c.change else f"{c.metric}: {c.detail}"
             for c in checks if c.status != "skipped" or c.change or c.detail.startswith("not comparable")]
    return f"gate {'REGRESSION' if outcome == 'regression' else 'passed'}: " + "; ".join(parts)


def ab_bench_config(
    baseline: str, candidate: str, measure: Measure, *, inject_slowdown: float = 0.0, name: str = "gate-ab"
) -> Any:
    """The two-variant ``BenchConfig`` that ``sdwb gate --ab`` runs (interleaved A B A B ...)."""
    from bench.scenario import BenchConfig

    settings = measure.model_dump(exclude={"model", "rounds", "processes"})  # those are --ab-rev's
    defaults: dict[str, Any] = {k: v for k, v in settings.items() if v is not None}
    variants = [{"name": "baseline", "model": baseline}, {"name": "candidate", "model": candidate}]
    if inject_slowdown:
        variants[1]["unet_slowdown"] = float(inject_slowdown)
    try:
        return BenchConfig.model_validate(
            {"name": name, "defaults": defaults, "variants": variants, "baseline": "baseline"}
        )
    except ValidationError as e:
        raise SdwbError(f"gate --ab: {e.errors(include_url=False)[0]['msg']}") from None
