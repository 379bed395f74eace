"""Resolve a model spec to a loaded pipeline (or judge), offline, with one-line errors.

A spec is one of: ``builtin:<name>`` (see :mod:`sdwb.zoo`), a local directory in diffusers
layout (HF layout for a judge), or a hub id ``org/name`` looked up in the local Hugging Face
cache. Nothing is ever downloaded. Why the checks before ``from_pretrained``: diffusers and
transformers fail on a missing component or truncated file with long tracebacks that do not
say which file; here every failure is an :class:`SdwbError` naming what was looked for and where.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from sdwb.errors import SdwbError
from sdwb.families import (
    Family,
    check_pipeline_class,
    check_verb,
    components_of,
    family_from_configs,
    require,
)
from sdwb.variants.pruned import pruned_components
from sdwb.variants.record import is_quantized, read_record
from sdwb.verify import check_readable, check_safetensors, verify_model  # noqa: F401  (re-exported)
from sdwb.zoo import BUILTIN_PREFIX, get_builtin, missing_message

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the torch modules of a pipeline
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot directory of ``repo_id`` in the HF cache; never touches the network."""
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, broken cache
        raise SdwbError(
            f"model '{repo_id}' is not a local directory and not in the Hugging Face cache at {cache} "
            f"(looked for {cache / ('models--' + repo_id.replace('/', '--'))}; nothing is downloaded): "
            f"{type(exc).__name__}"
        ) from None


def resolve_spec(spec: str, kind: str = "pipeline") -> Path | None:
    """The directory a spec names (None for a model built in code). ``kind``: pipeline | judge."""
    if spec.startswith(BUILTIN_PREFIX):
        model = get_builtin(spec)
        if model.kind != kind:
            what = "a diffusion pipeline" if kind == "pipeline" else "a CLIP judge"
            raise SdwbError(f"{model.name} is not {what} ({model.description.split(';')[0]})")
        if not model.available():
            raise SdwbError(missing_message(model))
        return model.path
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(spec):
        return resolve_hub_id(spec)
    raise SdwbError(f"model directory not found: {path.resolve()} (expected a {_layout(kind)} directory)")



def spec_digest(spec: str) -> str:
    """The weights digest a bench row of the model ``spec`` records (``weights_digest`` over its
    weight files), or ``BUILT_IN_CODE`` for a builtin made in code (sd15-arch / sdxl-arch)."""
    from sdwb.variants.files import BUILT_IN_CODE, weight_files, weights_digest

    directory = resolve_spec(spec, "pipeline")
    return BUILT_IN_CODE if directory is None else weights_digest(directory, weight_files(directory))


def _layout(kind: str) -> str:
    return "diffusers StableDiffusion(XL)Pipeline" if kind == "pipeline" else "Hugging Face CLIPModel"


def _check_pipeline_layout(path: Path) -> str:
    """The pipeline class of the diffusers directory ``path``, after checking its components."""
    if not path.is_dir():
        raise SdwbError(f"not a directory: {path} (expected a {_layout('pipeline')} directory)")
    check_readable(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        _not_a_pipeline(path)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt model_index.json: {index_file}: {exc}") from None
    cls = index.get("_class_name") if isinstance(index, dict) else None
    check_pipeline_class(cls, str(index_file))
    for comp in components_of(cls):
        entry = index.get(comp)
        if not isinstance(entry, list) or None in entry:
            raise SdwbError(f"wrong layout: {index_file} lists no '{comp}' component")
        if not (path / comp).is_dir():
            raise SdwbError(f"wrong layout: {path} has no {comp}/ directory (listed in model_index.json)")
    return cls


def _not_a_pipeline(path: Path) -> None:
    """Why ``path`` (no ``model_index.json``) is not a pipeline: a corrupt export manifest is named as
    corrupt (not as "no manifest"), an intact one as an export to run on its backend."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SdwbError(f"corrupt {manifest}: {' '.join(str(exc).split())} (truncated? re-run the export)"
                            ) from None
        if isinstance(data, dict) and data.get("format"):
            raise SdwbError(f"{path}: an export ({data['format']}), not a diffusers pipeline directory; run "
                            "it with --backend onnxruntime (or the backend it was made for)")
        raise SdwbError(f"corrupt {manifest}: no 'format' (not a manifest sdwb wrote)")
    raise SdwbError(f"not a diffusers pipeline directory: no model_index.json in {path}")


def spec_family(spec: str) -> Family:
    """The family of a model spec, read from its files (nothing is loaded): ``model_index.json``'s
    pipeline class and the UNet's config."""
    from sdwb.families import FAMILIES

    if spec.startswith(BUILTIN_PREFIX):
        return FAMILIES[get_builtin(spec).family]
    path = resolve_spec(spec, "pipeline")
    manifest = path / "manifest.json"  # an export (sdwb.variants.manifest) names its family
    if manifest.is_file() and not (path / "model_index.json").exists():
        try:
            family = json.loads(manifest.read_text()).get("pipeline", {}).get("family")
        except (OSError, ValueError, AttributeError):
            family = None  # the export's own loader names the broken manifest
        return FAMILIES.get(family or "sd1", FAMILIES["sd1"])  # exports before families: SD 1.x / 2.x
    cls = _check_pipeline_layout(path)
    try:
        unet_config = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        unet_config = {}  # the loader names the broken file
    return family_from_configs(cls, unet_config)


def require_family(spec_or_pipe, verb: str) -> Family:
    """The family of a spec or loaded pipeline; a one-line error, before any work, when ``verb``
    does not support it yet (``sdwb models`` lists what does)."""
    if isinstance(spec_or_pipe, (str, Path)):
        return check_verb(spec_family(str(spec_or_pipe)), verb)
    return require(spec_or_pipe, verb)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter/buffer to ``dtype`` (fp16-stored weights -> fp32 etc.)."""
    if any(t.is_floating_point() and t.dtype != dtype for t in [*module.parameters(), *module.buffers()]):
        # nn.Module.to: diffusers' ModelMixin.to logs a spurious fp32-modules warning on casts.
        torch.nn.Module.to(module, dtype=dtype)


def quiet_library_progress() -> None:
    """No tqdm bars from diffusers and transformers ("Loading pipeline components...", "Loading
    weights"): they would interleave with sdwb's own progress lines. Process-wide and idempotent;
    every load here calls it, so no command has to remember to."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                  lora: str | None = None, lora_scale: float = 1.0, fuse_lora: bool = False):
    """The diffusers pipeline for ``spec`` (``StableDiffusionPipeline`` for SD 1.x / 2.x,
    ``StableDiffusionXLPipeline`` for SDXL), in ``dtype`` on ``device``, safety checker off,
    drawing no progress bars of its own (loading or denoising: sdwb draws its own).

    ``lora``: an adapter spec (:mod:`sdwb.lora`) loaded at ``lora_scale`` -- projected onto the
    pruned widths of a pruned variant, merged into the weights with ``fuse_lora``. What was applied
    is ``pipe.sdwb_lora`` (None without one). A quantized variant is refused: its float weights are
    gone, so the adapter must be fused before quantizing (``sdwb lora fuse``, then ``compress quantize``).
    """
    quiet_library_progress()
    adapter = None
    if lora is not None:
        from sdwb.lora import read_adapter

        adapter = read_adapter(lora)  # checked before the model is loaded
    pipe = _load_pipeline(spec, device, dtype, adapter, lora_scale, fuse_lora)
    pipe.set_progress_bar_config(disable=True)  # DiffusionPipeline: its denoising bar
    return pipe


def _load_pipeline(spec: str, device: str, dtype: torch.dtype, adapter=None, scale: float = 1.0,
                   fuse: bool = False):
    if spec.startswith(BUILTIN_PREFIX) and get_builtin(spec).builder is not None:
        import importlib

        module, _, function = get_builtin(spec).builder.partition(":")
        pipe = getattr(importlib.import_module(module), function)(device=device, dtype=dtype)
        return _with_lora(pipe, adapter, scale, fuse, None)
    path = resolve_spec(spec, "pipeline")
    cls = _check_pipeline_layout(path)
    verify_model(spec, path, "pipeline")  # hashes, pickle, symlinks, truncation (sdwb.verify)
    record = _quantized_record(path)
    if adapter is not None and record is not None:
        raise SdwbError(f"{spec}: a quantized variant ({record.get('method')}) holds no float weights to "
                        f"load a LoRA into; fuse it first (sdwb lora fuse --model <its parent> --lora "
                        f"{adapter.spec} -o DIR), then quantize DIR")
    components = pruned_components(path)  # a pruned variant's UNet, rebuilt from its sdwb.json
    import diffusers

    extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls else {}
    try:
        pipe = getattr(diffusers, cls).from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, **extra, **components,
        )
    except Exception as exc:
        raise SdwbError(
            f"could not load diffusers pipeline from {path}: {type(exc).__name__}: {exc}"
        ) from None
    for name in NETWORKS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        _cast(module, dtype)
        module.eval().requires_grad_(False)
    from sdwb.inference import attach, for_spec

    attach(pipe, for_spec(str(path)))  # a distilled variant's steps / sampler / guidance
    from sdwb.variants.kept import find_kept

    _with_lora(pipe, adapter, scale, fuse, find_kept(read_record(path)) if adapter is not None else None)
    if record is not None:
        pipe = _requantize(pipe, path, record, device, dtype)
    elif device != "cpu":
        pipe = pipe.to(device)
    return _recache(pipe, path)


def _with_lora(pipe, adapter, scale: float, fuse: bool, kept: dict | None):
    """``pipe`` with ``adapter`` applied (or not); what was applied in ``pipe.sdwb_lora``."""
    pipe.sdwb_lora = None
    if adapter is not None:
        from sdwb.lora import apply_lora

        pipe.sdwb_lora = apply_lora(pipe, adapter, scale, fuse=fuse, kept=kept)
    return pipe


def _quantized_record(path: Path) -> dict | None:
    """The ``sdwb.json`` of a quantized variant directory, else None (plain pipelines, pruned ...).
    A cache variant of a torch quantized model holds its parent's files: the parent's record."""
    record = read_record(path)
    if record is not None and record.get("stage") == "cache":
        record = (record.get("parent") or {}).get("variant")
    return record if is_quantized(record) else None


def _recache(pipe, path: Path):
    """Re-apply a cache variant's recorded method (``sdwb compress cache``: DeepCache, ToMe)."""
    from sdwb.cache.config import cache_record, parse_cache_config

    record = cache_record(path)
    if record is not None:
        from sdwb.cache.config import apply_cache

        apply_cache(pipe, parse_cache_config(record.get("config", {}), str(path / "sdwb.json")))
    return pipe


def _requantize(pipe, path: Path, record: dict, device: str, dtype: torch.dtype):
    """Re-apply the recorded quantization (the method decides the precision, so dtype must be fp32)."""
    from sdwb.variants.requantize import reapply

    if dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        raise SdwbError(f"{path}: a {record.get('method')} variant sets its own precision; load it "
                        f"with dtype fp32 (got {name})")
    return reapply(pipe, path, record, device)


def load_judge(spec: str = "builtin:shapes-judge", device: str = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` for ``spec`` in fp32, eval mode, offline."""
    path = resolve_spec(spec, "judge")
    if not path.is_dir():
        raise SdwbError(f"not a directory: {path} (expected a {_layout('judge')} directory)")
    check_readable(path)
    if not (path / "config.json").is_file():
        raise SdwbError(f"not a Hugging Face model directory: no config.json in {path}")
    verify_model(spec, path, "judge")
    quiet_library_progress()
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                          use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise SdwbError(f"could not load CLIP judge from {path}: {type(exc).__name__}: {exc}") from None
    _cast(model, torch.float32)
    return model.to(device).eval().requires_grad_(False), processor
