"""Every CPU engine on one large UNet: per-call latency at batch 2, VAE decode, peak RSS.

Why a tool of its own and not one ``sdwb bench`` run: the engines of ``builtin:sd15-arch`` do not
fit in one process (torch fp32 + one ONNX Runtime session of the 3.4 GB UNet + an OpenVINO one
passed 24 GB), so each engine runs in a fresh process, one after the other, and its peak RSS is
its own. Torch fp32 eager runs first *and last*: the difference of its two runs is the machine's
drift over the whole run, and every speed-up is reported against both (the interval). Within an
engine, ``--calls`` timed UNet calls follow one untimed warm-up call (which is where torch.compile
and OpenVINO compile), and the speed-up's 95 % interval is the gate's bootstrap
(:func:`bench.gate.bootstrap_ratio`) of the engine's calls against the fp32 calls of both runs.

Engines are ``NAME=KIND[:DIR]``; KIND is one of

- ``torch-fp32``, ``torch-bf16`` (``torch-bf16``'s cast), ``compile-fp32``, ``compile-bf16``
  (:func:`sdwb.torch_compile.compile_unet`, inductor, static shapes): on ``--model``;
- ``onnxruntime``: an ONNX export or ONNX Runtime variant directory (fp32 or int8 graphs);
- ``openvino-fp32``, ``openvino-bf16``: an ONNX export / OpenVINO IR / NNCF variant directory.

Inputs: seeded random, batch 2 (one image under classifier-free guidance), the model's default
latent (64x64 for sd15-arch), 77 tokens, timestep 500; VAE decode at batch 1. Random weights: no
quality claim. Writes ``OUT/results.json``::

    python -m tools.engines_unet_bench -o reports/engines-cpu/sd15-arch \\
        --engine fp32=torch-fp32 --engine ort=onnxruntime:runs/engines/sd15/onnx ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TORCH_KINDS = ("torch-fp32", "torch-bf16", "compile-fp32", "compile-bf16")
EXPORTED_KINDS = ("onnxruntime", "openvino-fp32", "openvino-bf16")
BATCH, TOKENS = 2, 77


def _torch_engine(kind: str, model: str):
    """``(unet_call, vae_call, info, latent side)`` for a torch engine."""
    import torch

    from sdwb.loading import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    info = {"backend": "torch", "dtype": "bfloat16" if kind.endswith("bf16") else "float32"}
    if kind.endswith("bf16"):
        from sdwb.quant.config import parse_quant_config
        from sdwb.quant.torch_methods import apply_torch_method

        info["method_summary"] = apply_torch_method(pipe, parse_quant_config({"method": "torch-bf16"}))
    unet_dtype = next(pipe.unet.parameters()).dtype
    vae_dtype = next(pipe.vae.parameters()).dtype
    latent = pipe.unet.config.sample_size
    if kind.startswith("compile"):
        from sdwb.torch_compile import check_compile, compile_unet

        check_compile("cpu")
        compile_unet(pipe)
        info["compile"] = "inductor, mode default, static shapes"
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(BATCH, 4, latent, latent, generator=gen).to(unet_dtype)
    hidden = torch.randn(BATCH, TOKENS, pipe.text_encoder.config.hidden_size, generator=gen).to(unet_dtype)
    z = torch.randn(1, 4, latent, latent, generator=gen).to(vae_dtype)

    def unet():
        with torch.inference_mode():
            return pipe.unet(sample, torch.tensor(500.0), encoder_hidden_states=hidden, return_dict=False)[0]

    def vae():
        with torch.inference_mode():
            pipe.vae.decode(z, return_dict=False)

    return unet, vae, info, latent


def _exported_engine(kind: str, directory: str):
    import torch

    from sdwb.backends.registry import open_exported

    backend = "onnxruntime" if kind == "onnxruntime" else "openvino"
    dtype = "bf16" if kind.endswith("bf16") else "fp32"
    pipe = open_exported(backend, directory, threads=torch.get_num_threads(), dtype=dtype)
    latent = pipe.facts["sample_size"]
    feeds = pipe.sample_inputs("unet", {"batch": BATCH, "height": latent, "width": latent,
                                        "sequence": TOKENS}, seed=0)
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    quant = (pipe.manifest.get("quantization") or {}).get("method")
    info = {"backend": backend, "dtype": dtype, "export": str(directory), "graphs": quant or "float32",
            **{k: v for k, v in pipe.info.items() if k in ("providers", "precision", "openvino")}}

    def unet():
        return pipe.components["unet"](**feeds)

    def vae():
        pipe.components["vae_decoder"](latent=z)

    return unet, vae, info, latent, pipe


def run_engine(name: str, kind: str, path: str | None, model: str, calls: int) -> dict:
    """Build one engine, warm it up once, time ``calls`` UNet calls and 2 VAE decodes."""
    import torch

    from bench.memory_probe import peak_rss_mb

    started = time.perf_counter()
    pipe = None
    if kind in TORCH_KINDS:
        unet, vae, info, latent = _torch_engine(kind, model)
    else:
        unet, vae, info, latent, pipe = _exported_engine(kind, path)
    build_s = time.perf_counter() - started
    t0 = time.perf_counter()
    unet()  # compiles where the engine compiles (torch.compile, OpenVINO per shape)
    warm_s = time.perf_counter() - t0
    seconds = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = unet()
        seconds.append(time.perf_counter() - t0)
    finite = bool(torch.isfinite(out.float()).all())  # a fast NaN is no result: the row says so
    vae()
    vae_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        vae()
        vae_s.append(time.perf_counter() - t0)
    compile_s = pipe.compile_seconds() if hasattr(pipe, "compile_seconds") else None
    compile_s = None if compile_s is None else round(compile_s, 2)
    return {"engine": name, "kind": kind, "dir": path, **info, "build_s": round(build_s, 2),
            "warmup_call_s": round(warm_s, 2), "compile_s": compile_s,
            "unet_seconds_per_call": [round(s, 4) for s in seconds],
            "unet_median_s": round(statistics.median(seconds), 4), "unet_output_finite": finite,
            "vae_decode_s": [round(s, 4) for s in vae_s], "latent": latent, "batch": BATCH,
            "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_mb(), 1)}


def _parse(spec: str) -> tuple[str, str, str | None]:
    name, _, rest = spec.partition("=")
    kind, _, path = rest.partition(":")
    if not name or kind not in (*TORCH_KINDS, *EXPORTED_KINDS):
        raise SystemExit(f"error: --engine {spec!r}: expected NAME=KIND[:DIR], KIND one of "
                         f"{', '.join((*TORCH_KINDS, *EXPORTED_KINDS))}")
    if kind in EXPORTED_KINDS and not path:
        raise SystemExit(f"error: --engine {spec!r}: {kind} needs a directory (NAME={kind}:DIR)")
    return name, kind, path or None


def _speedups(rows: list[dict]) -> None:
    """Per engine: speed-up vs torch fp32 eager (both runs pooled) with the bootstrap interval,
    and the point speed-up against each fp32 run alone (the drift)."""
    from bench.gate import bootstrap_ratio

    ref_runs = [r for r in rows if r["kind"] == "torch-fp32"]
    if not ref_runs:
        return
    pooled = [s for r in ref_runs for s in r["unet_seconds_per_call"]]
    for r in rows:
        ratio, lo, hi = bootstrap_ratio(r["unet_seconds_per_call"], pooled)
        r["speedup_vs_fp32"] = {"median": round(ratio, 3), "lo": round(lo, 3), "hi": round(hi, 3),
                                "per_fp32_run": [round(f["unet_median_s"] / r["unet_median_s"], 3)
                                                 for f in ref_runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:sd15-arch", help="the torch engines' model")
    p.add_argument("--engine", action="append", default=[], help="NAME=KIND[:DIR], in run order")
    p.add_argument("--calls", type=int, default=3, help="timed UNet calls per engine")
    p.add_argument("--threads", type=int, default=None, help="torch / runtime threads (default: torch's)")
    p.add_argument("-o", "--out", type=Path, help="output folder (required unless --one)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        name, kind, path = _parse(args.one)
        print(json.dumps(run_engine(name, kind, path, args.model, args.calls)))
        return 0
    engines = [_parse(e) for e in args.engine]
    if args.out is None:
        p.error("-o/--out is required")
    from bench.results import environment

    env = environment()  # before the run: the revision measured
    rows = []
    for spec, (name, kind, _path) in zip(args.engine, engines):
        print(f"{name} ({kind}): building and timing ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "tools.engines_unet_bench", "--one", spec, "--model", args.model,
               "--calls", str(args.calls)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"engine": name, "kind": kind, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  UNet {row['unet_median_s']} s/call, peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr)
        rows.append(row)
    _speedups([r for r in rows if "error" not in r])
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"what": f"{args.model} UNet per call (batch {BATCH}, {TOKENS} tokens) and VAE decode, one "
                      "process per engine, torch fp32 eager first and last",
              "command": "python -m tools.engines_unet_bench " + " ".join(argv or sys.argv[1:]),
              "weights": "seeded random (built in code)" if args.model.startswith("builtin:") else args.model,
              "environment": env, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
