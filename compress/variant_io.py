"""What every compression verb shares: opening its source model and writing a float variant.

:func:`load_source` is the one source loader of prune, distill and quantize: it resolves the
spec, reads the source's record (so the new record can name its parent and the chain stays
traceable), refuses a source that the verb cannot take (a stage already applied, an ONNX export)
with the verb's own one-line reason, and loads the float pipeline. :func:`write_float_variant`
is the one writer of a torch variant: weights (fp16 where lossless), sizes, file hashes and
``sdwb.json``, all inside one atomic directory.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sdwb.errors import SdwbError
from sdwb.variants.files import hash_files, weights_mb
from sdwb.variants.manifest import MANIFEST, is_export_dir
from sdwb.variants.record import RECORD, parent_entry, read_record


@dataclass
class Source:
    """A verb's input: the float pipeline (None for an export taken as it is), the export directory
    (None for a pipeline), the parent entry for the new record, and the spec's directory."""

    pipe: object | None
    export_dir: Path | None
    parent: dict
    path: Path | None = None


@dataclass
class Variant:
    """A quantized model: the torch pipeline (torch methods) and/or its directory, and its record."""

    method: str
    backend: str
    config: object
    record: dict
    path: Path | None = None
    pipeline: object | None = None
    metrics: dict = field(default_factory=dict)

    def load(self, threads: int | None = None):
        """A runnable pipeline: the torch pipeline, or the ONNX Runtime pipeline of ``path``."""
        if self.pipeline is not None:
            return self.pipeline
        if self.path is None:
            raise SdwbError(f"{self.method} variant has no pipeline and no directory")
        from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

        self.pipeline = OrtStableDiffusionPipeline.from_export(self.path, threads=threads)
        return self.pipeline


def load_source(source, *, refuse: dict[str, str], export_error: str | None) -> Source:
    """Open ``source`` (a spec, or a pipeline object, which is deep-copied) for a verb.

    ``refuse`` maps a recorded stage to the verb's error, formatted with ``spec``, ``method``,
    ``stage`` and ``parent`` (the source's own parent spec). ``export_error`` (formatted with
    ``spec``) refuses an ONNX export; None returns it as ``export_dir`` without loading anything.
    """
    from sdwb.loading import load_pipeline, resolve_spec

    if not isinstance(source, (str, Path)):
        return Source(copy.deepcopy(source), None, {"spec": None, "class": type(source).__name__})
    spec = str(source)
    path = resolve_spec(spec, "pipeline")  # None for a model built in code (sd15-arch)
    record = read_record(path) if path is not None and path.is_dir() else None
    stage = (record or {}).get("stage")
    if stage == "cache" and stage not in refuse:  # patched torch modules at load: no verb builds on them
        refuse = {**refuse, "cache": "{spec}: a {method} cache variant (applied when it loads); compress the "
                  "model it was made from ({parent}), then apply {method} to the result"}
    if stage in refuse:
        raise SdwbError(refuse[stage].format(spec=spec, method=record.get("method"), stage=stage,
                                             parent=(record.get("parent") or {}).get("spec")))
    parent = parent_entry(spec, path, record)
    if path is not None and is_export_dir(path):
        if export_error is not None:
            raise SdwbError(export_error.format(spec=spec))
        return Source(None, path, parent, path)
    return Source(load_pipeline(spec, device="cpu", dtype=torch.float32), None, parent, path)


def output_and_work(out, work_dir, overwrite: bool, verb: str) -> tuple[Path | None, Path]:
    """``(variant directory or None, resumable work directory)`` of a training verb: ``out`` is
    refused when it exists (unless ``overwrite``), the work directory defaults to ``OUT.work``, and
    one of the two is required."""
    if out is None and work_dir is None:
        raise SdwbError(f"{verb}: give an output directory or a work directory")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    return out, Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")


def dir_mb(path: Path) -> float:
    """MB of the weight files under ``path``, rounded as records keep it."""
    return round(weights_mb(path), 3)


def save_float(pipe, directory: Path) -> None:
    """``save_pretrained`` with each all-fp32 component stored in fp16 when that is lossless.

    Why: a parent shipped in fp16 (``builtin:tiny-shapes``) loads as fp32 whose values all fit
    fp16; storing them as fp32 would double the variant's size on disk for no information.
    """
    cast = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        if floats and all(t.dtype == torch.float32 and torch.equal(t, t.half().float()) for t in floats):
            torch.nn.Module.to(module, dtype=torch.float16)
            cast.append(module)
    try:
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        for module in cast:
            torch.nn.Module.to(module, dtype=torch.float32)


def finish_record(tmp: Path, record: dict) -> dict:
    """Sizes and file hashes into ``record``, then ``tmp/sdwb.json`` (last, inside the atomic dir)."""
    from sdwb.runs import atomic_write_json

    record["metrics"]["size_mb"] = dir_mb(tmp)
    parent_path = (record.get("parent") or {}).get("path")
    if parent_path:
        record["metrics"]["parent_size_mb"] = dir_mb(Path(parent_path))
    record["files"] = hash_files(tmp, skip=(RECORD, MANIFEST))
    atomic_write_json(tmp / RECORD, record)
    return record


def write_float_variant(pipe, out: Path, record: dict, overwrite: bool, say: Callable[[str], None]) -> dict:
    """A torch variant: the pipeline's weights and its completed record, in one atomic directory."""
    from sdwb.runs import atomic_dir

    say(f"writing {out}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_float(pipe, tmp)
        finish_record(tmp, record)
    return record


def scratch_dir(near: Path):
    """A temporary directory on the same filesystem as ``near`` (float exports can be GBs)."""
    near.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{near.name}.work-", dir=near.parent)


def copy_export(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy an export tree except the files in ``skip`` (relative paths)."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and rel not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)
