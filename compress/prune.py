"""``prune(source, config, out)``: the pruning verb, from a float model to a smaller UNet variant.

One verb, one typed config (:mod:`compress.prune_config`). ``source`` is a torch
``StableDiffusionPipeline`` (not modified: a copy is pruned) or a model spec (``builtin:NAME``, a
diffusers directory, a cached hub id). Steps:

1. Load the source as fp32 on the CPU; refuse a quantized or already-pruned variant, an ONNX
   export, or a UNet that is not a diffusers ``UNet2DConditionModel``; check every layer / block
   name in the config against that UNet before any work.
2. Count the unpruned UNet's MACs and parameters (:func:`compress.prune_arch.measure`).
3. ``channels``: with Taylor importance, accumulate denoising-loss gradients over a few batches
   (:mod:`compress.denoise_data`); prune channel groups and attention heads
   (:mod:`compress.prune_channels`). ``blocks``: replace the named blocks (:mod:`compress.prune_blocks`).
4. ``finetune.steps > 0``: recovery by distillation from the unpruned UNet (:mod:`compress.recovery`).
5. The pruned UNet must give finite outputs; count its MACs and parameters again.
6. With ``out``: under ``atomic_dir(out)`` the diffusers pipeline (VAE, text encoder, tokenizer and
   scheduler as in the parent, the pruned UNet's safetensors weights beside the parent's
   ``config.json``) and ``sdwb.json`` with ``stage: prune``, the resolved config, the
   ``architecture`` that rebuilds the UNet without pickle (:mod:`compress.prune_arch`; what
   ``sdwb.loading.load_pipeline`` uses) and the metrics (MACs/params before and after, recovery
   losses). Nothing appears at ``out`` unless every step passed.

When data is needed (Taylor, recovery) a work directory ``WORK`` (default ``OUT.work``) holds the
latent pool, the pruned UNet before recovery (a resumed run reuses it rather than pruning again,
whose choice could differ in the last bits of a float sum) and the recovery checkpoints. It is
checked against the resolved config and the source's content before reuse and removed when the
variant has been written (``keep_work`` keeps it).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.prune_config import PruneConfig, resolved
from sdwb.errors import SdwbError

PRUNED_DIR = "pruned"
POOL_FILE = "latent_pool.safetensors"


@dataclass
class Pruned:
    """A pruned model: the pipeline with the pruned UNet, its record, where it was saved."""

    config: PruneConfig
    pipeline: object
    record: dict
    path: Path | None = None
    metrics: dict = field(default_factory=dict)


def _load_source(source) -> tuple[object, dict, str | None]:
    """(fp32 CPU pipeline, parent record, fingerprint of the source or None)."""
    if not isinstance(source, (str, Path)):
        return copy.deepcopy(source), {"spec": None, "class": type(source).__name__}, None
    from compress.variants import read_record
    from export.onnx import is_export_dir, source_fingerprint
    from sdwb.loading import load_pipeline, resolve_spec

    spec = str(source)
    path = resolve_spec(spec, "pipeline")
    record = read_record(path) if path is not None and path.is_dir() else None
    stage = (record or {}).get("stage")
    if stage in ("quantize", "prune"):
        grand = (record.get("parent") or {}).get("spec")
        raise SdwbError(f"{spec}: already {'quantized' if stage == 'quantize' else 'pruned'} "
                        f"({record.get('method')}); prune its parent ({grand}) instead")
    if path is not None and is_export_dir(path):
        raise SdwbError(f"{spec}: an ONNX export; pruning needs the diffusers pipeline or builtin model "
                        "it was exported from")
    pipe = load_pipeline(spec, device="cpu", dtype=torch.float32)
    parent = {"spec": spec, "path": str(Path(path).resolve()) if path else None, "variant": record}
    return pipe, parent, source_fingerprint(spec)


def check_unet(pipe, name: str) -> None:
    """Refuse anything but an unpruned diffusers ``UNet2DConditionModel`` (one line)."""
    from diffusers import UNet2DConditionModel

    from compress.prune_blocks import removed_blocks

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise SdwbError(f"{name}: the UNet is a {type(unet).__name__}; pruning needs a diffusers "
                        "UNet2DConditionModel")
    if removed_blocks(unet):
        raise SdwbError(f"{name}: its UNet already has removed blocks; prune the unpruned model")


def _check_names(unet, config: PruneConfig) -> None:
    """Every ignored layer / block name must exist (and every block be removable) before any work."""
    if config.method == "channels":
        from compress.prune_channels import resolve_ignored

        resolve_ignored(unet, config.ignored_layers)
    else:
        from compress.prune_blocks import apply_removals, resolve

        with torch.device("meta"):  # a weightless copy: checks removability without touching the model
            from diffusers import UNet2DConditionModel

            probe = UNet2DConditionModel.from_config(unet.config)
        apply_removals(probe, resolve(probe, config.blocks))


def _needs_data(config: PruneConfig) -> bool:
    return config.finetune.steps > 0 or (config.method == "channels" and config.importance == "taylor")


def _prepare_work(work: Path, config: PruneConfig, fingerprint: str | None) -> None:
    """Create ``work`` or check that it holds a run of this exact config and source."""
    from sdwb.runs import prepare_work_dir

    prepare_work_dir(work, {"config": resolved(config), "source": fingerprint}, "pruning")


def _save_pruned(unet, summary: dict, directory: Path) -> None:
    """The pruned UNet before recovery (architecture + safetensors), written atomically."""
    from safetensors.torch import save_file

    from compress.prune_arch import describe

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
    (tmp / "architecture.json").write_text(json.dumps(describe(unet)))
    (tmp / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_pruned(teacher, directory: Path):
    from safetensors.torch import load_file

    from compress.prune_arch import build_unet

    architecture = json.loads((directory / "architecture.json").read_text())
    state = load_file(directory / "unet.safetensors")
    unet = build_unet(dict(teacher.config), architecture, state, source=str(directory))
    return unet, json.loads((directory / "summary.json").read_text())


def _apply(student, config: PruneConfig, pipe, data, say) -> dict:
    """Prune ``student`` in place by ``config.method``; returns the summary."""
    from compress.prune_arch import example_inputs

    if config.method == "blocks":
        from compress.prune_blocks import remove_blocks

        say(f"removing blocks {', '.join(config.blocks)}")
        return remove_blocks(student, config.blocks)
    from compress.prune_channels import prune_channels

    summary = {}
    if config.importance == "taylor":
        from compress.denoise_data import accumulate_gradients

        say(f"Taylor importance: gradients over {config.taylor.batches} batches")
        taylor = config.taylor
        summary["taylor_loss"] = accumulate_gradients(student, data, taylor.batches, taylor.batch)
    say(f"pruning channels and heads at ratio {config.ratio:g} ({config.importance})")
    summary.update(prune_channels(student, config, example_inputs(pipe)))
    return summary


def _check_finite(unet, inputs: dict, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    probe = {**inputs, "sample": torch.randn(inputs["sample"].shape, generator=gen)}
    with torch.no_grad():
        out = unet(**probe).sample
    if not torch.isfinite(out).all():
        raise SdwbError(f"{name}: the pruned UNet gives NaN/inf outputs; nothing was written")


def _ratio(before: float, after: float) -> float:
    return round(1 - after / before, 4) if before else 0.0


def prune(
    source,
    config: PruneConfig,
    out: str | Path | None = None,
    *,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> Pruned:
    """Prune ``source`` per ``config``; save the variant to ``out`` when given (see module docstring)."""
    from compress.prune_arch import MACS_COUNTER, example_inputs, measure

    say = say or (lambda _msg: None)
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    say("loading the model")
    pipe, parent, fingerprint = _load_source(source)
    name = parent.get("spec") or "pipeline"
    check_unet(pipe, name)
    teacher = pipe.unet
    _check_names(teacher, config)
    inputs = example_inputs(pipe)
    before = measure(teacher, inputs)
    started = time.perf_counter()

    scratch, data = None, None
    work = Path(work_dir) if work_dir is not None else (out.with_name(out.name + ".work") if out else None)
    if not _needs_data(config):
        work = None  # nothing to cache or resume: magnitude / block pruning takes a second
    else:
        if work is None:
            scratch = tempfile.TemporaryDirectory(prefix="sdwb-prune-")
            work = Path(scratch.name)
        _prepare_work(work, config, fingerprint)
        from compress.denoise_data import DenoisingData

        say(f"encoding {config.data.latent_pool} shapes images (latent pool)")
        data = DenoisingData(pipe, config.data, work / POOL_FILE, progress=progress)
    try:
        if work is not None and (work / PRUNED_DIR / "architecture.json").is_file():
            say(f"resuming from {work / PRUNED_DIR}")
            student, summary = _load_pruned(teacher, work / PRUNED_DIR)
        else:
            student = copy.deepcopy(teacher)
            summary = _apply(student, config, pipe, data, say)
            if work is not None and config.finetune.steps > 0:
                _save_pruned(student, summary, work / PRUNED_DIR)
        prune_seconds = time.perf_counter() - started
        recovery = None
        if config.finetune.steps > 0:
            from compress.recovery import recover

            say(f"recovery: {config.finetune.steps} steps of distillation from the unpruned UNet")
            recovery = recover(student, teacher, data, config.finetune, work, progress=progress)
        _check_finite(student, inputs, name)
        after = measure(student, inputs)
        metrics = {
            "unet_gmacs": {"before": round(before["gmacs"], 6), "after": round(after["gmacs"], 6),
                           "reduction": _ratio(before["gmacs"], after["gmacs"])},
            "unet_params_m": {"before": round(before["params_m"], 6), "after": round(after["params_m"], 6),
                              "reduction": _ratio(before["params_m"], after["params_m"])},
            "macs_counter": MACS_COUNTER,
            "prune_seconds": round(prune_seconds, 3),
            "pruned": summary,
            "recovery": recovery,
        }
        pipe.unet = student
        record = _record(config, parent, student, metrics)
        if out is not None:
            _write_variant(pipe, out, record, overwrite, parent, say)
        if work is not None and scratch is None and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return Pruned(config, pipe, record, out, metrics)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    from compress.variants import library_versions as base

    out = base()
    for dist in ("torch-pruning", "accelerate"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _record(config: PruneConfig, parent: dict, unet, metrics: dict) -> dict:
    from compress.prune_arch import describe
    from compress.variants import FORMAT

    return {
        "format": FORMAT,
        "version": 1,
        "stage": "prune",
        "method": config.method,
        "backend": "torch",
        "weights": "float UNet of pruned shapes (rebuilt from 'architecture'); VAE and text encoder "
                   "are the parent's",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": parent,
        "config": resolved(config),
        "architecture": describe(unet),
        "metrics": metrics,
        "libraries": library_versions(),
    }


def _write_variant(pipe, out: Path, record: dict, overwrite: bool, parent: dict, say) -> None:
    from compress.quantize import _dir_mb, save_float
    from compress.variants import hash_tree
    from sdwb.runs import atomic_dir, atomic_write_json

    say(f"writing {out}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_float(pipe, tmp)
        record["metrics"]["size_mb"] = _dir_mb(tmp)
        if parent.get("path"):
            record["metrics"]["parent_size_mb"] = _dir_mb(Path(parent["path"]))
        record["files"] = hash_tree(tmp)
        atomic_write_json(tmp / "sdwb.json", record)
