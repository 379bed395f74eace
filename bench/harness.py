"""``run_bench``: load every variant once, then images, latency, memory and quality -> results.

Order and why: (0) the exports that ``onnxruntime`` rows need are made (see below); (1) every
model is loaded first, so a missing or broken model fails before any time is spent; (2) the
quality images (all prompts, ``images/<variant>/<i>.png``) are generated
next, which also warms every variant up; (3) latency runs interleaved across variants
(:mod:`bench.latency`); (4) memory runs each variant in a fresh subprocess
(:mod:`bench.memory`), after latency so the probes never compete with timed runs, and after the
loaded pipelines are dropped so the probes get their RAM (sd15-arch); (5) quality
scores the saved images (``bench.quality.compute_quality``): the judge and the expected
attributes for the shapes prompts, the rendered data-set images as the CMMD reference (the
baseline's images otherwise) and the baseline variant's images for PSNR/SSIM. Quality stays
empty for models where it means nothing (``builtin:sd15-arch``).

Backends: ``torch`` rows load a diffusers pipeline. ``onnxruntime`` rows take an ONNX export
directory, or a torch model spec that is exported once into ``OUT/exports/<variant>/`` before
anything is measured (validated against PyTorch, reused on the next run while its manifest
still verifies and names the same source content: :func:`sdwb.backends.registry.ensure_export`); the
sessions run with ``threads`` intra-op threads (the scenario's, else torch's default, recorded
either way) on the CPU provider (CUDA then CPU for ``device: cuda``). ``tensorrt`` rows take an
engine directory and need a GPU: without one they fail in the preflight with the runner's
one-line reason. Exported rows generate the same prompts with the same seeds (so PSNR/SSIM
against a torch baseline row compare the same images), are timed per component through the
pipeline's hooks, and their memory probe opens the exported pipeline in a fresh process. Their
``size_mb`` is the graph files and ``params_m`` the ONNX initializers (see
:mod:`sdwb.backends.registry`); ``unet_gmacs`` is counted on the source torch UNet (same graph).
Every row says what its variant is (:mod:`bench.variant_info`, from its records and file headers):
``method`` ("prune channels 0.3 → ONNX → ort-int8-static (UNet)"), ``precision`` ("UNet int8 (W8A8
static), rest fp32"; ``dtype`` is only what the pipeline runs in) and ``weights_dtype`` (what the
files ``size_mb`` counts store: "fp16", "UNet fp32, rest fp16").
Extra columns: ``providers``, ``export_dir``, ``export_reused`` and, for an export made by
this run, ``export_s`` and ``export_peak_rss_mb`` (the export runs as ``sdwb export onnx`` in a
fresh process, so this is that command's peak RSS, and the benchmark never holds its memory).

``compile: true`` on a torch row (``compile_mode`` default | reduce-overhead | max-autotune |
max-autotune-no-cudagraphs): the row loads its own copy of the pipeline, whose UNet is compiled
by inductor (:mod:`sdwb.torch_compile`) and warmed by one untimed call right after loading
(:func:`_compile`), so no timed run and no image pays the compile; that first call's time is the
row's ``compile_s``. Rows record ``compile`` and ``compile_mode``; the memory probe compiles too.

After every phase the rows so far are saved as ``results.partial.*`` (images under
``images.partial/``); an error or Ctrl-C saves them too and re-raises. Only a finished run swaps
``images.partial/`` in as ``images/`` and writes ``results.csv``/``results.json`` and
``config.resolved.yaml``, so the files of an earlier complete run in the same directory stay
intact and consistent until a new run has finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from bench.scenario import SHAPES_EVAL, SUPPORTED_BACKENDS, BenchConfig, Scenario, load_prompts, resolved_dict
from sdwb.errors import SdwbError

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMAGES, PARTIAL_IMAGES = "images", "images.partial"
NOT_APPLICABLE = "not applicable: {model} has random weights"


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def preflight(scenarios: list[Scenario]) -> list[Scenario]:
    """Check what can be checked before loading anything; resolve ``device: auto`` and, for
    ONNX Runtime rows, ``threads`` (torch's default when unset, so it is the recorded count)."""
    import torch

    out = []
    for s in scenarios:
        if s.backend not in SUPPORTED_BACKENDS:
            raise SdwbError(f"variant {s.variant}: backend {s.backend} is not supported yet "
                            f"(supported: {', '.join(SUPPORTED_BACKENDS)})")
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SdwbError(f"variant {s.variant}: device cuda requested but CUDA is not available here")
        update = {"device": device}
        if s.model.startswith("recipe:"):  # resolved by the application layer before a bench
            raise SdwbError(f"variant {s.variant}: {s.model}: a recipe model is resolved by `sdwb bench` / "
                            "`sdwb run`, not by the benchmark harness")
        if s.lora is not None:
            from sdwb.lora import check_backend

            check_backend(s.backend, f"variant {s.variant}: lora")
        if s.backend in ("onnxruntime", "openvino"):  # the runtime's threads: recorded, never "default"
            update["threads"] = s.threads or torch.get_num_threads()
        out.append(s.model_copy(update=update))
    from sdwb.loading import resolve_spec

    for s in out:
        try:
            if s.backend == "torch" or not _is_export_of(s):
                resolve_spec(s.model, "pipeline")
        except SdwbError as e:
            raise SdwbError(f"variant {s.variant}: {e}") from None
    _check_compilable(out)
    for judge in sorted({s.judge for s in out if "quality" in s.metrics and s.quality_applies}):
        try:
            resolve_spec(judge, "judge")
        except SdwbError as e:
            raise SdwbError(f"judge: {e} (or leave quality out: metrics latency,memory)") from None
    return out


def _is_export_of(s: Scenario) -> bool:
    """For an exported backend: True when ``s.model`` is already what it runs; False when it is a
    torch spec to export to ONNX first (onnxruntime, openvino). Wrong combinations are one-line
    errors."""
    from sdwb.backends.registry import TABLE, check_model, manifest_format

    row = TABLE[s.backend]
    if s.backend != "tensorrt" and s.dtype not in row.dtypes:
        raise SdwbError(f"variant {s.variant}: dtype {s.dtype} with backend {s.backend}: expected "
                        f"{' or '.join(row.dtypes)} (exports are fp32 graphs)")
    found = manifest_format(s.model)
    if row.exports_spec and found is None:
        from sdwb.cache.config import refuse_cache_variant

        try:
            refuse_cache_variant(s.model, f"backend {s.backend}")
        except SdwbError as e:
            raise SdwbError(f"variant {s.variant}: {e}") from None
        return False  # a torch model spec: exported into OUT/exports/<variant>/ by _prepare
    try:
        check_model(s.backend, s.model, flag="model")
    except SdwbError as e:
        raise SdwbError(f"variant {s.variant}: {e}") from None
    return True


class _Bars:
    """A rich progress display with one bar per phase, or nothing when disabled."""

    def __init__(self, progress):
        self.progress = progress

    def task(self, description: str, total: int):
        if self.progress is None:
            return lambda n=1: None
        task = self.progress.add_task(description, total=total)
        return lambda n=1: self.progress.advance(task, n)


@contextlib.contextmanager
def _bars(enabled: bool) -> Iterator[_Bars]:
    if not enabled:
        yield _Bars(None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from sdwb.progress import make_progress

    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with make_progress(*columns) as progress:
        yield _Bars(progress)


class _Run:
    """The state of one benchmark run: rows so far, images, where to save."""

    def __init__(self, config: BenchConfig, scenarios: list[Scenario], out_dir: Path, command: str | None):
        from bench.results import environment

        self.config, self.scenarios, self.out, self.command = config, scenarios, out_dir, command
        self.env = environment()
        from bench.distributed import world_size

        if world_size() > 1:  # accelerate launch: images made by N processes, all else by this one
            self.env["image_processes"] = world_size()
        self.rows: dict[str, dict[str, Any]] = {s.variant: _scenario_columns(s) for s in scenarios}
        self.images: dict[str, list] = {}
        self.prompts: list[str] = []  # of the images (the first imaged variant's; usually shared)
        self.image_files: dict[str, list[str]] = {}
        self.timings: dict[str, list] = {}
        self.model_dirs: dict[str, Path] = {}  # exported rows: the export / engine directory run

    def frame(self) -> pd.DataFrame:
        from bench.latency import summarize
        from bench.results import results_frame

        for variant, timings in self.timings.items():
            self.rows[variant].update(summarize(timings))
        return results_frame(list(self.rows.values()))

    def samples(self) -> dict[str, dict[str, list[float]]]:
        """Per-run numbers of every timed variant (what a gate resamples)."""
        from bench.latency import run_samples

        return {variant: run_samples(timings) for variant, timings in self.timings.items() if timings}

    def save(self, partial: bool) -> pd.DataFrame:
        from bench.results import save_results

        df = self.frame()
        save_results(df, self.env, self.out, self.image_files, config=resolved_dict(self.config),
                     command=self.command, prompts=self.prompts, partial=partial, samples=self.samples())
        return df


def _scenario_columns(s: Scenario) -> dict[str, Any]:
    keys = ("variant", "model", "backend", "dtype", "steps", "guidance", "batch", "scenario", "base_variant",
            "baseline", "device", "threads", "scheduler", "height", "width", "prompts", "n_prompts", "seed",
            "warmup", "repeats", "compile")
    import torch

    row = {k: getattr(s, k) for k in keys}
    row["compile_mode"] = s.compile_mode if s.compile else None
    if s.unet_slowdown:
        row["unet_slowdown"] = s.unet_slowdown  # an injected slowdown is never a silent one
    row["threads"] = s.threads or torch.get_num_threads()
    return row


def run_bench(config: BenchConfig, out_dir: str | Path, progress: bool = True,
              command: str | None = None) -> pd.DataFrame | None:
    """Run every scenario of ``config``; write results, images and the resolved config to ``out_dir``.

    Under ``accelerate launch --num_processes N`` the quality images are shared out
    (:mod:`bench.distributed`); the main process returns the results, the others None."""
    from bench import distributed
    from sdwb.runs import write_resolved_config

    scenarios = preflight(config.scenarios())
    out, main = Path(out_dir), distributed.is_main()
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SdwbError(f"{out}: cannot create the output directory: {e.strerror or e}") from None
        shutil.rmtree(out / PARTIAL_IMAGES, ignore_errors=True)  # left by an interrupted run
    prompts = {s.variant: load_prompts(s) for s in scenarios}
    run = _Run(config, scenarios, out, command)
    try:
        with _bars(progress and main) as bars:
            if main:
                _prepare(run, bars)
            distributed.wait()  # under accelerate launch the other processes reuse these exports
            if not main:
                _prepare(run, bars)
            pipes = _load(run, bars)
            _compile(run, pipes, prompts, bars)
            _images(run, pipes, prompts, bars)
            if not main:  # its share of the images is with the main process, which does the rest
                return None
            run.save(partial=True)
            _latency(run, pipes, prompts, bars)
            _runtime_compile_columns(run, pipes)
            _edits(run, pipes, bars)
            run.save(partial=True)
            _release(pipes)  # the probes' fresh processes get the RAM the loaded variants held
            _memory(run, bars)
            run.save(partial=True)
            _quality(run, prompts, bars)
    except BaseException:
        if main:
            with contextlib.suppress(Exception):
                run.save(partial=True)
        raise
    _swap_images(run)
    write_resolved_config(out, {**resolved_dict(config), "scenarios": [s.model_dump() for s in scenarios]})
    return run.save(partial=False)


def _swap_images(run: _Run) -> None:
    """Move ``images.partial/`` into place as ``images/`` (the old one is deleted after)."""
    partial, final = run.out / PARTIAL_IMAGES, run.out / IMAGES
    if not partial.exists():
        return
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix="images.old-", dir=run.out))
        os.replace(final, old / IMAGES)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prefix = PARTIAL_IMAGES + "/"
    run.image_files = {v: [IMAGES + "/" + f[len(prefix):] if f.startswith(prefix) else f for f in files]
                       for v, files in run.image_files.items()}


def _prepare(run: _Run, bars: _Bars) -> None:
    """Exported rows: the directory each runs; torch specs under onnxruntime / openvino are exported
    to ONNX once per spec into ``OUT/exports/<variant>/`` (before any model is loaded, so the export
    has the RAM); OpenVINO reads that ONNX export as it is."""
    from sdwb.backends.registry import ensure_export
    from sdwb.cache.config import refuse_cache_variant
    from sdwb.loading import spec_digest

    for s in run.scenarios:
        if "edit" in s.metrics and s.backend == "torch":
            refuse_cache_variant(s.model, f"variant {s.variant}: metric edit")
    todo = [s for s in run.scenarios if s.backend != "torch"]
    if not todo:
        return
    exported: dict[tuple[str, int, bool], dict] = {}  # (spec, max_batch, encoder) -> ensure_export's result
    advance = bars.task("exporting", len(todo))
    for s in todo:
        encoder = "edit" in s.metrics  # img2img / inpainting encode the input image
        if _is_export_of(s):
            run.model_dirs[s.variant] = Path(s.model).expanduser()
            if encoder:
                _check_encoder(s)
        else:
            key = (s.model, max(8, s.batch), encoder)
            if key not in exported:
                try:
                    exported[key] = ensure_export(s.model, run.out / "exports" / s.variant, max_batch=key[1],
                                                  encoder=encoder)
                except SdwbError as e:
                    raise SdwbError(f"variant {s.variant}: export of {s.model}: {e}") from None
            result = exported[key]
            run.model_dirs[s.variant] = result["dir"]
            run.rows[s.variant].update({f"export_{k}" if k == "reused" else k: v
                                        for k, v in result.items() if k != "dir"})
            # the row's weights_sha256 names this export; this names the model it was exported from
            run.rows[s.variant]["source_weights_sha256"] = spec_digest(s.model)
        advance()


def _check_encoder(s: Scenario) -> None:
    """Metric edit on an export directory: it must hold the VAE encoder (before any work)."""
    from sdwb.variants.manifest import EXPORT_FORMAT, manifest_format, read_manifest

    path = Path(s.model).expanduser()  # an ONNX export or an OpenVINO IR: each in its own format
    manifest = read_manifest(path, manifest_format(path) or EXPORT_FORMAT)
    if "vae_encoder" not in (manifest.get("components") or {}):
        raise SdwbError(f"variant {s.variant}: metric edit needs the VAE encoder, which {s.model} lacks "
                        "(export with --components text_encoder,unet,vae_decoder,vae_encoder)")


def _load(run: _Run, bars: _Bars) -> dict[str, Any]:
    """Load each distinct (backend, model, dtype, device, threads) once; fill the static columns."""
    from bench.distributed import device_for
    from bench.memory import param_counts, size_on_disk_mb
    from sdwb.loading import load_pipeline, resolve_spec

    cache: dict[tuple, Any] = {}
    pipes: dict[str, Any] = {}
    advance = bars.task("loading", len(run.scenarios))
    for s in run.scenarios:
        if s.backend != "torch":
            pipes[s.variant] = _load_exported(run, s, cache)
            advance()
            continue
        key = (s.model, s.dtype, s.device, s.lora, s.lora_scale) + ((s.variant,) if s.compile else ())
        if key not in cache:  # a compiled row gets its own copy
            try:
                cache[key] = load_pipeline(s.model, device=device_for(s.device), dtype=torch_dtype(s.dtype),
                                           lora=s.lora, lora_scale=s.lora_scale)
            except SdwbError as e:
                raise SdwbError(f"variant {s.variant}: {e}") from None
            cache[key].set_progress_bar_config(disable=True)
        pipe = pipes[s.variant] = cache[key]
        row = run.rows[s.variant]
        row.update(param_counts(pipe))
        row["size_mb"] = size_on_disk_mb(s.model)
        row.update(_variant_columns(s, resolve_spec(s.model, "pipeline")))
        if getattr(pipe, "sdwb_lora", None) is not None:  # which adapter, by hash, at what scale
            row.update(lora=s.lora, lora_sha256=pipe.sdwb_lora["sha256"], lora_scale=s.lora_scale)
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        default = (default, default) if isinstance(default, int) else default
        row["height"], row["width"] = s.height or default[0], s.width or default[1]
        advance()
    return pipes


def _load_exported(run: _Run, s: Scenario, cache: dict[tuple, Any]):
    """Open an ONNX Runtime / OpenVINO / TensorRT pipeline (hashes verified); fill its static columns."""
    from sdwb.backends.registry import exported_param_counts, exported_size_mb, graph_files, open_exported

    directory = run.model_dirs[s.variant]
    key = (s.backend, str(directory.resolve()), s.device, s.threads, s.dtype)
    if key not in cache:
        try:
            cache[key] = open_exported(s.backend, directory, device=s.device, threads=s.threads,
                                       dtype=s.dtype)
        except SdwbError as e:
            raise SdwbError(f"variant {s.variant}: {e}") from None
    pipe = cache[key]
    if s.backend == "tensorrt":  # the engines' precision was fixed at build time: the row must say it
        fp16 = any(e.get("precision", {}).get("fp16") for e in pipe.manifest["components"].values())
        if s.dtype != ("fp16" if fp16 else "fp32"):
            raise SdwbError(f"variant {s.variant}: dtype {s.dtype}, but the engines in {directory} are "
                            f"{'fp16' if fp16 else 'fp32'} (set the variant's dtype to match)")
    row = run.rows[s.variant]
    if s.backend == "onnxruntime":
        row.update(exported_param_counts(directory, pipe.manifest))
        row["providers"] = ",".join(pipe.info.get("providers", []))
    if s.backend == "openvino":
        row.update(exported_param_counts(directory, pipe.manifest))
        row["providers"] = f"openvino-{pipe.info['openvino'].split('-')[0]} CPU {pipe.info['precision']}"
    row["size_mb"] = exported_size_mb(directory, pipe.manifest)
    row.update(_variant_columns(s, directory, graph_files(directory, pipe.manifest)))
    row["export_dir"] = _relative(directory, run.out)
    side = pipe.facts["sample_size"] * pipe.facts["vae_scale_factor"]
    row["height"], row["width"] = s.height or side, s.width or side
    return pipe


def _variant_columns(s: Scenario, directory: Path | None, files: list[Path] | None = None) -> dict[str, Any]:
    """``method`` (the stages that made the variant, from its records), ``precision`` (what it
    computes in) and ``weights_dtype`` (what its weight files store, the files ``size_mb``
    counts): :mod:`bench.variant_info`, read from the files without loading anything."""
    from bench.variant_info import row_fields
    from sdwb.variants.files import weight_files

    if files is None and directory is not None and directory.is_dir():
        files = weight_files(directory)
    row = row_fields(directory, files, backend=s.backend, dtype=s.dtype,
                     compile_mode=s.compile_mode if s.compile else None)
    return {**row, **identity_columns(directory, files)}


def identity_columns(directory: Path | None, files: list[Path] | None) -> dict[str, Any]:
    """Which weights a row measured: ``weights_sha256`` (one digest of its weight files, the files
    ``size_mb`` counts; "built in code" for sd15-arch / sdxl-arch) and ``lineage`` (each ancestor in
    its records, newest first: ``stage method <- parent spec [the parent's weights_sha256]``; records
    written before parents were hashed fall back to ``{files ...}``, the digest of the files the
    parent's own record lists, and name no digest for a builtin parent)."""
    from sdwb.variants.files import BUILT_IN_CODE, record_digest, weights_digest
    from sdwb.variants.record import ancestry, read_record

    if directory is None or not files:
        return {"weights_sha256": BUILT_IN_CODE if directory is None else None, "lineage": None}
    lineage = []
    for record in ancestry(read_record(directory) if directory.is_dir() else None):
        if not record.get("parent"):  # the root: a model trained from scratch (a builtin's record)
            lineage.append(f"{record.get('stage')} (trained, no parent)")
            continue
        parent = record["parent"]
        digest = parent.get("weights_sha256")
        if digest:
            named = f" [{digest[:12]}]"
        else:
            old = record_digest(parent.get("variant"))
            named = f" {{files {old[:12]}}}" if old else ""
        lineage.append(f"{record.get('stage')} {record.get('method')} <- {parent.get('spec')}{named}")
    return {"weights_sha256": weights_digest(directory, files), "lineage": " | ".join(lineage) or None}


def _check_compilable(scenarios: list[Scenario]) -> None:
    """Rows with ``compile: true``: inductor must be able to build kernels for their device."""
    from sdwb.torch_compile import check_compile

    for s in scenarios:
        if s.compile:
            try:
                check_compile(s.device)
            except SdwbError as e:
                raise SdwbError(f"variant {s.variant}: {e}") from None


def _compile(run: _Run, pipes: dict, prompts: dict, bars: _Bars) -> None:
    """Compiled torch rows (``compile: true``, each with its own loaded pipeline): the UNet is
    wrapped by :func:`sdwb.torch_compile.compile_unet` and warmed by one untimed generation at the
    row's own batch, size, steps, guidance, scheduler and threads, so the compile lands in neither
    the images nor the timed runs (the ``warmup`` runs come on top). ``compile_s`` is the wall
    time of that first call: the compile plus one denoising run of ``batch`` prompts (text
    encoder, ``steps`` UNet calls, VAE decode), reported as it is, nothing subtracted. It is what
    this row paid: a row whose graph this process already compiled (same UNet architecture,
    dtype and shapes: dynamo reuses it across instances) or inductor's disk cache holds pays less."""
    from bench.latency import batch_prompts, clock_for, fixed_threads
    from sdwb.generate import generate
    from sdwb.torch_compile import compile_unet

    todo = [s for s in run.scenarios if s.backend == "torch" and s.compile]
    advance = bars.task("compiling", len(todo)) if todo else None
    for s in todo:
        pipe, clock = compile_unet(pipes[s.variant], s.compile_mode), clock_for(s.device)
        with fixed_threads(s.threads):  # inductor's CPU kernels keep the thread count they are built with
            start = clock.now()
            try:
                generate(pipe, batch_prompts(prompts[s.variant][0], s.batch, 0), steps=s.steps,
                         guidance=s.guidance, seed=s.seed, scheduler=s.scheduler, batch=s.batch,
                         height=s.height, width=s.width, progress=False)
            except SdwbError as e:
                raise SdwbError(f"variant {s.variant}: {e}") from None
            except Exception as e:  # inductor / dynamo failures are long multi-line reports
                first = (str(e).strip().splitlines() or [""])[0]
                raise SdwbError(f"variant {s.variant}: torch.compile (mode {s.compile_mode}) failed: "
                                f"{type(e).__name__}: {first}") from None
            run.rows[s.variant]["compile_s"] = round(clock.now() - start, 3)
        advance()


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (portable results), else as given."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _images(run: _Run, pipes: dict, prompts: dict, bars: _Bars) -> None:
    """Generate and save every prompt's image for the variants that measure quality.

    Under ``accelerate launch`` each process generates its share of the ``batch``-sized prompt
    chunks (an image is computed as in one process: same chunk, same seed) and the main process
    gathers and saves them all (:mod:`bench.distributed`)."""
    from bench import distributed
    from bench.latency import fixed_threads
    from sdwb.generate import generate
    from sdwb.runs import atomic_save_image

    todo = [s for s in run.scenarios if "quality" in s.metrics]
    advance = bars.task("images", sum(len(prompts[s.variant][0]) for s in todo))
    processes = distributed.world_size()
    for s in todo:
        texts = prompts[s.variant][0]
        row = run.rows[s.variant]
        row["n_prompts"] = len(texts)
        if processes > 1:
            row["image_processes"] = processes
        starts = list(range(0, len(texts), s.batch))
        mine: list[tuple[int, Any]] = []
        with fixed_threads(s.threads):
            for start in (starts[i] for i in distributed.share(len(starts))):
                chunk = texts[start : start + s.batch]
                try:
                    out = generate(pipes[s.variant], chunk, steps=s.steps, guidance=s.guidance,
                                   seed=s.seed + start, scheduler=s.scheduler, batch=s.batch,
                                   height=s.height, width=s.width, progress=False)
                except SdwbError as e:
                    raise SdwbError(f"variant {s.variant}: {e}") from None
                mine += [(start + j, image) for j, image in enumerate(out)]
                advance(len(chunk))
        gathered = sorted(distributed.gather(mine), key=lambda pair: pair[0])
        advance(len(gathered) - len(mine))
        if not distributed.is_main():
            continue
        images = [image for _, image in gathered]
        files = []
        for i, image in enumerate(images):
            rel = f"{PARTIAL_IMAGES}/{s.variant}/{i:03d}.png"
            atomic_save_image(image, run.out / rel)
            files.append(rel)
        run.images[s.variant], run.image_files[s.variant] = images, files
        if not run.prompts:
            run.prompts = list(texts)


def _latency(run: _Run, pipes: dict, prompts: dict, bars: _Bars) -> None:
    """Warm-up and timed runs, interleaved across the variants that measure latency."""
    from bench.latency import interleaved_schedule, measure

    todo = [s for s in run.scenarios if "latency" in s.metrics]
    if not todo:
        return
    advance = bars.task("latency", len(interleaved_schedule(todo)))
    for s in todo:
        run.timings[s.variant] = []

    def on_run(variant, phase, timing):
        if timing is not None:
            run.timings[variant].append(timing)
        advance()

    try:
        measure(pipes, todo, {v: p[0] for v, p in prompts.items()}, on_run=on_run)
    except SdwbError as e:
        raise SdwbError(f"latency: {e}") from None


def _edits(run: _Run, pipes: dict, bars: _Bars) -> None:
    """Metric edit: the first ``n_edits`` cases of builtin:shapes-edit (img2img of colour, shape and
    position, and inpainting) at ``edit_strength``, scored by the judge (:mod:`sdwb.shapes_edit`);
    ``s_per_edit`` is their mean wall time with a 95 % bootstrap interval over the edits (one run
    each, in sequence: not the interleaved latency protocol)."""
    import time

    from bench.latency import fixed_threads
    from sdwb.edit import edit
    from sdwb.judge import bootstrap_interval, load_judge
    from sdwb.shapes_edit import edit_cases, score_edits

    todo = [s for s in run.scenarios if "edit" in s.metrics]
    if not todo:
        return
    advance = bars.task("edits", sum(s.n_edits for s in todo))
    judges: dict[str, Any] = {}
    for s in todo:
        cases = edit_cases(s.n_edits)
        images, seconds = [], []
        with fixed_threads(s.threads):
            for case in cases:
                started = time.perf_counter()
                try:
                    images += edit(pipes[s.variant], case.image(), [case.prompt], strength=s.edit_strength,
                                   mask=case.mask(), steps=s.steps, guidance=s.guidance,
                                   seed=s.seed + case.index, scheduler=s.scheduler, progress=False)
                except SdwbError as e:
                    raise SdwbError(f"variant {s.variant}: edit: {e}") from None
                seconds.append(time.perf_counter() - started)
                advance()
        if s.judge not in judges:
            judges[s.judge] = load_judge(s.judge)
        scores = score_edits(judges[s.judge], images, cases)
        scores.pop("outcomes")
        mean, lo, hi = bootstrap_interval(seconds)
        run.rows[s.variant].update({**scores, "edit_strength": s.edit_strength, "s_per_edit": mean,
                                    "s_per_edit_lo": lo, "s_per_edit_hi": hi})


def _runtime_compile_columns(run: _Run, pipes: dict) -> None:
    """``compile_s`` of OpenVINO rows: seconds its runtime spent compiling the components for the
    shapes this run called them with (untimed: compiled in the images phase or the warm-up)."""
    for s in run.scenarios:
        seconds = getattr(pipes.get(s.variant), "compile_seconds", None)
        if s.backend == "openvino" and callable(seconds):
            run.rows[s.variant]["compile_s"] = round(seconds(), 3)


def _release(pipes: dict[str, Any]) -> None:
    """Drop every loaded pipeline (images are kept as PIL images, timings as numbers)."""
    import gc

    pipes.clear()
    gc.collect()


def _memory(run: _Run, bars: _Bars) -> None:
    """Peak RSS / CUDA peak / GMACs of each variant in a fresh subprocess."""
    from bench.memory import run_probe

    todo = [s for s in run.scenarios if "memory" in s.metrics]
    advance = bars.task("memory", len(todo))
    for s in todo:
        exported = {"model": run.model_dirs[s.variant]} if s.variant in run.model_dirs else {}
        result = run_probe(s, **exported)
        row = run.rows[s.variant]
        for key in ("peak_rss_mb", "cuda_peak_mb", "unet_gmacs"):
            row[key] = result.get(key)
        advance()
        run.save(partial=True)


def _quality(run: _Run, prompts: dict, bars: _Bars) -> None:
    """Quality columns from the saved images; empty where quality does not apply."""
    todo = [s for s in run.scenarios if "quality" in s.metrics]
    if not todo:
        return
    for s in todo:
        if not s.quality_applies:
            run.rows[s.variant]["quality_note"] = NOT_APPLICABLE.format(model=s.model)
    todo = [s for s in todo if s.quality_applies]
    if not todo:
        return
    try:
        from bench.quality import compute_quality
    except ImportError as e:
        raise SdwbError(f"quality metrics are not available: {e} (drop 'quality' from metrics)") from None
    from sdwb.judge import load_judge

    judges: dict[str, Any] = {}
    references: dict[int, list] = {}
    advance = bars.task("quality", len(todo))
    for s in todo:
        texts, attributes = prompts[s.variant]
        if s.judge not in judges:
            judges[s.judge] = load_judge(s.judge)
        images = run.images[s.variant]
        is_baseline = s.variant == s.baseline
        baseline = None if is_baseline else run.images.get(s.baseline)
        if baseline is not None and [im.size for im in baseline] != [im.size for im in images]:
            baseline = None  # different resolution or prompt count: PSNR/SSIM undefined
        if s.prompts == SHAPES_EVAL:
            if len(texts) not in references:
                references[len(texts)] = _shapes_references(len(texts))
            reference = references[len(texts)]
        else:
            reference = baseline
        metrics = compute_quality(images, texts, judge=judges[s.judge], expected_attributes=attributes,
                                  reference_images=reference, baseline_images=baseline)
        row = run.rows[s.variant]
        row.update({k: v for k, v in metrics.items()})
        row["judge"] = s.judge
        if is_baseline:
            row["quality_note"] = "baseline: PSNR/SSIM are measured against this variant"
        advance()


def _shapes_references(count: int) -> list:
    """The data-set renderings of the first ``count`` evaluation prompts (CMMD reference)."""
    from PIL import Image

    from sdwb import shapes

    return [Image.fromarray(sample.render()) for sample in shapes.eval_samples(count)]
