"""Latency of real generations, per component, with variants measured interleaved.

What: each timed run is one ``sdwb.generate.generate`` call on ``batch`` prompts (the same code
path as the quality images). While it runs, ``text_encoder.forward``, ``unet.forward`` and
``vae.decode`` are wrapped with timers, so one run yields the end-to-end time and every
component call. Exported pipelines (ONNX Runtime, TensorRT:
:class:`sdwb.backends.onnxruntime.ExportedPipeline`) answer the same call and are timed through
their own hooks (:class:`HookTimer`: each session call of ``text_encoder``, ``unet``,
``vae_decoder``), so the columns mean the same on every backend. Why interleaved: runs go A B A
B ... (after the warm-up runs, also interleaved), so slow drifts of the machine (thermal, a
background job, page cache) hit every variant alike instead of biasing whichever was measured last.

Clocks: on CPU ``time.perf_counter``; on CUDA components are timed with CUDA events (no extra
synchronisation inside the loop) and the end-to-end time with ``torch.cuda.synchronize``
before and after the run. Thread counts are set per run (the scenario's ``threads`` or the
process default at the start of ``measure``) and recorded.

Definitions (per timed run = one pipeline call generating ``batch`` images):
``unet_calls`` = UNet forward calls (diffusers batches the conditional and unconditional
halves of classifier-free guidance into one call, so DDIM gives ``steps`` calls of
``2*batch`` samples when guidance > 1, of ``batch`` otherwise: see ``unet_batch``) that ran the
whole UNet; a DeepCache variant's calls that reused the deep features and ran only the shallow
branch are ``unet_shallow_calls`` (``unet_shallow_ms_per_call`` each), 0 for every other model;
``text_encoder_ms`` / ``unet_ms_per_call`` / ``vae_decode_ms`` are per call, medians over
runs; ``e2e_s_*`` are seconds per image (run time / batch) over runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdwb.cache.config import last_call
from sdwb.errors import SdwbError

# timed name -> the (pipeline attribute, method) pairs it covers (SDXL: both text encoders count as
# text-encoder calls).
COMPONENTS = {"text_encoder": (("text_encoder", "forward"), ("text_encoder_2", "forward")),
              "unet": (("unet", "forward"),), "vae_decode": (("vae", "decode"),)}
_MISSING = object()


class CpuClock:
    """Wall-clock marks from ``time.perf_counter`` (seconds)."""

    def now(self) -> float:
        return time.perf_counter()

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed(self, start: float, end: float) -> float:
        return end - start

    def sync(self) -> None:
        pass


class CudaClock(CpuClock):
    """Component marks are CUDA events; ``now`` synchronises first so wall time covers the GPU."""

    def __init__(self, device=None):
        import torch

        self._torch = torch
        self.device = device

    def now(self) -> float:
        self._torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0

    def sync(self) -> None:
        self._torch.cuda.synchronize(self.device)


def clock_for(device: str):
    """The clock for a device string (``cpu``, ``cuda``, ``cuda:1``)."""
    return CudaClock(device) if str(device).startswith("cuda") else CpuClock()


class ComponentTimer:
    """Wraps the pipeline's component calls with a clock while active (a context manager).

    ``take()`` returns ``{component: [seconds per call, ...]}`` since the last ``take`` and
    resets; the wrappers are removed on exit, leaving the modules as they were.
    """

    def __init__(self, pipe, clock=None, unet_slowdown: float = 0.0):
        self.pipe = pipe
        self.clock = clock or CpuClock()
        self.unet_slowdown = unet_slowdown
        self._marks: list[tuple[str, Any, Any]] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self.unet_batches: list[int] = []  # leading dim of the latents of every UNet call

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if name == "unet":
                sample = args[0] if args else kwargs.get("sample")
                if hasattr(sample, "shape"):
                    self.unet_batches.append(int(sample.shape[0]))
            start = self.clock.mark()
            out = fn(*args, **kwargs)
            if name == "unet" and self.unet_slowdown:
                self.clock.sync()
                busy_wait(self.clock.elapsed(start, self.clock.mark()) * self.unet_slowdown)
            kind = name
            if name == "unet" and last_call(self.pipe) == "shallow":
                kind = "unet_shallow"  # a DeepCache step that reused the deep features
            self._marks.append((kind, start, self.clock.mark()))
            return out

        return timed

    def __enter__(self) -> ComponentTimer:
        for name, targets in COMPONENTS.items():
            for attr, method in targets:
                module = getattr(self.pipe, attr, None)
                if module is None:
                    continue
                self._saved.append((module, method, module.__dict__.get(method, _MISSING)))
                setattr(module, method, self._wrap(name, getattr(module, method)))
        return self

    def __exit__(self, *exc) -> None:
        for module, method, previous in reversed(self._saved):
            if previous is _MISSING:
                module.__dict__.pop(method, None)
            else:
                setattr(module, method, previous)
        self._saved.clear()

    def take(self) -> dict[str, list[float]]:
        self.clock.sync()
        out: dict[str, list[float]] = {name: [] for name in COMPONENTS}
        for name, start, end in self._marks:
            out.setdefault(name, []).append(self.clock.elapsed(start, end))
        self._marks.clear()
        return out

    def take_unet_batch(self) -> int | None:
        """The (largest) number of latents per UNet call since the last call; resets."""
        batch = max(self.unet_batches, default=None)
        self.unet_batches.clear()
        return batch


class HookTimer:
    """:class:`ComponentTimer` for exported pipelines: listens to ``pipe.hooks`` while active.

    The pipeline reports ``(component, seconds)`` per session call (synchronised on CUDA) and
    ``pipe.last_batch`` gives the call's batch; ``vae_decoder`` is reported as ``vae_decode``.
    """

    NAMES = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae_decode"}

    def __init__(self, pipe, clock=None, unet_slowdown: float = 0.0):
        self.pipe = pipe
        self.clock = clock or CpuClock()
        self.unet_slowdown = unet_slowdown
        self._calls: dict[str, list[float]] = {name: [] for name in COMPONENTS}
        self.unet_batches: list[int] = []

    def _hook(self, component: str, seconds: float) -> None:
        name = self.NAMES.get(component)
        if name is None:
            return
        if name == "unet" and self.unet_slowdown:
            busy_wait(seconds * self.unet_slowdown)
            seconds *= 1 + self.unet_slowdown
        self._calls[name].append(seconds)
        if name == "unet" and component in self.pipe.last_batch:
            self.unet_batches.append(self.pipe.last_batch[component])

    def __enter__(self) -> HookTimer:
        self.pipe.hooks.append(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook in self.pipe.hooks:
            self.pipe.hooks.remove(self._hook)

    def take(self) -> dict[str, list[float]]:
        out, self._calls = self._calls, {name: [] for name in COMPONENTS}
        return out

    take_unet_batch = ComponentTimer.take_unet_batch


def is_exported(pipe) -> bool:
    """True for an exported pipeline (ONNX Runtime / TensorRT), False for a diffusers one."""
    return hasattr(pipe, "record_timings") and hasattr(pipe, "hooks")


def busy_wait(seconds: float) -> None:
    """Spin (not sleep) for ``seconds``: an injected slowdown that holds a core like real work."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timer_for(pipe, clock=None, unet_slowdown: float = 0.0):
    """The component timer that fits ``pipe``'s kind."""
    cls = HookTimer if is_exported(pipe) else ComponentTimer
    return cls(pipe, clock, unet_slowdown=unet_slowdown)


@dataclass
class RunTiming:
    """One timed run of one variant."""

    variant: str
    order: int  # position in the interleaved sequence of timed runs (0, 1, 2, ...)
    repeat: int
    images: int
    e2e_s: float
    threads: int
    calls: dict[str, list[float]] = field(default_factory=dict)  # component -> seconds per call
    unet_batch: int | None = None  # latents per UNet call (2*batch with guidance)


def interleaved_schedule(scenarios) -> list[tuple[str, str, int]]:
    """``(variant, "warmup"|"timed", index)`` in run order: round r runs every variant once."""
    plan: list[tuple[str, str, int]] = []
    for phase, count in (("warmup", "warmup"), ("timed", "repeats")):
        for r in range(max((getattr(s, count) for s in scenarios), default=0)):
            plan += [(s.variant, phase, r) for s in scenarios if r < getattr(s, count)]
    return plan


def timed_run(pipe, scenario, prompts: list[str], clock=None, threads: int | None = None,
              generate_fn: Callable | None = None) -> tuple[float, int, dict[str, list[float]], int | None]:
    """One batch with the component timers on: ``(seconds, threads, calls, latents per UNet call)``.

    ``threads`` sets torch's intra-op threads for the run; an ONNX Runtime pipeline's sessions
    were opened with the scenario's threads (see ``bench.harness``), which is what is returned.
    """
    import torch

    if generate_fn is None:  # every backend's pipeline answers the same call
        from sdwb.generate import generate as generate_fn
    clock = clock or clock_for(scenario.device)
    if threads is not None:
        torch.set_num_threads(threads)
    with timer_for(pipe, clock, unet_slowdown=getattr(scenario, "unet_slowdown", 0.0)) as timer:
        start = clock.now()
        generate_fn(pipe, prompts, steps=scenario.steps, guidance=scenario.guidance, seed=scenario.seed,
                    scheduler=scenario.scheduler, batch=scenario.batch, height=scenario.height,
                    width=scenario.width, progress=False)
        seconds = clock.now() - start
        calls = timer.take()
        unet_batch = timer.take_unet_batch()
    ort_threads = getattr(pipe, "info", {}).get("intra_op_num_threads") if is_exported(pipe) else None
    return seconds, ort_threads or torch.get_num_threads(), calls, unet_batch


def batch_prompts(prompts: list[str], batch: int, index: int) -> list[str]:
    """The ``batch`` prompts of run ``index``, rotating through the prompt list."""
    return [prompts[(index * batch + j) % len(prompts)] for j in range(batch)]


def measure(pipes_by_variant: dict[str, Any], scenarios, prompts_by_variant: dict[str, list[str]],
            *, on_run: Callable[[str, str, RunTiming | None], None] | None = None,
            run_fn: Callable | None = None) -> dict[str, list[RunTiming]]:
    """Warm up, then time every scenario's repeats interleaved; ``{variant: [RunTiming]}``.

    ``on_run(variant, phase, timing)`` is called after every run (``timing`` None in warm-up);
    ``run_fn`` replaces :func:`timed_run` (tests). Thread counts are restored afterwards.
    """
    import torch

    run_fn = run_fn or timed_run
    default_threads = torch.get_num_threads()
    by_name = {s.variant: s for s in scenarios}
    results: dict[str, list[RunTiming]] = {s.variant: [] for s in scenarios}
    order = 0
    try:
        for variant, phase, index in interleaved_schedule(scenarios):
            s = by_name[variant]
            prompts = batch_prompts(prompts_by_variant[variant], s.batch, index)
            try:
                seconds, threads, calls, unet_batch = run_fn(pipes_by_variant[variant], s, prompts,
                                                             threads=s.threads or default_threads)
            except SdwbError as e:
                raise SdwbError(f"variant {variant}: {e}") from None
            timing = None
            if phase == "timed":
                timing = RunTiming(variant, order, index, len(prompts), seconds, threads, calls, unet_batch)
                results[variant].append(timing)
                order += 1
            if on_run:
                on_run(variant, phase, timing)
    finally:
        torch.set_num_threads(default_threads)
    return results


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(timings: list[RunTiming]) -> dict[str, Any]:
    """The latency columns of one variant from its timed runs (empty dict when none)."""
    if not timings:
        return {}
    per_image = np.array([t.e2e_s / t.images for t in timings])
    median = float(np.median(per_image))

    def per_call_ms(name: str) -> float | None:
        return _median([1000 * float(np.mean(t.calls[name])) if t.calls.get(name) else None
                        for t in timings])

    unet_calls = _median([len(t.calls.get("unet", [])) for t in timings])
    shallow_calls = _median([len(t.calls.get("unet_shallow", [])) for t in timings])
    te_calls = _median([len(t.calls.get("text_encoder", [])) for t in timings])
    vae_calls = _median([len(t.calls.get("vae_decode", [])) for t in timings])
    return {
        "e2e_s_median": median,
        "e2e_s_p10": float(np.percentile(per_image, 10)),
        "e2e_s_p90": float(np.percentile(per_image, 90)),
        "images_per_s": 1.0 / median if median > 0 else None,
        "text_encoder_ms": per_call_ms("text_encoder"),
        "unet_ms_per_call": per_call_ms("unet"),
        "unet_calls": int(round(unet_calls)) if unet_calls is not None else None,
        "unet_shallow_calls": int(round(shallow_calls)) if shallow_calls is not None else None,
        "unet_shallow_ms_per_call": per_call_ms("unet_shallow"),
        "vae_decode_ms": per_call_ms("vae_decode"),
        "text_encoder_calls": int(round(te_calls)) if te_calls is not None else None,
        "vae_decode_calls": int(round(vae_calls)) if vae_calls is not None else None,
        "unet_batch": timings[0].unet_batch,
        "threads": timings[0].threads,
        "timed_runs": len(timings),
    }


def run_samples(timings: list[RunTiming]) -> dict[str, list[float]]:
    """One variant's per-run numbers, what ``sdwb gate`` resamples: ``e2e_s`` (seconds per image
    of every timed run) and ``unet_ms`` (mean UNet call of every run that made one)."""
    return {
        "e2e_s": [t.e2e_s / t.images for t in timings],
        "unet_ms": [1000 * float(np.mean(t.calls["unet"])) for t in timings if t.calls.get("unet")],
    }


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(threads)`` (None: unchanged); yields the count."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
