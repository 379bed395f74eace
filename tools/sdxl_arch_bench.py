"""SDXL at full scale on this CPU: ``builtin:sdxl-arch``'s UNet per call, fp32 vs bf16 vs int8.

Why: SDXL is what most users bring, and its cost on a CPU is set by the architecture (a
2.57 B-parameter UNet, 10 transformer layers at the 32x32 level of a 128x128 latent), not by the
weights; ``builtin:sdxl-arch`` has SDXL base 1.0's real configuration with seeded random weights,
so this needs nothing downloaded. No quality claim is made (random weights).

Each variant runs in a fresh process (so its peak RSS is its own): the UNet is built from the
seed, the variant applied with the workbench's own method (:mod:`sdwb.quant.methods`), one
untimed warm-up call at a 32x32 latent, then ``--calls`` timed calls at batch 2 (one image under
classifier-free guidance), 128x128 latent (1024x1024 pixels), 77 tokens, with SDXL's
``text_embeds`` and ``time_ids``. Variants:

- ``fp32``: torch eager, fp32;
- ``bf16``: ``torch-bf16`` (GroupNorm / LayerNorm / conv_out / time embedding kept fp32);
- ``int8-dynamic``: ``torch-int8-dynamic`` (every nn.Linear int8, convolutions fp32);
- ``int8-static``: ``torch-int8-static`` (W8A8 Conv2d + Linear; activation ranges calibrated on
  one fp32 call at the timed shape, random inputs -- a latency measurement, not a calibration).

Order: fp32, bf16, int8-dynamic, int8-static, then fp32 again, so drift of the machine over the
run shows as the difference of the two fp32 runs (reported). Writes ``OUT/results.json`` and
``OUT/README.md`` (default ``reports/sdxl-arch-cpu``)::

    .venv/bin/python -m tools.sdxl_arch_bench                       # ~30-45 min on 2 cores
    .venv/bin/python -m tools.sdxl_arch_bench --variants fp32 bf16 --calls 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("reports/sdxl-arch-cpu")
VARIANTS = ("fp32", "bf16", "int8-dynamic", "int8-static")
BATCH, LATENT, TOKENS = 2, 128, 77


def _inputs(latent: int, batch: int = BATCH):
    import torch

    from sdwb.sdxl import SDXL_UNET

    gen = torch.Generator().manual_seed(0)
    pooled = SDXL_UNET["projection_class_embeddings_input_dim"] - 6 * SDXL_UNET["addition_time_embed_dim"]
    side = latent * 8
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, TOKENS, SDXL_UNET["cross_attention_dim"], generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(batch, 1),
        },
    }


def run_variant(variant: str, calls: int, threads: int) -> dict:
    """In this process: build the UNet, apply ``variant``, time it; returns the measurements."""
    import types

    import torch

    torch.set_num_threads(threads)
    from diffusers import UNet2DConditionModel

    from sdwb.sdxl import SDXL_UNET

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET).eval().requires_grad_(False)
    build_s = time.perf_counter() - started
    pipe = types.SimpleNamespace(unet=unet)  # what the methods' component lookup needs
    summary: dict = {}
    if variant == "bf16":
        from sdwb.quant.methods.cast import TorchBf16Config, apply_cast

        summary = apply_cast(pipe, TorchBf16Config())
    elif variant == "int8-dynamic":
        from sdwb.quant.methods.int8_dynamic import TorchInt8DynamicConfig, apply_int8_dynamic

        summary = apply_int8_dynamic(pipe, TorchInt8DynamicConfig())
    elif variant == "int8-static":
        import numpy as np

        from sdwb.quant import w8a8
        from sdwb.quant.methods.int8_static import TorchInt8StaticConfig, apply_int8_static

        config = TorchInt8StaticConfig()
        inputs = _inputs(LATENT)
        feed = {k: v.numpy() for k, v in inputs.items() if k != "added_cond_kwargs"}
        feed["timestep"] = np.array([500.0], dtype=np.float32)
        feed.update({k: v.numpy() for k, v in inputs["added_cond_kwargs"].items()})
        calibrating = time.perf_counter()
        ranges = w8a8.calibrate_ranges(unet, w8a8.targets(unet, config.exclude), [feed])
        summary = apply_int8_static(pipe, config, "cpu", ranges)
        summary = {k: v for k, v in summary.items() if k != "state"}
        summary["calibration_s"] = round(time.perf_counter() - calibrating, 1)
    elif variant != "fp32":
        raise SystemExit(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    summary.pop("kept_fp32_modules", None)
    with torch.inference_mode():
        warm = time.perf_counter()
        unet(**_inputs(32))
        warm_s = time.perf_counter() - warm
        inputs = _inputs(LATENT)
        seconds = []
        for _ in range(calls):
            t0 = time.perf_counter()
            out = unet(**inputs).sample
            seconds.append(time.perf_counter() - t0)
            if not torch.isfinite(out).all():
                raise SystemExit(f"{variant}: non-finite UNet output")
    return {
        "variant": variant, "build_s": round(build_s, 1), "warmup_32x32_s": round(warm_s, 2),
        "seconds_per_call": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": threads, "method_summary": summary,
    }


def _environment() -> dict:
    """CPU model and flags, versions and the git revision (``bench.results.environment``)."""
    from bench.results import environment

    return environment()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "fp32"])
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.calls, args.threads)))
        return 0
    environment = _environment()  # before the run: the revision measured, not one edited meanwhile
    rows = []
    for variant in args.variants:
        print(f"{variant}: building and timing ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "tools.sdxl_arch_bench", "--one", variant,
                               "--calls", str(args.calls), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {row['median_s']} s per call, peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
        rows.append(row)
    fp32 = [r["median_s"] for r in rows if r["variant"] == "fp32"]
    for r in rows:  # against each fp32 run: the spread is the machine's drift over the run
        if fp32:
            r["speedup_vs_fp32"] = [round(min(fp32) / r["median_s"], 3), round(max(fp32) / r["median_s"], 3)]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "what": "builtin:sdxl-arch UNet per call, batch 2, 128x128 latent, 77 tokens, torch eager on CPU",
        "command": "python -m tools.sdxl_arch_bench " + " ".join(argv or sys.argv[1:]),
        "fp32_drift": round(max(fp32) / min(fp32) - 1, 3) if len(fp32) > 1 else None,
        "weights": "seeded random (torch.manual_seed(0)), SDXL base 1.0's UNet config (sdwb.sdxl.SDXL_UNET)",
        "environment": environment, "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
