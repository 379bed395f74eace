"""What a LoRA keeps through each compression: the table of ``reports/lora-cpu/``.

Every variant generates the same LoRA-domain prompts (:mod:`sdwb.shapes_lora`: rings, a shape the
base model never saw) with the same seeds, without and with the adapter. The adapter reaches a
variant by the route its compression allows:

- ``runtime``: loaded unfused when the variant loads (torch float, pruned -- projected onto the
  kept channels --, step-distilled: the teacher's LoRA on the student);
- ``fused``: a separate variant made from ``sdwb lora fuse`` of the variant's float parent, then the
  same compression (int8 quantization, ONNX export): ``--variant NAME=SPEC,fused=SPEC_WITH_LORA``.

Columns per (variant, with/without LoRA): ring accuracy (read from the pixels,
:func:`sdwb.shapes_lora.is_ring`), colour / position accuracy and CLIP score (the judge), PSNR
against float+LoRA, and "LoRA effect retained"
``1 - d(variant+LoRA, float+LoRA) / d(variant, float+LoRA)`` (d: mean squared pixel error over the
prompts), each with a 95 % bootstrap interval over prompts (the ratio resampled as a ratio).

    python -m tools.lora_table --out reports/lora-cpu --lora builtin:tiny-shapes-lora-ring \\
        --variant float=builtin:tiny-shapes \\
        --variant int8-torch=runs/lora/int8-torch,fused=runs/lora/int8-torch-lora ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BOOT = 1000


def _interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    from sdwb.judge import bootstrap_interval

    return bootstrap_interval(values, n_resamples=BOOT, seed=seed)


def _retained(d_with: np.ndarray, d_without: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """1 - mean(d_with) / mean(d_without), with the prompts resampled together."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d_with), size=(BOOT, len(d_with)))
    point = 1 - d_with.mean() / d_without.mean()
    boots = 1 - d_with[idx].mean(1) / d_without[idx].mean(1)
    return float(point), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _images(spec: str, prompts: list[str], *, lora: str | None, steps: int | None, guidance: float | None,
            seed: int, batch: int) -> tuple[list, dict]:
    """PIL images of ``spec`` (torch or an export) and what ran: backend, steps, guidance, seconds."""
    from sdwb.backends.registry import backend_for, open_exported
    from sdwb.generate import generate
    from sdwb.inference import resolve
    from sdwb.loading import load_pipeline

    backend = backend_for(spec)
    if backend == "torch":
        pipe = load_pipeline(spec, lora=lora)
    else:
        if lora is not None:
            raise SystemExit(f"{spec}: an export cannot load a LoRA at run time; give its fused= variant")
        pipe = open_exported(backend, spec)
    chosen = resolve(pipe, steps=steps, guidance=guidance, scheduler=None)
    started = time.perf_counter()
    images = generate(pipe, prompts, steps=chosen["steps"], guidance=chosen["guidance"], seed=seed,
                      batch=batch, progress=False)
    info = {"backend": backend, "steps": chosen["steps"], "guidance": chosen["guidance"],
            "scheduler": chosen["scheduler"], "seconds": round(time.perf_counter() - started, 2),
            "lora": getattr(pipe, "sdwb_lora", None)}
    return images, info


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images])


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def _parse_variant(text: str) -> dict:
    name, _, rest = text.partition("=")
    parts = rest.split(",")
    row = {"name": name, "model": parts[0], "fused": None, "steps": None, "guidance": None}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key not in ("fused", "steps", "guidance"):
            raise SystemExit(f"--variant {text}: unknown key {key} (fused=, steps=, guidance=)")
        row[key] = value if key == "fused" else (int(value) if key == "steps" else float(value))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lora", default="builtin:tiny-shapes-lora-ring")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=SPEC[,fused=SPEC_WITH_LORA][,steps=N][,guidance=G]; the first is the "
                             "float reference")
    parser.add_argument("--prompts", type=int, default=180,
                        help="rings: 90 = every colour x position x background once")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of rows that do not set their own")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=8, help="prompts shown in grid.png")
    args = parser.parse_args(argv)

    from bench.results import environment, git_revision
    from sdwb import shapes_lora
    from sdwb.judge import load_judge
    from sdwb.lora import read_adapter

    variants = [_parse_variant(v) for v in args.variant]
    samples = shapes_lora.eval_samples(args.prompts)
    prompts = [s.caption for s in samples]
    expected = [s.attributes for s in samples]
    judge = load_judge()
    adapter = read_adapter(args.lora)
    generated: dict[tuple[str, bool], tuple[list, dict]] = {}
    for v in variants:
        for with_lora in (False, True):
            spec = v["fused"] if (with_lora and v["fused"]) else v["model"]
            lora = args.lora if (with_lora and not v["fused"]) else None
            own = _is_distilled(spec)  # a distilled variant samples with its own steps and guidance
            steps = v["steps"] or (None if own else args.steps)
            guidance = v["guidance"] if v["guidance"] is not None else (None if own else args.guidance)
            print(f"{v['name']} {'+ LoRA' if with_lora else ''}: {spec}", flush=True)
            images, info = _images(spec, prompts, lora=lora, steps=steps, guidance=guidance, seed=args.seed,
                                   batch=args.batch)
            info["route"] = ("fused" if v["fused"] else "runtime") if with_lora else None
            info["spec"] = spec
            generated[(v["name"], with_lora)] = (images, info)

    reference = _pixels(generated[(variants[0]["name"], True)][0])
    rows = []
    for v in variants:
        d_without = ((_pixels(generated[(v["name"], False)][0]) - reference) ** 2).mean(axis=(1, 2, 3))
        for with_lora in (False, True):
            images, info = generated[(v["name"], with_lora)]
            pix = _pixels(images)
            ring = shapes_lora.ring_hits(images, samples).astype(float)
            judged = judge.classify(images, expected)
            clip = judge.clip_scores(images, prompts)
            row = {"variant": v["name"], "with_lora": with_lora, **info}
            for key, values in {"ring_acc": ring, "color_acc": judged.correct["color"].astype(float),
                                "position_acc": judged.correct["position"].astype(float),
                                "clip_score": clip}.items():
                row[key], row[key + "_lo"], row[key + "_hi"] = _interval(np.asarray(values, dtype=float))
            psnr = _psnr(pix, reference)
            finite = np.isfinite(psnr) & (psnr < 100)
            row["psnr_vs_float_lora"] = float(np.mean(np.minimum(psnr, 100)))
            row["psnr_identical_share"] = float(1 - finite.mean())
            if with_lora:
                d_with = ((pix - reference) ** 2).mean(axis=(1, 2, 3))
                if d_without.mean() > 0:
                    kept = _retained(d_with, d_without)
                    row["lora_retained"], row["lora_retained_lo"], row["lora_retained_hi"] = kept
            row["per_prompt"] = {"ring": ring.tolist(), "clip": [round(float(c), 3) for c in clip]}
            rows.append(row)
    from sdwb.loading import spec_digest

    args.out.mkdir(parents=True, exist_ok=True)
    model_hashes = {}
    for v in variants:
        for spec in filter(None, (v["model"], v["fused"])):
            model_hashes[spec] = spec_digest(spec)
    result = {
        "command": "python -m tools.lora_table " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_revision": git_revision(),
        "environment": environment(),
        "lora": adapter.describe(),
        "prompts": {"set": "sdwb.shapes_lora.eval_samples", "count": args.prompts, "seed": args.seed},
        "models": model_hashes,
        "judge": "builtin:shapes-judge",
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "table.md").write_text(markdown_table(result))
    _grid(generated, variants, prompts, args.grid, args.out / "grid.png")
    print(f"wrote {args.out}/results.json, table.md and grid.png")


def _cell(row: dict, key: str, scale: float = 100.0, digits: int = 1) -> str:
    if row.get(key) is None:
        return "–"
    lo, hi = row.get(key + "_lo"), row.get(key + "_hi")
    text = f"{row[key] * scale:.{digits}f}"
    return text + (f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]" if lo is not None else "")


def markdown_table(result: dict) -> str:
    """The results as one markdown table (what the README and report.md quote)."""
    env = result["environment"]
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
             if f in (env.get("cpu_flags") or [])]
    lines = [f"Adapter {result['lora']['spec']} (sha256 {result['lora']['sha256'][:16]}, rank "
             f"{result['lora']['rank']}); {result['prompts']['count']} ring prompts "
             f"(sdwb.shapes_lora.eval_samples), seed {result['prompts']['seed']}; "
             f"git {result['git_revision']}; {env.get('cpu')} ({', '.join(flags)}), "
             f"{env.get('torch_threads')} threads.", "",
             "| variant | LoRA route | steps / guidance | ring % [95% CI] | colour % | position % | "
             "CLIP score | PSNR vs float+LoRA dB | LoRA effect retained [95% CI] | s for all prompts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        route = row.get("route") or "none"
        psnr = "identical" if row["psnr_identical_share"] == 1 else f"{row['psnr_vs_float_lora']:.1f}"
        lines.append(" | ".join([
            f"| {row['variant']}", route, f"{row['steps']} / {row['guidance']:g}", _cell(row, "ring_acc"),
            _cell(row, "color_acc"), _cell(row, "position_acc"), _cell(row, "clip_score", 1.0, 2), psnr,
            _cell(row, "lora_retained", 1.0, 3) if row["with_lora"] else "–", f"{row['seconds']:.1f} |"]))
    return "\n".join(lines) + "\n"


def _is_distilled(spec: str) -> bool:
    from sdwb.inference import for_spec

    return bool(for_spec(spec))


def _grid(generated, variants, prompts, count: int, path: Path) -> None:
    from sdwb.generate import captioned_grid

    images, captions = [], []
    for k in range(count):
        for v in variants:
            for with_lora in (False, True):
                images.append(generated[(v["name"], with_lora)][0][k])
                captions.append(f"{v['name']}{' +LoRA' if with_lora else ''}\n{prompts[k][:40]}")
    captioned_grid(images, captions, columns=2 * len(variants)).save(path)


if __name__ == "__main__":
    main()
