"""The GPU check (#28): everything in this project that needs a CUDA GPU, measured in one short run.

Why one prepared script: a GPU machine is lent to this project rarely and for minutes, one call,
with no package registry, so what runs there must be ready here, must fit a time budget, and must
leave its files even when a step fails or the call is cut short. ``make gpu-check`` runs it;
``make gpu-check GPU_CHECK_ARGS=--dry-run`` runs the same code on this CPU in seconds (CI's test).

Steps, in order of value per second (each is skipped, with the reason recorded, when its estimate
no longer fits what is left of ``--budget-s``; each after ``wheels`` runs in a fresh subprocess of
this script, ``--one STEP``, so a CUDA error, an out-of-memory or a hang costs one step, not the
run, and the budget left is its timeout):

- ``wheels``: the wheels ``make gpu-wheels`` put in ``.whl/`` (diffusers, pydantic, ... that the
  GPU machine lacks), installed with pip into a scratch directory (``--site``) for the
  distributions this Python lacks or has older, which then leads ``sys.path`` and the children's
  ``PYTHONPATH`` (with the repository root: no ``pip install -e`` needed there);
- ``pytest-gpu``: ``pytest -m gpu`` on the test files holding GPU-marked tests (counts from JUnit XML);
- ``sd15-unet``: ``builtin:sd15-arch``'s UNet (random weights), one call at batch 2 (one image under
  classifier-free guidance), 64x64 latents (512x512): fp32, bf16, fp16, fp16 replayed from one
  CUDA graph (captured by hand: no compile); ``--calls`` calls timed with CUDA events after
  ``--warmup`` untimed ones; median, p10-p90, speed-up vs fp32 with the gate's bootstrap interval
  (:func:`bench.gate.bootstrap_ratio`), ``torch.cuda.max_memory_allocated`` per variant;
- ``tiny-shapes``: ``builtin:tiny-shapes`` end to end through ``sdwb bench``'s own harness
  (:func:`bench.harness.run_bench`, device cuda) at batch 1 and 16: s/image, images/s, UNet ms per
  call, CUDA peak (the harness's fresh-process probe) and the judge's quality;
- ``distill`` / ``prune-recovery``: optimizer steps per second of progressive distillation
  (:func:`compress.distill.distill`) and of pruning recovery (:func:`compress.prune.prune` with
  ``finetune.steps``) on tiny-shapes, batch 32, with their first / last losses;
- ``sd15-compile``: fp16 + ``torch.compile`` (:func:`sdwb.torch_compile.compile_unet`, mode default;
  ``compile_s`` is the first call), its output checked against eager;
- ``sdxl-unet``: ``builtin:sdxl-arch``'s UNet at 128x128 latents (1024x1024) with its added
  conditioning (``text_embeds``, ``time_ids``), fp16 and bf16;
- ``sd15-reduce-overhead``: fp16 + ``torch.compile`` mode ``reduce-overhead`` (inductor's CUDA graphs).

Writes into ``-o`` (default ``$OUT`` when set, as on the lent machine, else ``runs/gpu-check``):
``environment.json`` (GPU, driver and CUDA from nvidia-smi, torch, CPU, git revision and a hash of
the sources for a tree without ``.git``), ``log.txt`` (everything printed, the steps' output too),
``results.json`` / ``results.csv`` (``sdwb bench``'s results format: rows + environment +
per-run ``samples``; plus ``steps``: each step's status, reason or error line, seconds, details),
``summary.md``, ``pytest-gpu.xml`` and ``tiny-shapes-results.json`` (the harness's own file): 7
files, as the device tool brings back 8 at most. They are rewritten after every step. Exit 0 when
the script ran to the end (failed steps are recorded, not fatal), 2 without CUDA (unless
``--dry-run``), 1 when the script itself broke.

``--dry-run``: CUDA hidden from the steps; each GPU-only part is recorded as ``skipped: dry run (no
CUDA)``, the rest shrinks to seconds (a tiny UNet instead of sd15-arch / sdxl-arch, 1 timed call,
2 prompts, 2 training steps)::

    make gpu-check                                  # on a CUDA machine (see README, "GPU check")
    python3 tools/gpu_check.py --dry-run -o /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: the project's packages come from the checkout
    sys.path.insert(0, str(ROOT))

RESULT_MARK = "GPU_CHECK_RESULT "
DRY_SKIP = "skipped: dry run (no CUDA)"
DEFAULT_SITE = Path("/tmp/sdwb-site")
UNET_SCENARIO = "unet-per-call"


@dataclass(frozen=True)
class Step:
    """One step: its name, what it measures, its time estimate on a GPU (and in a dry run), and
    whether it runs at all without CUDA."""

    name: str
    what: str
    gpu_s: float
    dry_s: float
    gpu_only: bool = False


STEPS = (
    Step("pytest-gpu", "pytest -m gpu (the GPU-marked tests)", 150, 20),
    Step("sd15-unet", "sd15-arch UNet per call, batch 2, 512x512: fp32, bf16, fp16, fp16 + CUDA graph",
         45, 15),
    Step("tiny-shapes", "tiny-shapes end to end via sdwb bench at batch 1 and 16, judge quality", 90, 30),
    Step("distill", "progressive distillation optimizer steps/s on tiny-shapes", 40, 20),
    Step("prune-recovery", "pruning recovery optimizer steps/s on tiny-shapes", 40, 20),
    Step("sd15-compile", "sd15-arch UNet fp16 + torch.compile (mode default)", 150, 0, gpu_only=True),
    Step("sdxl-unet", "sdxl-arch UNet per call, batch 2, 1024x1024 with added conditioning: fp16, bf16",
         60, 15),
    Step("sd15-reduce-overhead", "sd15-arch UNet fp16 + torch.compile mode reduce-overhead", 100, 0,
         gpu_only=True),
)
BY_NAME = {s.name: s for s in STEPS}


# --------------------------------------------------------------------------- output


class Log:
    """Prints to stdout and appends to ``log.txt`` (flushed: a killed run keeps what it said)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


def default_out() -> Path:
    """``$OUT`` when set (the device tool's folder that comes back), else ``runs/gpu-check``."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu-check"


# --------------------------------------------------------------------------- wheels


def wheels_to_install(wheels: list[Path], installed) -> tuple[list[Path], dict[str, str]]:
    """The wheels whose distribution ``installed(name)`` (its version or None) lacks or has older;
    and ``{name: version}`` of those already present at their version or newer."""
    try:
        from packaging.version import Version
    except ImportError:  # no packaging: only an exact version match counts as present
        Version = str  # noqa: N806
    todo, present = [], {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        have = installed(name)
        try:
            newer = have is not None and Version(have) >= Version(version)
        except Exception:  # an unparsable version: install the carried one
            newer = False
        if newer:
            present[name] = have
        else:
            todo.append(wheel)
    return todo, present


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install_wheels(wheel_dir: Path, site: Path, say) -> dict:
    """Install the carried wheels this Python lacks into ``site`` and put ``site`` first on
    ``sys.path`` (``--no-deps``: ``make gpu-wheels`` carries the missing dependencies too). Falls
    back to unpacking the wheels when pip is absent or fails (plain wheels import that way)."""
    import importlib

    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {wheel_dir} (make gpu-wheels makes them)"}
    todo, present = wheels_to_install(wheels, _installed_version)
    details: dict = {"present": present, "installed": [w.name for w in todo], "site": str(site)}
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            say(f"pip install failed (exit {proc.returncode}): {_last_line(proc.stderr)}; unpacking instead")
            import zipfile

            site.mkdir(parents=True, exist_ok=True)
            for wheel in todo:
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(site)
            details["method"] = "unzip"
        else:
            details["method"] = "pip --target"
        say(f"installed {len(todo)} wheel(s) into {site}: {', '.join(w.name for w in todo)}")
    if present:
        say(f"already present: {', '.join(f'{k} {v}' for k, v in sorted(present.items()))}")
    if site.is_dir():
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    return {"status": "ok", "details": details}


def child_env(site: Path, dry_run: bool) -> dict[str, str]:
    """The steps' environment: the scratch site and the checkout on ``PYTHONPATH``, the libraries
    offline and quiet (as ``sdwb`` sets them); in a dry run no CUDA and one thread."""
    env = dict(os.environ)
    paths = [str(site)] if site.is_dir() else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        env.setdefault(key, value)
    if dry_run:  # CPU only, one thread: seconds even beside a busy neighbour (OpenMP spin-waits)
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SDWB_THREADS="1")
    return env


def run_group(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group: ``(exit code, stdout + stderr)``; on timeout the whole
    group is killed (inductor's compile workers too) and the exit code is None."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------- environment


def source_sha256() -> str:
    """A hash of the project's sources and configs, so a tree without ``.git`` can be matched
    against a checkout (``environment.json`` of a dry run there shows the same hash)."""
    digest = hashlib.sha256()
    for top in ("sdwb", "bench", "compress", "export", "tools", "tests", "configs"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml", ".yml") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()[:16]


def nvidia_smi() -> dict | None:
    """GPU name, driver, memory and the driver's CUDA version from ``nvidia-smi``; None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        plain = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    gpus = [dict(zip(("name", "driver", "memory", "compute_cap"), (x.strip() for x in line.split(","))))
            for line in query.stdout.strip().splitlines() if line.strip()]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", plain.stdout)
    return {"gpus": gpus, "driver_cuda": cuda.group(1) if cuda else None}


def environment_record(dry_run: bool) -> dict:
    """``bench.results.environment()`` (CPU, GPU, versions, git revision) plus nvidia-smi, CUDA,
    cuDNN, the TF32 settings the timings ran with and the source hash."""
    import torch

    from bench.results import environment

    env = environment()
    env.update({
        "nvidia_smi": nvidia_smi(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "source_sha256": source_sha256(),
        "python_executable": sys.executable, "dry_run": dry_run,
    })
    if torch.cuda.is_available():
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


# --------------------------------------------------------------------------- UNet per call


def _build_unet(model: str, dry_run: bool):
    """The UNet of ``model`` (sd15-arch / sdxl-arch: real configs, random weights drawn on the
    current default device), or in a dry run a tiny one of the same family; and its token count."""
    from diffusers import UNet2DConditionModel

    if dry_run:
        from sdwb.sdxl import sdxl_configs
        from sdwb.testing import TINY_TOKENS, build_tiny_pipeline

        unet = build_tiny_pipeline().unet if model == "sd15-arch" else \
            UNet2DConditionModel(**sdxl_configs(tiny=True)["unet"])
        return unet.eval().requires_grad_(False), TINY_TOKENS
    from sdwb.sd15 import SD15_MAX_TOKENS, SD15_UNET
    from sdwb.sdxl import SDXL_UNET

    unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15-arch" else SDXL_UNET))
    return unet.eval().requires_grad_(False), SD15_MAX_TOKENS


def unet_inputs(unet, batch: int, tokens: int, seed: int = 0) -> dict:
    """Seeded random inputs of ``batch`` samples at the UNet's default latent size (SDXL's
    ``added_cond_kwargs`` too), shaped by :func:`sdwb.macs.unet_example_inputs`."""
    from types import SimpleNamespace

    import torch

    from sdwb.macs import unet_example_inputs

    pipe = SimpleNamespace(unet=unet, vae_scale_factor=8, tokenizer=SimpleNamespace(model_max_length=tokens))
    example = unet_example_inputs(pipe)
    gen = torch.Generator().manual_seed(seed)

    def draw(t):
        return torch.randn((batch, *t.shape[1:]), generator=gen).to(t)

    sample = example["sample"]
    inputs = {"sample": draw(sample), "timestep": torch.tensor(500.0, device=sample.device),
              "encoder_hidden_states": draw(example["encoder_hidden_states"])}
    if "added_cond_kwargs" in example:
        added = example["added_cond_kwargs"]
        inputs["added_cond_kwargs"] = {"text_embeds": draw(added["text_embeds"]),
                                       "time_ids": added["time_ids"].repeat(batch, 1)}
    return inputs


def _cast(obj, dtype):
    """Floating tensors in (nested) ``obj`` cast to ``dtype``."""
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj.to(dtype) if obj.is_floating_point() else obj


def time_calls(fn, calls: int, warmup: int, device: str) -> tuple[list[float], object]:
    """``calls`` timed calls of ``fn`` after ``warmup`` untimed ones, timed by
    :func:`bench.latency.clock_for` (CUDA events on CUDA, no sync inside the loop); seconds, last output."""
    from bench.latency import clock_for

    clock = clock_for(device)
    out = None
    for _ in range(warmup):
        out = fn()
    clock.sync()
    marks = []
    for _ in range(calls):
        start = clock.mark()
        out = fn()
        marks.append((start, clock.mark()))
    clock.sync()
    return [clock.elapsed(a, b) for a, b in marks], out


def cuda_graphed(unet, inputs):
    """The UNet's call captured once in a CUDA graph; returns a replay (static inputs and output).
    Three eager calls on a side stream first, as torch's CUDA-graph recipe asks."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            unet(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = unet(**inputs).sample

    def replay():
        graph.replay()
        return out

    return replay


def _unet_row(model: str, label: str, dtype: str, seconds: list[float], peak_mb, device: str,
              latent: int, **extra) -> dict:
    """A results row of one UNet variant (bench's columns: ``unet_ms_per_call`` = median)."""
    import numpy as np

    ms = np.array(seconds) * 1000
    return {"variant": f"{model}-unet-{label}", "model": f"builtin:{model}", "backend": "torch",
            "dtype": dtype, "batch": 1, "unet_batch": 2, "unet_ms_per_call": float(np.median(ms)),
            "unet_ms_p10": float(np.percentile(ms, 10)), "unet_ms_p90": float(np.percentile(ms, 90)),
            "unet_calls": len(seconds), "timed_runs": len(seconds), "cuda_peak_mb": peak_mb,
            "device": device, "height": latent * 8, "width": latent * 8, "scenario": UNET_SCENARIO,
            "base_variant": f"{model}-unet", **extra}


def _time_variant(unet, inputs: dict, label: str, dtype, device: str, ctx, compile_mode: str | None) -> dict:
    """Time one variant of ``unet`` (already cast to ``dtype``): the eager call, its CUDA-graph replay
    (``*-cudagraph``) or ``torch.compile`` with ``compile_mode`` (``compile_s``: the first call; its
    output's largest difference from eager, relative to eager's largest value). Returns the row's
    measurements (``seconds``, ``peak``: ``torch.cuda.max_memory_allocated`` since the reset)."""
    import torch

    from bench.latency import clock_for

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"compile": bool(compile_mode), "compile_mode": compile_mode,
                 "cuda_graph": label.endswith("cudagraph") or compile_mode == "reduce-overhead"}
    warmup = 3 if compile_mode == "reduce-overhead" else ctx.warmup  # cudagraph trees record on call 2-3
    with torch.inference_mode():
        fn = lambda: unet(**inputs).sample  # noqa: E731
        if label.endswith("cudagraph"):
            fn = cuda_graphed(unet, inputs)
        elif compile_mode:
            from types import SimpleNamespace

            from sdwb.torch_compile import check_compile, compile_unet

            check_compile(device)
            eager = unet(**inputs).sample.float()
            compiled = compile_unet(SimpleNamespace(unet=unet), compile_mode).unet
            fn = lambda: compiled(**inputs).sample  # noqa: E731
            t0 = time.perf_counter()
            first = fn().float().clone()  # reduce-overhead: the graph's output is reused by the next call
            clock_for(device).sync()
            out["compile_s"] = round(time.perf_counter() - t0, 2)
            out["max_rel_diff_vs_eager"] = float((first - eager).abs().max() / eager.abs().max())
        seconds, last = time_calls(fn, ctx.calls, warmup, device)
        out["output_finite"] = bool(torch.isfinite(last).all())  # a fast NaN is no result
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if ctx.dry_run:
        out["method"] = "dry run: a tiny UNet of the same family stands in"
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"dtype": short, "seconds": seconds, "peak": peak, **out}


def run_unet_variants(model: str, labels: list[str], ctx: argparse.Namespace,
                      compile_mode: str | None = None) -> dict:
    """Build ``model``'s UNet once (fp32, on the device) and time each variant of ``labels`` in
    turn (``fp32`` / ``bf16`` / ``fp16`` are in-place casts, in that order; ``fp16-cudagraph``
    replays the fp16 UNet's graph; ``compile_mode`` times the fp16 UNet compiled with it)."""
    import torch

    device = ctx.device
    rows, samples, skipped, errors, details = [], {}, {}, {}, {}
    started = time.perf_counter()
    with torch.device(device), torch.random.fork_rng(devices=[]):  # random init on the GPU: seconds
        torch.manual_seed(0)
        unet, tokens = _build_unet(model, ctx.dry_run)
    details["build_s"] = round(time.perf_counter() - started, 2)
    details["params_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
    base = unet_inputs(unet, 2, tokens)
    latent = base["sample"].shape[-1]
    for label in labels:
        if ctx.dry_run and ("fp16" in label or compile_mode):
            skipped[label] = DRY_SKIP
            continue
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[label.split("-")[0]]
        with torch.no_grad():  # cast outside inference mode: the weights stay normal tensors
            torch.nn.Module.to(unet, dtype=dtype)  # not ModelMixin.to: no fp32-module warnings
        inputs = _cast(base, dtype)
        try:
            row = _time_variant(unet, inputs, label, dtype, device, ctx, compile_mode)
        except Exception as e:  # recorded; the variants after it still run (a CUDA error breaks them too)
            traceback.print_exc()
            errors[label] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            continue
        seconds = row.pop("seconds")
        row = _unet_row(model, label, row.pop("dtype"), seconds, row.pop("peak"), device, latent,
                        unet_params_m=details["params_m"], **row)
        rows.append(row)
        samples[row["variant"]] = {"unet_ms": [x * 1000 for x in seconds]}
    details["skipped"] = skipped
    result = {"rows": rows, "samples": samples, "details": details}
    if errors:
        details["errors"] = errors
        result.update(status="error", error="; ".join(f"{k}: {v}" for k, v in errors.items()))
    return result


def add_speedups(rows: list[dict], samples: dict) -> None:
    """``speedup`` (with ``speedup_lo`` / ``_hi``, the gate's bootstrap of medians) of every UNet row
    against the first row of the same model (fp32 for sd15-arch, fp16 for sdxl-arch)."""
    from bench.gate import bootstrap_ratio

    reference: dict[str, dict] = {}
    for row in rows:
        if row.get("scenario") != UNET_SCENARIO:
            continue
        ref = reference.setdefault(row["model"], row)
        a, b = samples.get(row["variant"], {}).get("unet_ms"), samples.get(ref["variant"], {}).get("unet_ms")
        row["speedup_vs"] = ref["variant"]
        if a and b and len(a) >= 2 and len(b) >= 2:
            ratio, lo, hi = bootstrap_ratio(a, b)  # median(ref) / median(row): the speed-up
            row.update(speedup=round(ratio, 3), speedup_lo=round(lo, 3), speedup_hi=round(hi, 3))
        else:
            row["speedup"] = round(b[0] / a[0], 3) if a and b else None


# --------------------------------------------------------------------------- the steps


def step_pytest(ctx, env: dict, timeout: float) -> dict:
    """``pytest -m gpu`` on the test files that hold GPU-marked tests (collecting the whole suite
    costs time, and one module's import error would stop the run); counts from JUnit XML."""
    from xml.etree import ElementTree as ET

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if re.search(r"pytest\.mark\.gpu", p.read_text(encoding="utf-8")))
    if ctx.dry_run:  # the test run stays, shrunk to the GPU test module (everything in it skips)
        files = [f for f in files if f.endswith("test_gpu.py")] or files
    xml = ctx.out / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *files]
    code, output = run_group(cmd, env, timeout)
    if code is None:
        return {"status": "error", "error": f"pytest timed out after {timeout:.0f} s", "output": output}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "ok" if code in (0, 5) else "error"  # 5: nothing collected
    result = {"status": status, "details": {"files": files, "exit_code": code, **counts}, "output": output}
    if status == "error":
        result["error"] = f"pytest exit {code}: {_last_line(output)}"
    return result


def step_sd15_unet(ctx) -> dict:
    return run_unet_variants("sd15-arch", ["fp32", "bf16", "fp16", "fp16-cudagraph"], ctx)


def step_sd15_compile(ctx) -> dict:
    return run_unet_variants("sd15-arch", ["fp16-compile"], ctx, compile_mode="default")


def step_sd15_reduce_overhead(ctx) -> dict:
    return run_unet_variants("sd15-arch", ["fp16-compile-reduce-overhead"], ctx,
                             compile_mode="reduce-overhead")


def step_sdxl_unet(ctx) -> dict:
    return run_unet_variants("sdxl-arch", ["fp16", "bf16"], ctx)


def step_tiny_shapes(ctx) -> dict:
    """tiny-shapes through the benchmark harness (what ``sdwb bench --device cuda`` runs): batch 1
    and 16 interleaved, DDIM 25, guidance 7.5; the judge scores the images. Its own results file is
    kept as ``tiny-shapes-results.json``, its images are not (the device tool brings back 8 files)."""
    from bench.harness import run_bench
    from bench.results import frame_records
    from bench.scenario import bench_config_from_dict

    if ctx.dry_run:
        defaults = {"device": "cpu", "steps": 2, "n_prompts": 2, "warmup": 0, "repeats": 1,
                    "metrics": ["latency", "quality"]}
        batches = (1, 2)
    else:
        defaults = {"device": "cuda", "steps": 25, "n_prompts": 32, "warmup": 2, "repeats": 10,
                    "metrics": ["latency", "memory", "quality"]}
        batches = (1, 16)
    config = bench_config_from_dict({
        "name": "gpu-check-tiny-shapes", "defaults": {"guidance": 7.5, "scheduler": "ddim", **defaults},
        "variants": [{"name": f"tiny-shapes-b{b}", "model": "builtin:tiny-shapes", "batch": b}
                     for b in batches],
    }, "gpu check")
    with tempfile.TemporaryDirectory(prefix="sdwb-gpu-check-") as tmp:  # its images stay behind
        df = run_bench(config, tmp, progress=False, command="tools/gpu_check.py --one tiny-shapes")
        shutil.copyfile(Path(tmp) / "results.json", ctx.out / "tiny-shapes-results.json")
    rows = frame_records(df)
    samples = json.loads((ctx.out / "tiny-shapes-results.json").read_text()).get("samples", {})
    keys = ("batch", "e2e_s_median", "images_per_s", "unet_ms_per_call", "cuda_peak_mb", "clip_score",
            "color_acc", "shape_acc", "position_acc")
    return {"rows": rows, "samples": samples,
            "details": {r["variant"]: {k: r.get(k) for k in keys} for r in rows}}


def _train_row(variant: str, steps: int, seconds: float, batch: int, peak, device: str, **extra) -> dict:
    return {"variant": variant, "model": "builtin:tiny-shapes", "backend": "torch", "dtype": "fp32",
            "batch": batch, "device": device, "scenario": "training", "cuda_peak_mb": peak,
            "optimizer_steps": steps, "train_seconds": round(seconds, 3),
            "optimizer_steps_per_s": round(steps / seconds, 3) if seconds else None, **extra}


def _cuda_peak_reset() -> bool:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _cuda_peak_mb(cuda: bool):
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def step_distill(ctx) -> dict:
    """One progressive round 8 -> 4 steps with guidance distilled in (the hardest round), batch 32
    (``configs/distill/distill4.yaml``'s), on whatever device accelerate picks (CUDA here)."""
    from compress.distill import distill
    from compress.distill_config import parse_distill_config

    if ctx.dry_run:
        settings = {"teacher_steps": 4, "student_steps": 2, "budget": 2, "batch": 2, "latent_pool": 4,
                    "warmup": 1}
    else:
        settings = {"teacher_steps": 8, "student_steps": 4, "budget": 100, "batch": 32, "latent_pool": 256}
    config = parse_distill_config({"guidance_distill": True, "guidance": 4.0, "checkpoint_every": 10_000,
                                   **settings}, "gpu check")
    cuda = _cuda_peak_reset()
    with tempfile.TemporaryDirectory(prefix="sdwb-gpu-check-") as tmp:
        result = distill("builtin:tiny-shapes", config, work_dir=Path(tmp) / "work", progress=False)
    rnd = result.rounds[0]
    row = _train_row("distill-progressive", rnd["optimizer_steps"], rnd["seconds"], config.batch,
                     _cuda_peak_mb(cuda), "cuda" if cuda else "cpu",
                     loss_first=rnd["loss_first"], loss_last=rnd["loss_last"])
    keys = ("optimizer_steps_per_s", "loss_first", "loss_last")
    return {"rows": [row], "details": {k: row[k] for k in keys}}


def step_prune_recovery(ctx) -> dict:
    """Channel pruning 0.3 (magnitude) and recovery by distillation from the unpruned UNet, batch 32
    (``configs/prune/prune30.yaml``'s); steps/s of the recovery loop, distillation MSE before / after."""
    from compress.prune import prune
    from compress.prune_config import parse_prune_config

    steps, batch, pool = (2, 2, 8) if ctx.dry_run else (100, 32, 256)
    config = parse_prune_config({"ratio": 0.3, "data": {"latent_pool": pool},
                                 "finetune": {"steps": steps, "batch": batch, "warmup": min(10, steps),
                                              "checkpoint_every": 10_000, "eval_batches": 1}}, "gpu check")
    cuda = _cuda_peak_reset()
    result = prune("builtin:tiny-shapes", config, progress=False)
    rec = result.metrics["recovery"]
    row = _train_row("prune-recovery", rec["steps"], rec["seconds_this_run"], batch, _cuda_peak_mb(cuda),
                     "cuda" if cuda else "cpu", distill_mse_before=rec["distill_mse_before"],
                     distill_mse_after=rec["distill_mse_after"])
    keys = ("optimizer_steps_per_s", "distill_mse_before", "distill_mse_after")
    return {"rows": [row], "details": {k: row[k] for k in keys}}


CHILD_STEPS = {"sd15-unet": step_sd15_unet, "tiny-shapes": step_tiny_shapes, "distill": step_distill,
               "prune-recovery": step_prune_recovery, "sd15-compile": step_sd15_compile,
               "sdxl-unet": step_sdxl_unet, "sd15-reduce-overhead": step_sd15_reduce_overhead}


def run_child(step: Step, ctx, env: dict, timeout: float) -> dict:
    """``--one STEP`` in a fresh interpreter; its result is the last ``GPU_CHECK_RESULT`` line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", step.name, "-o", str(ctx.out),
           "--calls", str(ctx.calls), "--warmup", str(ctx.warmup)] + (["--dry-run"] if ctx.dry_run else [])
    code, output = run_group(cmd, env, timeout)
    if code is None:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s (what was left of the budget)",
                "output": output}
    lines = output.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(RESULT_MARK):
            rest = "\n".join(lines[:i] + lines[i + 1:])
            return {**json.loads(lines[i][len(RESULT_MARK):]), "output": rest}
    return {"status": "error", "error": f"exit {code}: {_last_line(output)}", "output": output}


def one(name: str, ctx) -> int:
    """In the child: run one step, print its result as the last line."""
    try:
        result = {"status": "ok", **CHILD_STEPS[name](ctx)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------- results files


def write_outputs(out: Path, env: dict, statuses: dict, rows: list[dict], samples: dict, args_record: dict,
                  finished: bool) -> None:
    """environment.json, results.json / .csv (bench's format, plus ``steps``) and summary.md."""
    import pandas as pd

    from bench.results import save_results
    from sdwb.runs import atomic_write_json, atomic_write_text

    atomic_write_json(out / "environment.json", env)
    save_results(pd.DataFrame(rows), env, out, {}, config={"gpu_check": args_record},
                 command="tools/gpu_check.py " + " ".join(sys.argv[1:]), samples=samples)
    data = json.loads((out / "results.json").read_text())
    data.update(steps=statuses, finished=finished)
    atomic_write_json(out / "results.json", data)
    atomic_write_text(out / "summary.md", summary(env, statuses, rows, args_record, finished))


def _fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def _step_text(name: str, st: dict) -> str:
    """One line for the steps table: the error or skip reason, else what the step says in short."""
    if st.get("error") or st.get("reason"):
        return st.get("error") or st.get("reason")
    d = st.get("details") or {}
    if name == "wheels":
        installed, present = len(d.get("installed", [])), len(d.get("present", {}))
        return f"installed {installed} into {d.get('site')}, {present} already present"
    if name == "pytest-gpu":
        return (f"{d.get('passed')} passed, {d.get('failures')} failed, {d.get('errors')} errors, "
                f"{d.get('skipped')} skipped ({', '.join(d.get('files', []))})")
    if d.get("skipped"):
        return "not run: " + ", ".join(f"{k} ({v})" for k, v in d["skipped"].items())
    return "rows below"


def summary(env: dict, statuses: dict, rows: list[dict], args_record: dict, finished: bool) -> str:
    """A short Markdown page: where, each step's status, the UNet table, end to end, training."""
    smi = (env.get("nvidia_smi") or {}).get("gpus") or [{}]
    gpu = env.get("gpu") or {}
    title = "GPU check" + (" (dry run)" if env.get("dry_run") else "") + ("" if finished else " (unfinished)")
    lines = [f"# {title}", "",
             f"- device: {gpu.get('name') or 'no CUDA'}; driver {smi[0].get('driver')}, driver CUDA "
             f"{(env.get('nvidia_smi') or {}).get('driver_cuda')}, torch {env.get('torch')} (CUDA "
             f"{env.get('cuda_runtime')}, cuDNN {env.get('cudnn')})",
             f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} cores); revision {env.get('git_revision')}, "
             f"sources {env.get('source_sha256')}",
             f"- budget {args_record['budget_s']:.0f} s, used {args_record.get('used_s', 0):.0f} s; "
             f"{args_record['calls']} timed calls after {args_record['warmup']} warm-up per UNet variant",
             "", "| step | status | s | result |", "| --- | --- | --- | --- |"]
    for name, st in statuses.items():
        text = _step_text(name, st).replace("|", "/")
        lines.append(f"| {name} | {st['status']} | {_fmt(st.get('seconds'), '.0f')} | {text} |")
    unet = [r for r in rows if r.get("scenario") == UNET_SCENARIO]
    if unet:
        stand_in = " (dry run: tiny stand-in UNets on the CPU)" if env.get("dry_run") else ""
        lines += ["", f"## UNet per call (batch 2 = one image under CFG){stand_in}", "",
                  "| variant | ms/call median [p10-p90] | speed-up [95 % CI] | vs | CUDA peak MB "
                  "| compile s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in unet:
            ci = f" [{r['speedup_lo']:.2f}-{r['speedup_hi']:.2f}]" if r.get("speedup_lo") is not None else ""
            lines.append(f"| {r['variant']} | {r['unet_ms_per_call']:.2f} [{r['unet_ms_p10']:.2f}-"
                         f"{r['unet_ms_p90']:.2f}] | {_fmt(r.get('speedup'), '.2f')}{ci} | "
                         f"{r.get('speedup_vs', '')} | {_fmt(r.get('cuda_peak_mb'), '.0f')} | "
                         f"{_fmt(r.get('compile_s'), '.1f')} |")
    e2e = [r for r in rows if str(r.get("variant", "")).startswith("tiny-shapes-")]
    if e2e:
        lines += ["", "## tiny-shapes end to end (sdwb bench)", "",
                  "| variant | batch | s/image | images/s | UNet ms/call | CUDA peak MB "
                  "| colour / shape / position % | CLIP |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in e2e:
            acc = " / ".join(_fmt(r.get(k) * 100 if r.get(k) is not None else None)
                             for k in ("color_acc", "shape_acc", "position_acc"))
            lines.append(f"| {r['variant']} | {r.get('batch')} | {_fmt(r.get('e2e_s_median'), '.4f')} | "
                         f"{_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('unet_ms_per_call'), '.2f')} | "
                         f"{_fmt(r.get('cuda_peak_mb'), '.0f')} | {acc} | "
                         f"{_fmt(r.get('clip_score'), '.2f')} |")
    train = [r for r in rows if r.get("scenario") == "training"]
    if train:
        lines += ["", "## training on tiny-shapes", "",
                  "| variant | device | batch | steps | steps/s | losses |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in train:
            losses = (f"loss {_fmt(r.get('loss_first'), '.4f')} -> {_fmt(r.get('loss_last'), '.4f')}"
                      if "loss_first" in r else f"distill MSE {_fmt(r.get('distill_mse_before'), '.4g')} -> "
                      f"{_fmt(r.get('distill_mse_after'), '.4g')}")
            lines.append(f"| {r['variant']} | {r['device']} | {r['batch']} | {r['optimizer_steps']} | "
                         f"{_fmt(r.get('optimizer_steps_per_s'), '.2f')} | {losses} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="output folder (default $OUT, else runs/gpu-check)")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for all steps together")
    p.add_argument("--dry-run", action="store_true", help="CPU only, GPU-only parts skipped, seconds in all")
    p.add_argument("--calls", type=int, default=None,
                   help="timed UNet calls per variant (default 20; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed UNet calls first (default 3; dry run 0)")
    p.add_argument("--steps", nargs="+", choices=list(BY_NAME), default=None, help="run only these steps")
    p.add_argument("--pytest-timeout-s", type=float, default=240.0)
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="carried wheels (make gpu-wheels)")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="scratch directory the wheels go to")
    p.add_argument("--one", choices=list(CHILD_STEPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = (args.out or default_out()).resolve()
    args.device = "cpu" if args.dry_run else "cuda"
    args.calls = args.calls if args.calls is not None else (1 if args.dry_run else 20)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.dry_run else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        return one(args.one, args)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    say = Log(args.out / "log.txt")
    say(f"GPU check{' (dry run)' if args.dry_run else ''}: {args.out}, budget {args.budget_s:.0f} s")
    statuses: dict[str, dict] = {}
    t0 = time.monotonic()
    try:
        statuses["wheels"] = install_wheels(args.wheels, args.site, say)
    except Exception as e:  # the steps then say what is missing
        statuses["wheels"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    statuses["wheels"]["seconds"] = round(time.monotonic() - t0, 1)
    say(f"wheels: {statuses['wheels']['status']} {statuses['wheels'].get('reason') or ''}".rstrip())
    import torch

    env = environment_record(args.dry_run)
    cuda = torch.cuda.is_available()
    gpu_name = (env.get("gpu") or {}).get("name") or "none"
    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu_name}; "
        f"revision {env['git_revision']}, sources {env['source_sha256']}")
    record = {"budget_s": args.budget_s, "calls": args.calls, "warmup": args.warmup, "dry_run": args.dry_run}
    rows: list[dict] = []
    samples: dict = {}
    if not cuda and not args.dry_run:
        statuses["cuda"] = {"status": "error", "error": "no CUDA device here (torch.cuda.is_available() is "
                            "False); use --dry-run to exercise the script on a CPU"}
        say("error: " + statuses["cuda"]["error"])
        write_outputs(args.out, env, statuses, rows, samples, record, finished=True)
        return 2
    child = child_env(args.site, args.dry_run)
    budget_start = time.monotonic()
    for step in STEPS:
        if args.steps and step.name not in args.steps:
            continue
        left = args.budget_s - (time.monotonic() - budget_start)
        need = step.dry_s if args.dry_run else step.gpu_s
        if args.dry_run and step.gpu_only:
            statuses[step.name] = {"status": "skipped", "reason": DRY_SKIP}
        elif need > left:
            statuses[step.name] = {"status": "skipped", "reason": f"budget: {left:.0f} s left of "
                                   f"--budget-s {args.budget_s:.0f}, the step needs ~{need:.0f} s"}
        else:
            say(f"== {step.name}: {step.what}")
            t0 = time.monotonic()
            if step.name == "pytest-gpu":
                result = step_pytest(args, child, min(left, args.pytest_timeout_s))
            else:
                result = run_child(step, args, child, max(left, 10.0))
            result["seconds"] = round(time.monotonic() - t0, 1)
            output = result.pop("output", "")
            if output.strip():
                say(output.rstrip())
            rows += result.pop("rows", [])
            samples.update(result.pop("samples", {}))
            statuses[step.name] = result
        st = statuses[step.name]
        say(f"{step.name}: {st['status']}" + "".join(f" ({st[k]})" for k in ("reason", "error") if st.get(k)))
        add_speedups(rows, samples)
        record["used_s"] = round(time.monotonic() - start, 1)
        write_outputs(args.out, env, statuses, rows, samples, record, finished=False)
    record["used_s"] = round(time.monotonic() - start, 1)
    write_outputs(args.out, env, statuses, rows, samples, record, finished=True)
    say((args.out / "summary.md").read_text())
    say(f"done in {record['used_s']:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:  # the script itself broke: say where, exit 1
        traceback.print_exc()
        sys.exit(1)
