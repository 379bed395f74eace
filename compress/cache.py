"""``make_cache_variant(source, config, out)``: the ``sdwb compress cache`` verb.

A training-free acceleration (:mod:`sdwb.cache`: DeepCache, Token Merging) changes how the UNet
runs, not its weights. So the variant is the source's weights stored as every torch variant
stores them -- :func:`compress.variant_io.save_float` of the float pipeline, or, for a torch
quantized source, the source's files copied as they are (its ``sdwb.json`` becomes the parent
record, and loading re-quantizes them from it) -- plus ``sdwb.json`` with ``stage: cache`` and the
resolved config. ``sdwb.loading.load_pipeline`` re-applies the method on every load, so
``sdwb generate``, ``sdwb bench`` (torch rows) and recipes take the variant without flags.

Refused before anything is written, in one line: an ONNX / OpenVINO export (the methods patch
torch modules), a source that is already a cache variant (one method per model), and what the
method itself refuses on this UNet (a DeepCache branch it does not have, ToMe on a UNet without
transformer blocks at ``max_downsample``): the method is applied once to the loaded source as the
check.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdwb.cache.config import STAGE, CacheConfig, apply_cache, remove_cache, resolved
from sdwb.errors import SdwbError
from sdwb.variants.record import RECORD, is_quantized, new_record

ALREADY = ("{spec}: already a cache variant ({method}); one method per model: apply the new one to the "
           "model it was made from ({parent})")
EXPORT_ERROR = ("{spec}: an ONNX / OpenVINO export; deepcache and tomesd patch the torch UNet: give the "
                "diffusers model it was exported from")


@dataclass
class CacheVariant:
    """What :func:`make_cache_variant` wrote: the method, its summary on this UNet, the record."""

    method: str
    summary: dict
    record: dict
    path: Path


def make_cache_variant(source, config: CacheConfig, out: str | Path, *, overwrite: bool = False,
                       say: Callable[[str], None] | None = None) -> CacheVariant:
    """Check ``config`` on ``source``'s UNet, then write the cache variant ``out``."""
    from compress.variant_io import finish_record, load_source, save_float
    from sdwb.loading import require_family
    from sdwb.runs import atomic_dir

    say = say or (lambda _msg: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    require_family(source, "cache")
    say("loading the source model")
    src = load_source(source, refuse={STAGE: ALREADY}, export_error=EXPORT_ERROR)
    pipe = src.pipe
    summary = apply_cache(pipe, config)  # the method's own refusals on this UNet, before writing
    remove_cache(pipe)
    parent_record = src.parent.get("variant")
    say(f"writing {out}")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if is_quantized(parent_record):
            _copy_files(src.path, tmp)
            weights = f"the parent's files as they are ({parent_record.get('method')}, re-applied on load)"
        else:
            save_float(pipe, tmp)
            weights = "the parent's float weights (fp16 where lossless)"
        record = finish_record(tmp, new_record(
            stage=STAGE, method=config.method, backend="torch", weights=weights, parent=src.parent,
            config=resolved(config), metrics={"summary": summary},
        ))
    return CacheVariant(config.method, summary, record, out)


def _copy_files(source: Path | None, destination: Path) -> None:
    """Every file of the quantized parent but its record (the parent's record is in ours)."""
    if source is None:
        raise SdwbError("cache: a quantized source must be a variant directory")
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if p.is_file() and rel.as_posix() != RECORD:
            (destination / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, destination / rel)
