"""Render ``reports/baseline.md`` from a `sdwb baseline train` run (its eval.json and grid).

Why: the numbers in the report must be the ones a run measured, never typed in by hand. The
report states the quality bar of the baseline issue next to each measured value.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from sdwb.errors import SdwbError

BARS = {"color_acc": 0.90, "shape_acc": 0.85, "position_acc": 0.85}
JUDGE_BARS = {"color_acc": 0.98, "shape_acc": 0.98, "position_acc": 0.95}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_baseline_report(run: Path, out: Path) -> Path:
    """Write ``out/baseline.md`` and ``out/baseline-grid.png``; returns the markdown path."""
    summary_path = run / "eval.json"
    if not summary_path.is_file():
        raise SdwbError(f"{summary_path}: not found (run `sdwb baseline train --out {run}` first)")
    s = json.loads(summary_path.read_text())
    if "eval" not in s or "judge" not in s:
        raise SdwbError(f"{summary_path}: has no judge/eval results (the run was not evaluated)")
    out.mkdir(parents=True, exist_ok=True)
    if (run / "grid.png").exists():
        shutil.copyfile(run / "grid.png", out / "baseline-grid.png")
    e, j, t = s["eval"], s["judge"], s["timings_s"]
    lines = [
        "# Baseline: `builtin:tiny-shapes` and `builtin:shapes-judge`",
        "",
        "Both models are trained from scratch by this project on the procedural shapes data set and",
        "shipped in `sdwb/assets/`. Reproduce with:",
        "",
        "```bash",
        "sdwb baseline train --out runs/baseline-train --install",
        "sdwb baseline report --run runs/baseline-train -o reports",
        "```",
        "",
        f"Machine: {_cpu()}, {s.get('threads', '?')} torch threads, {s['config']['precision']} autocast.",
        "",
        "## Judge (`builtin:shapes-judge`): zero-shot accuracy on held-out data-set images",
        "",
        f"{j['images']} images drawn from evaluation-range seeds (disjoint from every training seed).",
        "",
        "| attribute | accuracy | bar |",
        "| --- | --- | --- |",
    ]
    for k, bar in JUDGE_BARS.items():
        lines.append(
            f"| {k.removesuffix('_acc')} | {_pct(j[k])} | ≥ {_pct(bar)} {'✓' if j[k] >= bar else '✗'} |"
        )
    lines += [
        "",
        f"## tiny-shapes: DDIM {e['steps']} steps, guidance {e['guidance']}, {e['prompts']} held-out prompts",
        "",
        "Every image is scored by the judge (zero-shot attributes) against the prompt's attributes;",
        "intervals are 95% bootstrap intervals over prompts.",
        "",
        "| metric | value | 95% interval | bar |",
        "| --- | --- | --- | --- |",
    ]
    for k, bar in BARS.items():
        ok = "✓" if e[k] >= bar else "✗"
        lines.append(
            f"| {k.removesuffix('_acc')} accuracy | {_pct(e[k])} | "
            f"{_pct(e[k + '_lo'])} – {_pct(e[k + '_hi'])} | ≥ {_pct(bar)} {ok} |"
        )
    for k in ("size_acc", "background_acc"):
        if k in e:
            lines.append(
                f"| {k.removesuffix('_acc')} accuracy | {_pct(e[k])} | "
                f"{_pct(e[k + '_lo'])} – {_pct(e[k + '_hi'])} | — |"
            )
    lines += [
        f"| CLIP score (judge) | {e['clip_score']:.2f} | "
        f"{e['clip_score_lo']:.2f} – {e['clip_score_hi']:.2f} | — |",
        f"| CLIP score of the data-set images | {e['clip_score_dataset_images']:.2f} | | reference |",
        "",
        f"Generation took {e['generation_s_per_image']:.3f} s per image during the evaluation (batched).",
        "",
        "![tiny-shapes samples](baseline-grid.png)",
        "",
        "## Training time on this machine",
        "",
        "| stage | seconds |",
        "| --- | --- |",
    ]
    for k in ("judge", "vae", "unet_text_encoder", "eval"):
        if k in t:
            lines.append(f"| {k} | {t[k]:.0f} |")
    total = t.get("total_train", 0)
    lines += [
        f"| **total training** | **{total:.0f}** ({total / 60:.1f} min) |",
        "",
        "VAE: " + ", ".join(f"{k} {v}" for k, v in s.get("vae", {}).items()),
        "",
    ]
    if s.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in s["notes"]], ""]
    path = out / "baseline.md"
    path.write_text("\n".join(lines))
    return path
