"""``python -m bench.memory_probe``: load one model, generate one batch, print peak memory as JSON.

Why its own module: it must run in a fresh interpreter (see :mod:`bench.memory`) so the peak
RSS belongs to this one variant. The result is the last stdout line, ``SDWB_PROBE {json}``:
``peak_rss_mb`` (the whole process's high-water mark, see :func:`peak_rss_mb`),
``rss_after_import_mb``, ``rss_after_load_mb``, ``rss_after_generate_mb`` (current RSS at those
points), ``cuda_peak_mb`` (CUDA only) and, unless ``--no-gmacs``, ``unet_gmacs`` counted after the
peak was read (counting copies the UNet).
``--allocate-mb N`` touches N MB more after generating: tests use it to check the probe sees it.
``--compile-mode MODE`` (torch only): the UNet is ``torch.compile``d after loading
(:mod:`sdwb.torch_compile`), so the peak includes the compile, as a compiled deployment's would.
``--backend onnxruntime|tensorrt``: ``--model`` is an export (engine) directory, opened as the
benchmark opens it (``--threads`` = ONNX Runtime intra-op threads); GMACs are then counted on the
source torch model named in its manifest (empty when the export came from an in-memory pipeline).
Failures print ``SDWB_PROBE {"error": ...}`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from sdwb.backends.registry import BACKENDS

PROBE_MARK = "SDWB_PROBE "


def current_rss_mb() -> float:
    """Resident set size now, MB (from /proc/self/statm; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Why not ``ru_maxrss`` on Linux: the kernel carries the parent's high-water mark across
    fork/vfork + exec into the child's ``ru_maxrss``, so a probe started by a 2 GB benchmark
    process would report >= 2 GB whatever it loads. ``VmHWM`` belongs to this process's own
    address space (the one exec created).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory_probe", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--prompt", default="a small red circle at the top on a gray background")
    p.add_argument("--allocate-mb", type=int, default=0)
    p.add_argument("--compile-mode", default=None, help="torch.compile the UNet with this mode")
    p.add_argument("--no-gmacs", action="store_true")
    return p.parse_args(argv)


def probe(args: argparse.Namespace) -> dict:
    """Load, generate, measure; the dict printed as JSON."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    diffusers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    out: dict = {"rss_after_import_mb": current_rss_mb(), "device": device,
                 "threads": torch.get_num_threads()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    exported = args.backend != "torch"
    if exported:
        from sdwb.backends.registry import open_exported

        pipe = open_exported(args.backend, args.model, device=device, threads=args.threads,
                             dtype=args.dtype)
        out["threads"] = args.threads or out["threads"]
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        pipe = load_pipeline(args.model, device=device, dtype=dtype)
        if args.compile_mode:
            from sdwb.torch_compile import check_compile, compile_unet

            check_compile(device)
            compile_unet(pipe, args.compile_mode)
    out["rss_after_load_mb"] = current_rss_mb()
    generate(pipe, [args.prompt] * args.batch, steps=args.steps, guidance=args.guidance, seed=args.seed,
             scheduler=args.scheduler, batch=args.batch, height=args.height, width=args.width, progress=False)
    out["rss_after_generate_mb"] = current_rss_mb()
    ballast = None
    if args.allocate_mb > 0:
        ballast = torch.ones(args.allocate_mb * 2**20, dtype=torch.uint8)  # ones(): pages are touched
        out["allocated_mb"] = float(args.allocate_mb)
    out["peak_rss_mb"] = peak_rss_mb()
    out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda and not exported else None
    del ballast
    if not args.no_gmacs:
        from sdwb.macs import unet_example_inputs, unet_macs
        from sdwb.torch_compile import eager_unet

        if exported:
            pipe = _source_pipeline(pipe.manifest)
        if pipe is not None:
            from sdwb.cache.config import applied, remove_cache

            if getattr(applied(pipe), "method", None) == "deepcache":
                remove_cache(pipe)  # its unet_gmacs: one full call (what unet_calls counts)
            inputs = unet_example_inputs(pipe, args.height, args.width)
            out["unet_gmacs"] = unet_macs(eager_unet(pipe), inputs)["gmacs"]  # counted on the modules
    return out


def _source_pipeline(manifest: dict):
    """The torch pipeline an export (or the export behind engines) came from, or None."""
    from pathlib import Path

    from sdwb.loading import load_pipeline

    source = manifest.get("source") or {}
    source = source.get("model", source)
    path, spec = source.get("path"), source.get("spec")
    if path and Path(path).is_dir():
        return load_pipeline(path)
    return load_pipeline(spec) if spec else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = _parse(argv)
    try:
        result = probe(args)
    except Exception as e:  # one line back to the parent, which turns it into an SdwbError
        from sdwb.errors import SdwbError

        text = str(e) if isinstance(e, SdwbError) else f"{type(e).__name__}: {e}"
        print(PROBE_MARK + json.dumps({"error": " ".join(text.split())}), flush=True)
        return 2
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
