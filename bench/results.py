"""The results table: one row per variant x scenario, saved as CSV + JSON with the environment.

Why a fixed column order: reports, CI gates and people diff these files; ``REQUIRED_COLUMNS``
come first in the documented order, extras after. A metric that was not measured or does not
apply (quality of ``sd15-arch``, CUDA peak on a CPU run) is empty in the CSV and ``null`` in the
JSON, never 0. Writes are atomic, and an unfinished run writes ``results.partial.*`` instead, so
an interrupted benchmark neither looks complete nor replaces the results of an earlier one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from sdwb.errors import SdwbError

REQUIRED_COLUMNS = (
    "variant", "model", "backend", "dtype", "steps", "guidance", "batch",
    "e2e_s_median", "e2e_s_p10", "e2e_s_p90", "images_per_s",
    "text_encoder_ms", "unet_ms_per_call", "unet_calls", "vae_decode_ms",
    "peak_rss_mb", "cuda_peak_mb", "size_mb", "params_m", "unet_gmacs",
    "clip_score", "clip_score_lo", "clip_score_hi", "cmmd", "psnr_vs_baseline", "ssim_vs_baseline",
    "color_acc", "shape_acc", "position_acc",
)
EXTRA_COLUMNS = (
    "scenario", "base_variant", "baseline", "device", "threads", "scheduler", "height", "width",
    "prompts", "n_prompts", "seed", "warmup", "repeats", "timed_runs", "judge",
    "unet_batch", "text_encoder_calls", "vae_decode_calls", "unet_params_m",
    "unet_shallow_calls", "unet_shallow_ms_per_call",
    "color_acc_lo", "color_acc_hi", "shape_acc_lo", "shape_acc_hi", "position_acc_lo", "position_acc_hi",
    "quality_note", "method", "precision", "weights_dtype",
    "edit_success", "edit_success_lo", "edit_success_hi", "edit_success_color", "edit_success_shape",
    "edit_success_position", "edit_success_inpaint", "preserve_psnr", "n_edits", "edit_strength",
    "s_per_edit", "s_per_edit_lo", "s_per_edit_hi",
)
COLUMNS = REQUIRED_COLUMNS + EXTRA_COLUMNS
RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"
PARTIAL_CSV, PARTIAL_JSON = "results.partial.csv", "results.partial.json"
LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics", "torch_pruning", "numpy", "pandas",
             "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "torchao", "tomesd", "peft",
             "tensorrt", "pydantic")


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with every known column in order (missing ones empty), unknown ones last."""
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in COLUMNS]
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df[list(COLUMNS) + extra]


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def git_revision(root: Path | None = None) -> str | None:
    """``HEAD``'s short hash of the repository at ``root`` (default: this checkout), ``-dirty`` when
    tracked files differ from it; None outside a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def git_diff_sha256(root: Path | None = None) -> str | None:
    """sha256 of ``git diff HEAD`` (tracked files) when the checkout is dirty, else None: a ``-dirty``
    revision then still names the exact code that ran (two runs with the same digest ran the same)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if diff.returncode != 0 or not diff.stdout:
        return None
    import hashlib

    return hashlib.sha256(diff.stdout).hexdigest()


def _version(name: str) -> str | None:
    from importlib import metadata

    dist = {"torch_pruning": "torch-pruning"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, threads, GPU, versions, git revision.

    Deliberately without the host name or user: results files are committed and shared.
    """
    import torch

    from sdwb import __version__
    from sdwb.threads import applied as applied_threads

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {
        "sdwb": __version__,
        "git_revision": git_revision(),
        "git_diff_sha256": git_diff_sha256(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "memory_gb": _memory_gb(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "thread_choice": applied_threads(),
        "gpu": gpu,
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


# --------------------------------------------------------------------------- saving / loading


def _clean(value: Any) -> Any:
    """JSON-able scalar: NaN/None -> None, numpy scalars -> Python; +-inf kept (PSNR of equal images)."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as plain dicts with empty metrics as None."""
    return [{k: _clean(v) for k, v in row.items()} for row in df.astype(object).to_dict("records")]


def save_results(df: pd.DataFrame, env: dict, out_dir: str | Path, images_index: dict[str, list[str]],
                 *, config: dict | None = None, command: str | None = None,
                 prompts: list[str] | None = None, partial: bool = False,
                 samples: dict[str, dict[str, list[float]]] | None = None) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` into ``out_dir`` atomically; returns their paths.

    ``images_index`` maps a variant to its image paths relative to ``out_dir``; ``prompts`` are
    the prompts of those images, in order (image i of every variant has prompt i). ``samples``
    holds each variant's per-run measurements (``e2e_s``: seconds per image of every timed run,
    ``unet_ms``: mean UNet call of every run), what ``sdwb gate`` bootstraps. ``partial``
    writes ``results.partial.*`` (``"complete": false``) and leaves earlier results alone; a
    complete save removes the partial files.
    """
    from sdwb.runs import atomic_write_text

    out = Path(out_dir)
    csv_name, json_name = (PARTIAL_CSV, PARTIAL_JSON) if partial else (RESULTS_CSV, RESULTS_JSON)
    df = results_frame(frame_records(df)) if len(df) else results_frame([])
    payload = {
        "complete": not partial,
        "environment": env,
        "command": command,
        "config": config,
        "rows": frame_records(df),
        "prompts": prompts or [],
        "images": images_index,
        "samples": samples or {},
    }
    csv_path = atomic_write_text(out / csv_name, df.to_csv(index=False))
    json_path = atomic_write_text(out / json_name, json.dumps(payload, indent=2, default=str) + "\n")
    if not partial:
        for name in (PARTIAL_CSV, PARTIAL_JSON):
            (out / name).unlink(missing_ok=True)
    return csv_path, json_path


def _results_file(path: Path) -> Path:
    if path.is_dir():
        for name in (RESULTS_JSON, PARTIAL_JSON):
            if (path / name).is_file():
                return path / name
        raise SdwbError(f"{path}: no {RESULTS_JSON} in this directory")
    if not path.is_file():
        raise SdwbError(f"{path}: results file not found (expected a results.json written by sdwb bench)")
    return path


def load_results(paths) -> tuple[pd.DataFrame, list[dict]]:
    """Read one or more ``results.json`` (or directories holding one) into one DataFrame.

    Adds ``source`` (the file each row came from) and ``env_index`` (its position in the
    returned list of environments). Image paths stay in each file's ``images`` (relative to it);
    :func:`images_index` resolves them.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames, envs = [], []
    for i, raw in enumerate(paths):
        path = _results_file(Path(raw))
        data = _read_json(path)
        frame = results_frame(data["rows"])
        frame["source"] = str(path)
        frame["env_index"] = i
        frames.append(frame)
        envs.append(data.get("environment") or {})
    if not frames:
        raise SdwbError("no results file given")
    merged = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return results_frame(frame_records(merged)), envs


def images_index(path) -> dict[str, list[Path]]:
    """``{variant: [absolute image paths]}`` of one results file (or its directory)."""
    path = _results_file(Path(path))
    data = _read_json(path)
    return {v: [path.parent / p for p in files] for v, files in (data.get("images") or {}).items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SdwbError(f"{path}: cannot read results: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise SdwbError(f"{path}: not a results file (expected an object with a 'rows' list)")
    bad = next((i for i, row in enumerate(data["rows"]) if not isinstance(row, dict)), None)
    if bad is not None:
        raise SdwbError(f"{path}: rows[{bad}] is {type(data['rows'][bad]).__name__}, expected an object "
                        "(one row per variant, as sdwb bench writes them)")
    for key, kind, what in (("samples", dict, "map each variant to its per-run lists"),
                            ("images", dict, "map each variant to a list of image paths"),
                            ("prompts", list, "be a list"), ("environment", dict, "be an object")):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise SdwbError(f"{path}: '{key}' must {what}")
    return data


def python_command() -> str:
    """The command line of this process, for the record (``sdwb bench ...``)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("sdwb", "__main__.py")):
        argv[0] = "sdwb"
    return " ".join(argv)
