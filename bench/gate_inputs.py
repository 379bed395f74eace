"""What the gate refuses before it decides anything: it fails closed, never open.

Why: a gate that skips what it was not given passes what it never measured. A candidate from
``sdwb bench --metrics memory`` used to pass (latency and quality "not measured in both"); a
candidate at 2 steps / guidance 1 / 4 prompts was compared with a baseline at 10 / 7.5 / 108
and its quality check claimed "same prompts and seeds"; a partial results file was accepted.
Each refusal here is an :class:`SdwbError` (exit 2 from ``sdwb gate``) naming what differed or
what is missing:

- :func:`check_complete`: a results file written by an unfinished benchmark (``"complete":
  false``, ``results.partial.json``) is refused.
- :func:`check_measured`: every metric the gate config asks for (a threshold that is not null:
  ``file_latency_pct`` and ``unet_latency_pct`` -> per-run samples, ``memory_pct`` -> peak memory,
  ``clip_drop`` -> CLIP score, ``accuracy_drop`` -> colour / shape / position accuracy) must be in
  both rows. Set a threshold to null to not gate a metric that does not apply.
- :func:`check_same_scenario`: the two rows must describe one scenario -- model identity, prompt
  set and count, seed, steps, guidance, scheduler, batch, size, backend, dtype, device, threads
  -- and, where both files record their prompts, the same prompt texts.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from sdwb.errors import SdwbError

SCENARIO_KEYS = ("model", "prompts", "n_prompts", "seed", "steps", "guidance", "scheduler", "batch",
                 "height", "width", "backend", "dtype", "device", "threads")
IDENTITY_KEYS = ("model_fingerprint", "model_sha256", "model_identity")  # content hashes, when recorded
ACCURACY_KEYS = ("color_acc", "shape_acc", "position_acc")


def check_complete(data: dict, source: str) -> None:
    """Refuse the results of a benchmark that did not finish."""
    if data.get("complete") is False:
        raise SdwbError(f"{source}: partial results (\"complete\": false: the benchmark did not finish); "
                        "the gate compares only complete results")


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def required_metrics(thresholds, *, latency: str, measured: list[str] | None = None) -> dict[str, str]:
    """``{what: why}`` the config asks for. ``latency``: the threshold that judges per-run latency
    samples of these rows (``file_latency_pct`` for the ``--baseline/--candidate`` files,
    ``latency_pct`` for ``--ab``). ``measured``: the ``--ab`` form's ``measure.metrics`` (a metric
    it does not measure is not asked of it)."""
    t = thresholds
    want = (lambda m: True) if measured is None else (lambda m: m in measured)
    need: dict[str, str] = {}
    if want("latency") and getattr(t, latency) is not None:
        need["samples:e2e_s"] = f"thresholds.{latency}"
        if t.unet_latency_pct is not None:
            need["samples:unet_ms"] = "thresholds.unet_latency_pct"
    if want("memory") and t.memory_pct is not None:
        need["peak_rss_mb|cuda_peak_mb"] = "thresholds.memory_pct"
    if want("quality") and t.clip_drop is not None:
        need["clip_score"] = "thresholds.clip_drop"
    if want("quality") and t.accuracy_drop is not None:
        for key in ACCURACY_KEYS:
            need[key] = "thresholds.accuracy_drop"
    return need


def check_measured(need: dict[str, str], row: dict, samples: dict, side: str) -> None:
    """Refuse a side (``"baseline FILE"``) that lacks a metric in ``need``, naming it and the threshold."""
    for what, why in need.items():
        if what.startswith("samples:"):
            key = what.removeprefix("samples:")
            runs = samples.get(key) if isinstance(samples, dict) else None
            ok = isinstance(runs, list) and len(runs) > 0
            label = f"per-run latency samples ({key})"
        else:
            ok = any(_present(row, k) for k in what.split("|"))
            label = " or ".join(what.split("|"))
        if not ok:
            raise SdwbError(f"{side}: {label} not measured, but the gate config asks for it ({why}); "
                            f"re-run sdwb bench with that metric, or set {why}: null to not gate it")


def _digest(items: list) -> str:
    return hashlib.sha256(json.dumps(items, ensure_ascii=True).encode()).hexdigest()[:12]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_same_scenario(base_row: dict, cand_row: dict, base_data: dict, cand_data: dict, *,
                        allow_model_change: bool = False) -> list[str]:
    """Refuse two rows of different scenarios (the first difference named, with every other one);
    returns context notes (a model change that ``allow_model_change`` accepts)."""
    notes: list[str] = []
    diffs = []
    model_differs = False
    for key in SCENARIO_KEYS + IDENTITY_KEYS:
        a, b = base_row.get(key), cand_row.get(key)
        if key in IDENTITY_KEYS and (a is None or b is None):
            continue  # compared only where both files record a content hash
        if not _same(a, b):
            if key == "model" or key in IDENTITY_KEYS:
                model_differs = True
                if allow_model_change:
                    notes.append(f"model differs, allowed by --allow-model-change: {key} {a!r} vs {b!r}")
                    continue
            diffs.append(f"{key} {a!r} vs {b!r}")
    prompts_a, prompts_b = base_data.get("prompts"), cand_data.get("prompts")
    if isinstance(prompts_a, list) and isinstance(prompts_b, list) and prompts_a and prompts_b:
        n = min(len(prompts_a), len(prompts_b))
        if prompts_a[:n] != prompts_b[:n] or len(prompts_a) != len(prompts_b):
            diffs.append(f"prompt texts {len(prompts_a)} (sha {_digest(prompts_a)}) vs {len(prompts_b)} "
                         f"(sha {_digest(prompts_b)})")
    if diffs:
        raise SdwbError("baseline and candidate measured different scenarios (baseline vs candidate): "
                        + "; ".join(diffs) + " -- re-run the candidate with the baseline's settings"
                        + (" (--allow-model-change compares two different models on one scenario)"
                           if model_differs and not allow_model_change else ""))
    return notes
