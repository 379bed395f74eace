"""``sdwb lora fuse``: merge a LoRA into a model's float weights and write the result as a variant.

Why a variant: quantizers, exporters and distillation read plain float weights. Fusing first is
the route that every one of them then supports unchanged (the route NVIDIA ModelOpt recommends for
quantized LoRA deployment): ``lora fuse`` then ``compress quantize`` / ``export onnx`` /
``compress distill`` on the result. A pruned parent gets the adapter projected onto its kept
channels (:func:`sdwb.lora.project`). The record keeps the adapter's sha256, scale and the pairs
dropped by pruning; the parent chain keeps the rest (a distilled parent's steps and guidance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sdwb.errors import SdwbError


def fuse_variant(model: str, lora: str, out: str | Path, *, scale: float = 1.0, overwrite: bool = False,
                 say: Callable[[str], None] = lambda _m: None) -> dict:
    """Write ``out``: ``model`` with ``lora`` fused in at ``scale``; returns the record."""
    from compress.variant_io import load_source, write_float_variant
    from sdwb.lora import apply_lora, read_adapter
    from sdwb.variants.kept import find_kept
    from sdwb.variants.record import new_record

    out = Path(out)
    if out.exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    adapter = read_adapter(lora)  # checked before the model loads
    say(f"loading {model}")
    src = load_source(model, refuse={
        "quantize": "{spec}: already quantized ({method}); fuse the LoRA into its parent ({parent}), then "
                    "quantize the result",
        "lora": "{spec}: already has a LoRA fused in; fuse into its parent ({parent}) or keep it",
    }, export_error="{spec}: an export; fuse the LoRA into the pipeline it was exported from, then export "
                    "the result")
    kept = find_kept(src.parent.get("variant"))
    applied = apply_lora(src.pipe, adapter, scale, fuse=True, kept=kept)
    dropped = applied["pairs_dropped"]
    say(f"fused {applied['pairs']} LoRA pairs (rank {applied['rank']}, scale {scale:g})"
        + (f"; {dropped} dropped with their pruned layers" if dropped else ""))
    record = new_record(stage="lora", method="fuse", backend="torch",
                        weights="float pipeline with the LoRA merged into its weights",
                        parent=src.parent, config={"lora": lora, "scale": scale}, metrics={},
                        lora=applied, extra_libraries=("peft",))
    return write_float_variant(src.pipe, out, record, overwrite, say)
