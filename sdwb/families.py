"""The Stable Diffusion families the workbench supports, and which verbs each supports.

Why one table: the loader (which diffusers pipeline class to build, which components must be on
disk), every verb's up-front check and ``sdwb models`` / the README's families table read the same
rows, so a family is never half supported in silence: a verb a family does not support yet is a
one-line error before any work, naming what is supported.

Families are told apart by the pipeline class (``model_index.json``'s ``_class_name``) and, for
SD 1.x vs 2.x (same class), by the UNet's config: SD 2.x has linear attention projections
(``use_linear_projection``) and a 1024-wide OpenCLIP ViT-H context; SD 1.x neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdwb.errors import SdwbError

# The verbs of the support table, in display order (a verb is a CLI command or backend).
VERBS = (
    "generate",
    "bench",
    "quantize (torch)",
    "quantize (onnxruntime)",
    "quantize (openvino)",
    "prune",
    "distill",
    "cache",
    "export onnx",
    "backend onnxruntime",
    "export openvino",
    "backend openvino",
    "export tensorrt",
    "lora train",
)


@dataclass(frozen=True)
class Family:
    """One supported family: its diffusers pipeline class, components on disk, supported verbs."""

    name: str  # sd1 | sd2 | sdxl
    label: str  # SD 1.x | SD 2.x | SDXL
    pipeline_class: str
    components: tuple[str, ...]
    verbs: tuple[str, ...]
    note: str = ""

    def supports(self, verb: str) -> bool:
        return verb in self.verbs


_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD 1.x", "StableDiffusionPipeline", _SD_COMPONENTS, VERBS,
                  "CLIP ViT-L text encoder (768), epsilon prediction; tiny-shapes and sd15-arch"),
    "sd2": Family("sd2", "SD 2.x", "StableDiffusionPipeline", _SD_COMPONENTS, VERBS,
                  "OpenCLIP ViT-H text encoder (1024), linear projections, v-prediction"),
    "sdxl": Family(
        "sdxl", "SDXL", "StableDiffusionXLPipeline",
        _SD_COMPONENTS + ("text_encoder_2", "tokenizer_2"),
        # TensorRT runners take one output per engine; lora train drives one text encoder
        tuple(v for v in VERBS if v not in ("export tensorrt", "lora train")),
        "two text encoders + pooled embeddings and micro-conditioning (added_cond_kwargs); sdxl-arch",
    ),
}
PIPELINE_CLASSES = tuple(dict.fromkeys(f.pipeline_class for f in FAMILIES.values()))


def supported_text() -> str:
    """``StableDiffusionPipeline (SD 1.x, SD 2.x), StableDiffusionXLPipeline (SDXL)``."""
    parts = []
    for cls in PIPELINE_CLASSES:
        labels = ", ".join(f.label for f in FAMILIES.values() if f.pipeline_class == cls)
        parts.append(f"{cls} ({labels})")
    return ", ".join(parts)


def check_pipeline_class(cls: object, where: str) -> None:
    """Refuse a pipeline class the workbench does not support, naming those it does."""
    if cls not in PIPELINE_CLASSES:
        raise SdwbError(f"unsupported pipeline: {where} describes a {cls}; supported: {supported_text()}")


def components_of(cls: str) -> tuple[str, ...]:
    """The components a pipeline of class ``cls`` must have on disk."""
    return next(f.components for f in FAMILIES.values() if f.pipeline_class == cls)


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (torch or exported): SDXL by class, SD 2.x by its UNet's
    cross-attention width; an exported pipeline names its own (``family`` attribute)."""
    known = getattr(pipe, "family", None)
    if isinstance(known, str) and known in FAMILIES:
        return FAMILIES[known]
    if type(pipe).__name__.startswith("StableDiffusionXL") or hasattr(pipe, "text_encoder_2"):
        return FAMILIES["sdxl"]
    config = getattr(getattr(pipe, "unet", None), "config", None)
    return family_from_configs(type(pipe).__name__, dict(config) if config is not None else {})


def family_from_configs(pipeline_class: str, unet_config) -> Family:
    """The family from the pipeline class and the UNet's config (a dict or diffusers' FrozenDict):
    SD 2.x's UNets have linear attention projections and a 1024-wide (OpenCLIP ViT-H) context."""
    if pipeline_class == FAMILIES["sdxl"].pipeline_class:
        return FAMILIES["sdxl"]
    config = unet_config if isinstance(unet_config, dict) else {}
    sd2 = config.get("cross_attention_dim") == 1024 or bool(config.get("use_linear_projection"))
    return FAMILIES["sd2"] if sd2 else FAMILIES["sd1"]


def check_verb(family: Family, verb: str) -> Family:
    """``family``, or a one-line error when ``verb`` does not support it yet."""
    if not family.supports(verb):
        others = ", ".join(f.label for f in FAMILIES.values() if f.supports(verb))
        raise SdwbError(f"{verb}: not supported for {family.label} pipelines yet (supported for {others}); "
                        f"{family.label} supports {', '.join(family.verbs)}")
    return family


def require(pipe, verb: str) -> Family:
    """The loaded pipeline's family, or a one-line error when ``verb`` does not support it yet."""
    return check_verb(family_of(pipe), verb)


def support_table() -> list[dict]:
    """One row per family: label, pipeline class, and yes/no per verb (for ``sdwb models``)."""
    return [
        {"family": f.label, "pipeline": f.pipeline_class, "note": f.note,
         **{verb: f.supports(verb) for verb in VERBS}}
        for f in FAMILIES.values()
    ]
