"""Memory and size of a variant: peak RSS of a fresh process, CUDA peak, disk size, params, GMACs.

Why a fresh subprocess per variant: the benchmark process holds every variant at once, plus
allocator caches and libraries warmed by earlier work, so its own RSS says nothing about one
variant. :mod:`bench.memory_probe` starts clean, loads the model, generates one batch and
reports its peak RSS (the high-water mark of the whole process: Python, torch and the libraries
included, as a deployment would see it) and, on CUDA, ``torch.cuda.max_memory_allocated``.

GMACs are counted by the core's one counter (:mod:`sdwb.macs`, the same number pruning reports)
for ONE UNet call on ONE sample (latent ``1 x C x H/f x W/f``, one timestep, ``1 x tokens x
hidden`` text states); multiply by ``unet_batch`` (2*batch with guidance) for a real call. The
counter hooks nn.Modules (conv, linear, norms, ...): functional ops, notably the attention
matmuls inside ``scaled_dot_product_attention``, are NOT counted. For exported rows (ONNX
Runtime, TensorRT) the probe opens the exported pipeline, and GMACs are counted on the source
torch UNet the export recorded (the graph is the same computation); ``cuda_peak_mb`` stays
empty for them (torch's allocator does not see ONNX Runtime's or TensorRT's device memory). MB
means 2**20 bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sdwb.errors import SdwbError
from sdwb.variants.files import MB, weights_mb

PROBE_MARK = "SDWB_PROBE "


def probe_command(scenario, allocate_mb: int = 0, gmacs: bool = True,
                  model: str | Path | None = None) -> list[str]:
    """The command line that runs the memory probe for ``scenario`` (a bench Scenario).

    ``model`` replaces ``scenario.model`` (the export directory an onnxruntime row runs).
    """
    cmd = [sys.executable, "-m", "bench.memory_probe", "--model", str(model or scenario.model),
           "--backend", scenario.backend, "--dtype", scenario.dtype,
           "--device", scenario.device, "--steps", str(scenario.steps), "--guidance", str(scenario.guidance),
           "--scheduler", scenario.scheduler, "--batch", str(scenario.batch), "--seed", str(scenario.seed)]
    for flag, value in (("--threads", scenario.threads), ("--height", scenario.height),
                        ("--width", scenario.width)):
        if value is not None:
            cmd += [flag, str(value)]
    if getattr(scenario, "compile", False):  # a compiled row's peak includes its compile
        cmd += ["--compile-mode", scenario.compile_mode]
    if allocate_mb:
        cmd += ["--allocate-mb", str(allocate_mb)]
    if not gmacs:
        cmd.append("--no-gmacs")
    return cmd


def run_probe(scenario, allocate_mb: int = 0, gmacs: bool = True, timeout: float | None = None,
              model: str | Path | None = None) -> dict:
    """Run the probe in a fresh interpreter and return its JSON; SdwbError with its last line on failure."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = probe_command(scenario, allocate_mb, gmacs, model)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SdwbError(f"variant {scenario.variant}: memory probe timed out after {timeout} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            result = json.loads(line[len(PROBE_MARK):])
            if "error" in result:
                raise SdwbError(f"variant {scenario.variant}: {result['error']}")
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise SdwbError(f"variant {scenario.variant}: memory probe failed (exit {proc.returncode}): {tail}")


def size_on_disk_mb(spec: str) -> float | None:
    """MB of the weight files a spec loads from; None for a model built in code (sd15-arch)."""
    from sdwb.loading import resolve_spec

    path = resolve_spec(spec, "pipeline")
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size / MB
    return weights_mb(path)


def param_counts(pipe) -> dict[str, float]:
    """Millions of parameters: all denoising components together, and the UNet alone."""

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    unet = count(pipe.unet)
    total = unet + sum(count(getattr(pipe, name, None)) for name in ("vae", "text_encoder", "text_encoder_2"))
    return {"params_m": total / 1e6, "unet_params_m": unet / 1e6}
