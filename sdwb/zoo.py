"""The model zoo: the builtin models, what each is for, and whether it is present.

Why: ``builtin:<name>`` is how recipes and the CLI name the project's own models. Two are
trained by the project and shipped under ``sdwb/assets/`` (absent until ``sdwb baseline train``
has produced them), ``tiny-shapes-4step`` is distilled from tiny-shapes by ``sdwb compress
distill`` (absent until that has run); ``sd15-arch`` and ``sdxl-arch`` are SD 1.5's and SDXL base's
architectures built in code (:mod:`sdwb.sd15`, :mod:`sdwb.sdxl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
TRAIN_COMMAND = "sdwb baseline train"
LORA_COMMAND = ("sdwb lora train --model builtin:tiny-shapes -c configs/lora/tiny-shapes-ring.yaml "
                "-o sdwb/assets/tiny-shapes-lora-ring")
DISTILL_COMMAND = (
    "sdwb compress distill -c configs/distill/distill4.yaml --model builtin:tiny-shapes "
    "-o sdwb/assets/tiny-shapes-4step"
)


def assets_dir() -> Path:
    """The directory holding the shipped weights of the builtin models."""
    return Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class BuiltinModel:
    """One builtin model. ``kind`` is ``"pipeline"`` (diffusers SD) or ``"judge"`` (CLIP)."""

    name: str
    description: str
    quality_metrics: bool
    kind: str
    asset: str | None  # sub-directory of assets_dir(); None: built in code
    produced_by: str = TRAIN_COMMAND  # the command that makes a shipped model (named when missing)
    builder: str | None = None  # "module:function" that builds a model made in code
    family: str = "sd1"  # sdwb.families key

    @property
    def path(self) -> Path | None:
        """Where the shipped weights live, or None for a model built in code."""
        return assets_dir() / self.asset if self.asset else None

    @property
    def location(self) -> str:
        """The assets path as text, or ``"built in code"``."""
        return str(self.path) if self.path else "built in code"

    @property
    def marker(self) -> str | None:
        """The file whose presence means the model is shipped (None for built-in-code models)."""
        if self.asset is None:
            return None
        return {"pipeline": "model_index.json", "lora": "pytorch_lora_weights.safetensors"}.get(self.kind,
                                                                                               "config.json")

    def available(self) -> bool:
        """True when the model can be loaded now (its directory is shipped, or it is code)."""
        return self.path is None or (self.path / self.marker).is_file()


_MODELS = (
    BuiltinModel(
        name="builtin:tiny-shapes",
        description="Tiny Stable Diffusion (UNet2DConditionModel + AutoencoderKL + CLIP text encoder) "
        "trained by the project on the shapes data set; the default model, quality is measurable",
        quality_metrics=True,
        kind="pipeline",
        asset="tiny-shapes",
    ),
    BuiltinModel(
        name="builtin:shapes-judge",
        description="CLIP model trained separately on the shapes domain; scores CLIP score and "
        "attribute accuracy of tiny-shapes and its variants (not a generator)",
        quality_metrics=True,
        kind="judge",
        asset="shapes-judge",
    ),
    BuiltinModel(
        name="builtin:tiny-shapes-4step",
        description="tiny-shapes step-distilled to 4 DDIM steps with classifier-free guidance "
        "distilled in (progressive + guidance distillation, configs/distill/distill4.yaml): one UNet "
        "call per step; its sdwb.json sets 4 steps, ddim, guidance 1.0 (distilled from the previous "
        "tiny-shapes weights, git commit bc35f7d; its sdwb.json holds their hashes)",
        quality_metrics=True,
        kind="pipeline",
        asset="tiny-shapes-4step",
        produced_by=DISTILL_COMMAND,
    ),
    BuiltinModel(
        name="builtin:tiny-shapes-lora-ring",
        description="LoRA adapter (UNet attention projections) for tiny-shapes that teaches a new shape, "
        "rings, which its data never had (sdwb.shapes_lora); checked from the pixels",
        quality_metrics=True,
        kind="lora",
        asset="tiny-shapes-lora-ring",
        produced_by=LORA_COMMAND,
    ),
    BuiltinModel(
        name="builtin:sd15-arch",
        description="Stable Diffusion 1.5's real architecture (UNet 859.5 M params, 512x512) with "
        "seeded random weights: full-scale latency, memory and export; no meaningful images",
        quality_metrics=False,
        kind="pipeline",
        asset=None,
        builder="sdwb.sd15:build_sd15_pipeline",
    ),
    BuiltinModel(
        name="builtin:sdxl-arch",
        description="SDXL base 1.0's real architecture (UNet 2567.5 M params, CLIP ViT-L + OpenCLIP "
        "ViT-bigG text encoders, 1024x1024) with seeded random weights: full-scale latency and "
        "memory; no meaningful images",
        quality_metrics=False,
        kind="pipeline",
        asset=None,
        builder="sdwb.sdxl:build_sdxl_pipeline",
        family="sdxl",
    ),
)


def list_models() -> list[BuiltinModel]:
    """All builtin models, in display order."""
    return list(_MODELS)


def get_builtin(name: str) -> BuiltinModel:
    """The builtin model called ``name`` (with or without the ``builtin:`` prefix)."""
    from sdwb.errors import SdwbError

    full = name if name.startswith(BUILTIN_PREFIX) else BUILTIN_PREFIX + name
    for model in _MODELS:
        if model.name == full:
            return model
    known = ", ".join(m.name for m in _MODELS)
    raise SdwbError(f"unknown builtin model '{name}': expected one of {known}")


def missing_message(model: BuiltinModel) -> str:
    """The one-line error for a shipped model whose directory is not there yet."""
    return (
        f"{model.name} has not been trained/shipped yet: no {model.marker} in {model.path} "
        f"(run `{model.produced_by}` to produce it)"
    )
