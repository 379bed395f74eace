"""The tables of ``reports/engines-cpu/``: every engine's speed-up with its 95 % interval.

Reads what ``tools/engines_cpu.sh`` wrote (``tiny-2threads/`` and ``tiny-1thread/``: ``sdwb bench``
results with per-run samples; ``sd15-arch/``: :mod:`tools.engines_unet_bench`) and writes
``tables.md`` beside them. Speed-ups are the baseline's median over the engine's median, with
the percentile bootstrap of the gate (:func:`bench.gate.bootstrap_ratio`: each side's timed runs
resampled independently), end to end (s/image) and per UNet call, labelled as such. Quality
columns are the benchmark's own (judge accuracies with their intervals, CLIP score, PSNR against
the torch fp32 images on the same prompts and seeds)::

    python -m tools.engines_report reports/engines-cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _interval(base: list[float], cand: list[float]) -> str:
    from bench.gate import bootstrap_ratio

    if len(base) < 2 or len(cand) < 2:
        return "—"
    ratio, lo, hi = bootstrap_ratio(cand, base)  # median(base) / median(cand): a speed-up
    return f"{ratio:.2f}× [{lo:.2f}–{hi:.2f}]"


def _pct(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    text = f"{100 * value:.1f}"
    return text + (f" [{100 * lo:.0f}–{100 * hi:.0f}]" if lo is not None and hi is not None else "")


def _num(value, fmt: str) -> str:
    return "—" if value is None or value != value else format(value, fmt)


def tiny_table(path: Path, quality: bool) -> list[str]:
    """Markdown rows of one tiny-shapes bench run (``results.json``)."""
    data = json.loads((path / "results.json").read_text())
    rows, samples = data["rows"], data.get("samples", {})
    base = next(r for r in rows if r["variant"] == r.get("baseline", rows[0]["variant"]))
    b = samples.get(base["variant"], {})
    head = ["engine", "backend / precision", "s/image", "end-to-end speed-up", "UNet ms/call",
            "per-call speed-up", "compile s"]
    if quality:
        head += ["colour %", "shape %", "position %", "CLIP", "PSNR vs fp32 dB"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        s = samples.get(r["variant"], {})
        precision = r.get("providers") or r["dtype"]
        cells = [r["variant"], f"{r['backend']} {precision}" if r["backend"] != "torch" else
                 f"torch {r['dtype']}" + (" compiled" if r.get("compile") else ""),
                 _num(r.get("e2e_s_median"), ".3f"), _interval(b.get("e2e_s", []), s.get("e2e_s", [])),
                 _num(r.get("unet_ms_per_call"), ".2f"),
                 _interval(b.get("unet_ms", []), s.get("unet_ms", [])),
                 _num(r.get("compile_s"), ".1f")]
        if quality:
            psnr = r.get("psnr_vs_baseline")
            cells += [_pct(r, "color_acc"), _pct(r, "shape_acc"), _pct(r, "position_acc"),
                      _num(r.get("clip_score"), ".2f"),
                      "baseline" if r["variant"] == base["variant"] else
                      ("∞" if psnr is not None and psnr == float("inf") else _num(psnr, ".1f"))]
        out.append("| " + " | ".join(cells) + " |")
    env = data["environment"]
    out.append("")
    flags = ", ".join(f for f in env.get("cpu_flags", []) if "amx" in f or "vnni" in f or "bf16" in f)
    out.append(f"Measured {env.get('timestamp_utc')} at {env.get('git_revision')}, {env.get('cpu')} "
               f"({flags}), "
               f"{rows[0]['threads']} thread(s), {rows[0]['timed_runs'] if 'timed_runs' in rows[0] else '?'} "
               f"timed runs per engine.")
    return out


def sd15_table(path: Path) -> list[str]:
    data = json.loads((path / "results.json").read_text())
    head = ["engine", "what runs", "UNet s/call (median)", "speed-up per call [95 %]", "vs each fp32 run",
            "VAE decode s", "compile / warm-up s", "peak RSS GB"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in data["rows"]:
        if "error" in r:
            out.append(f"| {r['engine']} | {r['kind']} | failed: {' '.join(r['error'])} |" + " |" * 5)
            continue
        sp = r.get("speedup_vs_fp32", {})
        what = r["kind"] if r["backend"] == "torch" else f"{r['backend']} {r.get('graphs')} ({r['dtype']})"
        if r.get("unet_output_finite") is False:
            what += " — **outputs NaN/inf: not a result**"
        compile_s = r.get("compile_s") if r.get("compile_s") is not None else r.get("warmup_call_s")
        out.append("| " + " | ".join([
            r["engine"], what, f"{r['unet_median_s']:.2f}",
            f"{sp.get('median', 0):.2f}× [{sp.get('lo', 0):.2f}–{sp.get('hi', 0):.2f}]",
            " / ".join(f"{x:.2f}×" for x in sp.get("per_fp32_run", [])),
            f"{min(r['vae_decode_s']):.2f}", _num(compile_s, ".1f"), f"{r['peak_rss_mb'] / 1024:.1f}",
        ]) + " |")
    env = data["environment"]
    out.append("")
    out.append(f"Measured {env.get('timestamp_utc')} at {env.get('git_revision')}, {env.get('cpu')}, "
               f"{data['rows'][0].get('threads')} threads; {data['command']}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "reports/engines-cpu")
    lines = ["# Engine tables (generated by `python -m tools.engines_report`)", ""]
    for sub, title, quality in (("tiny-2threads", "tiny-shapes, 2 threads", True),
                                ("tiny-1thread", "tiny-shapes, 1 thread", False)):
        if (out / sub / "results.json").is_file():
            lines += [f"## {title} (DDIM 25, guidance 7.5, 90 prompts)", ""]
            lines += tiny_table(out / sub, quality) + [""]
    if (out / "sd15-arch" / "results.json").is_file():
        lines += ["## sd15-arch UNet per call (batch 2, 64×64 latent)", ""]
        lines += sd15_table(out / "sd15-arch") + [""]
    (out / "tables.md").write_text("\n".join(lines))
    print(f"wrote {out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
