"""``prune(source, config, out)``: the pruning verb, from a float model to a smaller UNet variant.

One verb, one typed config (:mod:`compress.prune_config`). ``source`` is a torch
``StableDiffusionPipeline`` (not modified: a copy is pruned) or a model spec (``builtin:NAME``, a
diffusers directory, a cached hub id). Steps:

1. Load the source as fp32 on the CPU; refuse a quantized or already-pruned variant, an ONNX
   export, or a UNet that is not a diffusers ``UNet2DConditionModel``; check every layer / block
   name in the config against that UNet before any work.
2. Count the unpruned UNet's MACs and parameters (:func:`sdwb.macs.unet_macs`).
3. ``channels``: with Taylor importance, accumulate denoising-loss gradients over a few batches
   (:mod:`compress.denoise_data`); prune channel groups and attention heads
   (:mod:`compress.prune_channels`). ``blocks``: replace the named blocks (:mod:`sdwb.variants.unet_blocks`).
4. ``finetune.steps > 0``: recovery by distillation from the unpruned UNet (:mod:`compress.recovery`).
5. The pruned UNet must give finite outputs; count its MACs and parameters again.
6. With ``out``: under ``atomic_dir(out)`` the diffusers pipeline (VAE, text encoder, tokenizer and
   scheduler as in the parent, the pruned UNet's safetensors weights beside the parent's
   ``config.json``) and ``sdwb.json`` with ``stage: prune``, the resolved config, the
   ``architecture`` that rebuilds the UNet without pickle (:mod:`sdwb.variants.pruned`; what
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
    from compress.variant_io import load_source
    from sdwb.variants.manifest import source_fingerprint

    src = load_source(source, refuse={
        "quantize": "{spec}: already quantized ({method}); prune its parent ({parent}) instead",
        "prune": "{spec}: already pruned ({method}); prune its parent ({parent}) instead",
        "decoder": "{spec}: has a distilled tiny decoder, whose VAE cannot encode the training data; prune "
                   "its parent ({parent}), then distil the decoder of the result",
    }, export_error="{spec}: an ONNX export; pruning needs the diffusers pipeline or builtin model it was "
                    "exported from")
    spec = src.parent.get("spec")
    return src.pipe, src.parent, source_fingerprint(spec) if spec else None


def check_unet(pipe, name: str) -> None:
    """Refuse anything but an unpruned diffusers ``UNet2DConditionModel`` (one line)."""
    from diffusers import UNet2DConditionModel

    from sdwb.variants.unet_blocks import removed_blocks

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise SdwbError(f"{name}: the UNet is a {type(unet).__name__}; pruning needs a diffusers "
                        "UNet2DConditionModel")
    if removed_blocks(unet):
        raise SdwbError(f"{name}: its UNet already has removed blocks; prune the unpruned model")


@dataclass(frozen=True)
class PruneMethod:
    """One pruning method: ``check(unet, config)`` refuses bad names before any work,
    ``apply(student, config, pipe, data, say) -> summary`` prunes in place, ``needs_data(config)``
    says whether it reads training data itself (besides recovery)."""

    check: Callable
    apply: Callable
    needs_data: Callable = lambda config: False


def _check_channels(unet, config: PruneConfig) -> None:
    from compress.prune_channels import resolve_ignored

    resolve_ignored(unet, config.ignored_layers)


def _apply_channels(student, config: PruneConfig, pipe, data, say) -> dict:
    from compress.prune_channels import prune_channels
    from sdwb.macs import unet_example_inputs

    summary = {}
    if config.importance == "taylor":
        from compress.denoise_data import accumulate_gradients

        say(f"Taylor importance: gradients over {config.taylor.batches} batches")
        taylor = config.taylor
        summary["taylor_loss"] = accumulate_gradients(student, data, taylor.batches, taylor.batch)
    say(f"pruning channels and heads at ratio {config.ratio:g} ({config.importance})")
    summary.update(prune_channels(student, config, unet_example_inputs(pipe)))
    say(summary["outcome"])  # the ratio is per group, rounded to GroupNorm multiples: say what it became
    return summary


def _check_blocks(unet, config: PruneConfig) -> None:
    from sdwb.variants.unet_blocks import apply_removals, resolve

    with torch.device("meta"):  # a weightless copy: checks removability without touching the model
        from diffusers import UNet2DConditionModel

        probe = UNet2DConditionModel.from_config(unet.config)
    apply_removals(probe, resolve(probe, config.blocks))


def _apply_blocks(student, config: PruneConfig, pipe, data, say) -> dict:
    from sdwb.variants.unet_blocks import remove_blocks

    say(f"removing blocks {', '.join(config.blocks)}")
    return remove_blocks(student, config.blocks)


# The registry of pruning methods: PruneConfig.method -> how it checks and prunes (tests/test_prune.py
# holds it equal to the config's method names).
METHODS: dict[str, PruneMethod] = {
    "channels": PruneMethod(_check_channels, _apply_channels, lambda config: config.importance == "taylor"),
    "blocks": PruneMethod(_check_blocks, _apply_blocks),
}


def _check_names(unet, config: PruneConfig) -> None:
    """Every ignored layer / block name must exist (and every block be removable) before any work."""
    METHODS[config.method].check(unet, config)


def _needs_data(config: PruneConfig) -> bool:
    return config.finetune.steps > 0 or METHODS[config.method].needs_data(config)


def _prepare_work(work: Path, config: PruneConfig, fingerprint: str | None) -> None:
    """Create ``work`` or check that it holds a run of this exact config and source."""
    from sdwb.runs import prepare_work_dir

    prepare_work_dir(work, {"config": resolved(config), "source": fingerprint}, "pruning")


def _save_pruned(unet, summary: dict, directory: Path, kept: dict) -> None:
    """The pruned UNet before recovery (architecture + safetensors), written atomically."""
    from safetensors.torch import save_file

    from sdwb.variants.pruned import describe

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
    (tmp / "architecture.json").write_text(json.dumps(describe(unet, kept)))
    (tmp / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _load_pruned(teacher, directory: Path):
    from safetensors.torch import load_file

    from sdwb.variants.pruned import build_unet

    architecture = json.loads((directory / "architecture.json").read_text())
    state = load_file(directory / "unet.safetensors")
    unet = build_unet(dict(teacher.config), architecture, state, source=str(directory))
    return unet, json.loads((directory / "summary.json").read_text()), architecture.get("kept")


def _apply(student, config: PruneConfig, pipe, data, say) -> dict:
    """Prune ``student`` in place by ``config.method``; returns the summary."""
    return METHODS[config.method].apply(student, config, pipe, data, say)


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
    from compress.variant_io import write_float_variant
    from sdwb.macs import MACS_COUNTER, unet_example_inputs, unet_macs
    from sdwb.train.common import is_main_process, main_process_first, wait_for_everyone
    from sdwb.variants.kept import recording

    main = is_main_process()  # under accelerate launch: the process that writes and reports
    if config.finetune.steps > 0:  # a recovery batch N processes cannot share: refused before any work
        from sdwb.train.common import process_state, rank_rows

        rank_rows(config.finetune.batch, process_state())
    say = (say or (lambda _msg: None)) if main else (lambda _msg: None)
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    say("loading the model")
    pipe, parent, fingerprint = _load_source(source)
    name = parent.get("spec") or "pipeline"
    check_unet(pipe, name)
    teacher = pipe.unet
    _check_names(teacher, config)
    inputs = unet_example_inputs(pipe)
    before = unet_macs(teacher, inputs)
    started = time.perf_counter()

    scratch, data = None, None
    work = Path(work_dir) if work_dir is not None else (out.with_name(out.name + ".work") if out else None)
    if not _needs_data(config):
        work = None  # nothing to cache or resume: magnitude / block pruning takes a second
    else:
        if work is None:
            scratch = tempfile.TemporaryDirectory(prefix="sdwb-prune-")
            work = Path(scratch.name)
        from compress.denoise_data import DenoisingData

        with main_process_first():  # accelerate launch: the main process writes, the others read
            if main:
                _prepare_work(work, config, fingerprint)
            say(f"encoding {config.data.latent_pool} shapes images (latent pool)")
            data = DenoisingData(pipe, config.data, work / POOL_FILE, progress=progress and main)
    try:
        if work is not None and (work / PRUNED_DIR / "architecture.json").is_file():
            say(f"resuming from {work / PRUNED_DIR}")
            student, summary, kept = _load_pruned(teacher, work / PRUNED_DIR)
        else:
            student = copy.deepcopy(teacher)
            with recording(student) as layers:  # the rows / columns every Linear keeps (LoRA projection)
                summary = _apply(student, config, pipe, data, say)
            kept = {"layers": layers}
            if work is not None and config.finetune.steps > 0 and main:
                _save_pruned(student, summary, work / PRUNED_DIR, kept)
        prune_seconds = time.perf_counter() - started
        recovery = None
        if config.finetune.steps > 0:
            from compress.recovery import recover

            say(f"recovery: {config.finetune.steps} steps of distillation from the unpruned UNet")
            recovery = recover(student, teacher, data, config.finetune, work, progress=progress)
        _check_finite(student, inputs, name)
        after = unet_macs(student, inputs)
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
        record = _record(config, parent, student, metrics, kept)
        if out is not None and main:
            write_float_variant(pipe, out, record, overwrite, say)
        if work is not None and scratch is None and not keep_work and main:
            shutil.rmtree(work, ignore_errors=True)
        wait_for_everyone()
    finally:
        if scratch is not None:
            scratch.cleanup()
    return Pruned(config, pipe, record, out, metrics)


def _record(config: PruneConfig, parent: dict, unet, metrics: dict, kept: dict | None = None) -> dict:
    from sdwb.variants.pruned import describe
    from sdwb.variants.record import new_record

    return new_record(
        stage="prune", method=config.method, backend="torch",
        weights="float UNet of pruned shapes (rebuilt from 'architecture'); VAE and text encoder are the "
                "parent's",
        parent=parent, config=resolved(config), architecture=describe(unet, kept), metrics=metrics,
        extra_libraries=("torch-pruning", "accelerate"),
    )
