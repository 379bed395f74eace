"""Channel pruning at full scale: ``builtin:sd15-arch`` (SD 1.5's UNet, random weights) at ratio 0.3.

Why: pruning was only ever measured on the tiny-shapes UNet (8 GroupNorm groups, widths 32-128).
SD 1.5's UNet has 32 groups over 320-1280 channels, 860 M parameters and real skip
concatenations; this script says what ``sdwb compress prune`` does to it -- MACs, parameters,
CPU latency, and whether the pruned UNet still exports to ONNX and matches PyTorch -- with
nothing downloaded. The weights are random: no quality claim is made or measurable here.

Run from the repository root (about 10 min on 2 cores with timing; 24 GB RAM is enough)::

    .venv/bin/python -m tools.prune_sd15_arch                 # everything
    .venv/bin/python -m tools.prune_sd15_arch --no-timing     # MACs, params, ONNX check only

Steps: (1) ``compress.prune.prune("builtin:sd15-arch", ratio 0.3, magnitude, no recovery)`` in
memory (the UNet MACs and parameters before/after come from :mod:`sdwb.macs`, as in every
variant's sdwb.json); (2) unless ``--no-timing``: the unpruned UNet is rebuilt with the same seed
and both are timed per UNet call, fp32, batch 2 (one image under classifier-free guidance),
64x64 latent, 77 tokens, interleaved (round i runs pruned then unpruned, round i+1 the other way
round, so drift hits both); per round the pruned/unpruned ratio; (3) unless ``--no-onnx``: the
pruned UNet goes through the project's exporter (:func:`export.onnx.export_onnx`, ``components
["unet"]``) into a temporary directory, which validates ONNX Runtime against PyTorch at two
shapes (max abs / rel error, atol = rtol = 1e-3) and is then deleted. Writes ``OUT/results.json``
and ``OUT/README.md`` (default ``reports/pruning-cpu/sd15-arch``). A part skipped with
``--no-timing`` / ``--no-onnx`` is carried over from an earlier ``results.json`` when that one
pruned to the same architecture (same parameter and MAC counts), and marked so.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "builtin:sd15-arch"
DEFAULT_OUT = Path("reports/pruning-cpu/sd15-arch")
BATCH, LATENT, TOKENS, CONTEXT = 2, 64, 77, 768


def _say(started: float):
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def prune_in_memory(ratio: float, say) -> tuple[object, dict, dict]:
    """(pruned pipeline, metrics of ``compress.prune``, resolved config) for sd15-arch at ``ratio``."""
    from compress.prune import prune
    from compress.prune_config import parse_prune_config, resolved

    config = parse_prune_config({"method": "channels", "ratio": ratio, "importance": "magnitude",
                                 "finetune": {"steps": 0}}, "tools.prune_sd15_arch")
    result = prune(MODEL, config, say=say)
    return result.pipeline, result.metrics, resolved(config)


def unpruned_unet():
    """SD 1.5's UNet with the weights ``builtin:sd15-arch`` has (seed 0; the UNet is drawn first)."""
    from diffusers import UNet2DConditionModel

    from sdwb.sd15 import sd15_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_configs()["unet"])
    return unet.eval().requires_grad_(False)


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def time_unets(unets: dict[str, torch.nn.Module], rounds: int, warmup: int, say) -> dict:
    """Seconds per UNet call of each model, interleaved, plus the per-round ratio pruned/unpruned."""
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(BATCH, 4, LATENT, LATENT, generator=gen),
              "timestep": torch.tensor(999),
              "encoder_hidden_states": torch.randn(BATCH, TOKENS, CONTEXT, generator=gen)}
    names = list(unets)
    times: dict[str, list[float]] = {n: [] for n in names}
    load_before = _loadavg()
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                unets[name](**inputs)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                out = unets[name](**inputs).sample
                times[name].append(time.perf_counter() - t0)
                if not torch.isfinite(out).all():
                    raise RuntimeError(f"{name}: non-finite UNet output")
            say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
    ratios = [p / u for p, u in zip(times["pruned"], times["unpruned"])]
    return {
        "batch": BATCH, "latent": [LATENT, LATENT], "tokens": TOKENS, "dtype": "float32",
        "threads": torch.get_num_threads(), "warmup": warmup, "rounds": rounds,
        "order": "interleaved, alternating which model runs first",
        "seconds": {n: [round(t, 4) for t in times[n]] for n in names},
        "median_s": {n: round(statistics.median(times[n]), 4) for n in names},
        "ratio_per_round": [round(x, 4) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "speedup_median": round(1 / statistics.median(ratios), 3),
        "loadavg_before": load_before, "loadavg_after": _loadavg(),
    }


def export_and_validate(pipe, say) -> dict:
    """The pruned UNet through ``export.onnx.export_onnx`` (temporary directory, deleted after)."""
    from export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="sdwb-sd15-prune-onnx-") as tmp:
        manifest = export_onnx(pipe, Path(tmp) / "onnx", components=["unet"], progress=say)
        entry = manifest["components"]["unet"]
        sizes = {k: v["size"] for k, v in manifest["files"].items() if k.startswith("unet/")}
    checks = entry["validation"]
    return {
        "exporter": entry["exporter"], "opset": manifest["opset"],
        "external_data": entry["external_data"] is not None,
        "export_seconds": entry["export_seconds"], "validation_seconds": entry["validation_seconds"],
        "validation": checks,
        "max_abs": max(c["max_abs"] for c in checks), "max_rel": max(c["max_rel"] for c in checks),
        "ok": all(c["ok"] for c in checks), "files_bytes": sizes,
        "tolerance": "|ort - torch| <= 1e-3 + 1e-3 * |torch| (export.onnx defaults)",
    }


def _carry(previous: dict | None, key: str, metrics: dict) -> dict | None:
    """``previous[key]`` when ``previous`` pruned to the same architecture; else None."""
    if not previous or not isinstance(previous.get(key), dict) or previous[key].get("skipped"):
        return None
    same = all(previous.get(k, {}).get("after") == metrics[k]["after"]
               for k in ("unet_gmacs", "unet_params_m"))
    if not same:
        return None
    return {**previous[key], "carried_over_from": previous["environment"].get("timestamp_utc")}


def write_readme(out: Path, results: dict) -> None:
    """A short README rendering ``results`` (command, machine, numbers, caveats)."""
    env, macs, params = results["environment"], results["unet_gmacs"], results["unet_params_m"]
    pruned = results["pruned"]
    lines = [
        "# pruning-cpu / sd15-arch: channel pruning of SD 1.5's UNet at ratio "
        f"{pruned['requested_ratio']:g}",
        "",
        "`builtin:sd15-arch`: SD 1.5's architecture with seeded random weights (nothing downloaded), "
        "magnitude importance, no recovery. MACs, parameters, latency and the ONNX check depend on "
        "the architecture only; there is no quality number here (random weights).",
        "",
        "## Command",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Machine: {env['cpu']} ({env['cpu_usable']} usable cores, {env['memory_gb']} GB); flags "
        f"{' '.join(env['cpu_flags'])}. torch {env['libraries'].get('torch')}, diffusers "
        f"{env['libraries'].get('diffusers')}, torch-pruning {env['libraries'].get('torch_pruning')}, "
        f"onnxruntime {env['libraries'].get('onnxruntime')}; git {env['git_revision']}; "
        f"{env['timestamp_utc']}.",
        "",
        "## Results",
        "",
        f"- {pruned['outcome']}.",
        f"- UNet GMACs per sample ({results['macs_counter_short']}): {macs['before']:.1f} -> "
        f"{macs['after']:.1f} (-{macs['reduction']:.1%}); parameters {params['before']:.1f} M -> "
        f"{params['after']:.1f} M (-{params['reduction']:.1%}); {pruned['left_whole_count']} channel groups "
        f"left whole, heads removed in {len(pruned['heads'])} attention modules; pruning took "
        f"{results['prune_seconds']:.0f} s.",
    ]
    lat = results["latency"]
    if lat.get("skipped"):
        lines.append(f"- Latency: not measured in this run ({lat['skipped']}).")
    else:
        med = lat["median_s"]
        lines.append(
            f"- UNet latency per call, fp32, batch {lat['batch']}, "
            f"{lat['latent'][0]}x{lat['latent'][1]} latent, "
            f"{lat['threads']} threads, {lat['rounds']} interleaved rounds after {lat['warmup']} warm-up: "
            f"unpruned {med['unpruned']:.2f} s, pruned {med['pruned']:.2f} s (median); pruned/unpruned "
            f"per round {lat['ratio_median']:.3f} median, {lat['ratio_min']:.3f}-{lat['ratio_max']:.3f} "
            f"(speedup {lat['speedup_median']:.2f}x); load average before timing {lat['loadavg_before']} "
            "(this process's own pruning included)"
            + (f"; carried over from {lat['carried_over_from']}" if lat.get("carried_over_from") else "")
            + ".")
    onnx = results["onnx"]
    if onnx.get("skipped"):
        lines.append(f"- ONNX: not checked in this run ({onnx['skipped']}).")
    else:
        lines.append(
            f"- ONNX ({onnx['exporter']} exporter, opset {onnx['opset']}): ONNX Runtime vs PyTorch "
            f"max abs error "
            f"{onnx['max_abs']:.2e}, max rel {onnx['max_rel']:.2e} at {len(onnx['validation'])} shapes, "
            f"{'within' if onnx['ok'] else 'OUTSIDE'} tolerance ({onnx['tolerance']})"
            + (f"; carried over from {onnx['carried_over_from']}" if onnx.get("carried_over_from") else "")
            + ".")
    lines += ["", "`results.json` holds every number, the per-group plan (requested vs kept widths, the "
              "groups left whole and why) and the environment.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.prune_sd15_arch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and validation")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.results import environment
    from sdwb.macs import MACS_COUNTER

    say = _say(time.perf_counter())
    previous_file = args.out / "results.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else None

    pipe, metrics, config = prune_in_memory(args.ratio, say)
    say(f"UNet GMACs {metrics['unet_gmacs']}, params M {metrics['unet_params_m']}")
    results = {
        "model": MODEL, "weights": "random, seed 0 (sdwb.sd15)",
        "command": shlex.join([".venv/bin/python", "-m", "tools.prune_sd15_arch", *argv]),
        "config": config,
        "unet_gmacs": metrics["unet_gmacs"], "unet_params_m": metrics["unet_params_m"],
        "macs_counter": MACS_COUNTER,
        "macs_counter_short": "torch-pruning counter, one sample at the model's 64x64 latent and 77 tokens, "
                              "SDPA not counted",
        "prune_seconds": metrics["prune_seconds"], "pruned": metrics["pruned"],
    }
    if args.no_timing:
        results["latency"] = _carry(previous, "latency", metrics) or {"skipped": "--no-timing"}
    else:
        say("building the unpruned UNet for timing")
        unpruned = unpruned_unet()
        results["latency"] = time_unets({"pruned": pipe.unet, "unpruned": unpruned}, args.rounds, args.warmup,
                                        say)
        del unpruned
        gc.collect()
    if args.no_onnx:
        results["onnx"] = _carry(previous, "onnx", metrics) or {"skipped": "--no-onnx"}
    else:
        results["onnx"] = export_and_validate(pipe, say)
    results["environment"] = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(args.out, results)
    say(f"wrote {args.out}/results.json and README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
