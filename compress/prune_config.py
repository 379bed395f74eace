"""The pruning recipe: one typed config (``PruneConfig``), validated on load like the quantization ones.

Why typed: a pruned variant must be reproducible from one YAML file (``configs/prune/*.yaml``)
plus ``--set`` overrides, and a typo or an impossible value (``ratio: 1.5``) must fail before a
model is loaded, as one line naming the key. The resolved config (every default filled in) is what
the variant's ``sdwb.json`` records. Two methods:

- ``channels``: structured channel pruning through torch-pruning's dependency graph, plus whole
  attention heads (:mod:`compress.prune_channels`); ``ratio`` is the fraction removed per group.
- ``blocks``: BK-SDM-style removal of named residual / attention blocks (:mod:`sdwb.variants.unet_blocks`).

Either may be followed by recovery fine-tuning (``finetune.steps > 0``, :mod:`compress.recovery`):
the pruned student learns from the unpruned teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

DEFAULT_IGNORED = ["conv_in", "conv_out", "time_embedding"]
# BK-SDM (Kim et al. 2023) drops the mid-stage and one residual+attention pair per stage; with one
# layer per down block (tiny-shapes), the up blocks' second pair is the removable one.
DEFAULT_BLOCKS = ["mid_block", "up_blocks.*.resnets.1", "up_blocks.*.attentions.1"]
CHANNEL_ONLY = {"ratio", "importance", "ignored_layers", "round_to", "prune_heads", "taylor"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(_Strict):
    """Denoising data for Taylor importance and recovery: the shapes train stream, VAE-encoded once."""

    latent_pool: int = Field(1024, ge=8, le=1_000_000, description="train images encoded by the VAE")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="empty captions (keeps CFG working)")
    seed: int = Field(0, ge=0, description="every batch, noise and timestep is a function of (seed, step)")


class TaylorConfig(_Strict):
    """First-order Taylor importance |w * dL/dw|, gradients of the denoising loss summed over batches."""

    batches: int = Field(4, ge=1, le=1000)
    batch: int = Field(16, ge=1, le=4096)


class FinetuneConfig(_Strict):
    """Recovery by distillation: student (pruned) vs teacher (unpruned) on shapes data."""

    steps: int = Field(0, ge=0, description="optimizer steps; 0 = no recovery")
    batch: int = Field(32, ge=1, le=4096)
    lr: float = Field(2e-4, gt=0.0)
    warmup: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    output_weight: float = Field(1.0, ge=0.0, description="MSE of the noise predictions, student vs teacher")
    feature_weight: float = Field(
        0.5, ge=0.0, description="relative MSE at down/mid/up block outputs (1x1-projected if widths differ)"
    )
    task_weight: float = Field(0.5, ge=0.0, description="denoising MSE against the true noise")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (AMX; big UNets)")
    checkpoint_every: int = Field(200, ge=1, description="resumable checkpoint period (steps)")
    eval_batches: int = Field(2, ge=1, le=100, description="fixed held-out batches: distill MSE before/after")


class PruneConfig(_Strict):
    """What to remove from the UNet and how to recover; see the module docstring."""

    method: Literal["channels", "blocks"] = "channels"
    ratio: float = Field(0.3, gt=0.0, lt=1.0, description="channels: fraction of channels and heads removed")
    importance: Literal["magnitude", "taylor"] = Field("magnitude", description="channels: how to rank")
    ignored_layers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORED),
        description="channels: module names / globs whose outputs keep their width",
    )
    round_to: int = Field(8, ge=1, le=256, description="channels: kept widths are multiples of this")
    prune_heads: bool = Field(True, description="channels: remove whole attention heads at the same ratio")
    blocks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BLOCKS), min_length=1,
        description="blocks: module names / globs of resnets, attentions or mid_block to remove",
    )
    taylor: TaylorConfig = Field(default_factory=TaylorConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _method_keys(self) -> PruneConfig:
        """A key of the other method is a mistake (it would be silently ignored), as is recovery
        with every loss weight at 0."""
        given = self.model_fields_set
        if self.method == "blocks" and CHANNEL_ONLY & given:
            raise ValueError(f"{', '.join(sorted(CHANNEL_ONLY & given))}: used by method 'channels' only "
                             "(method blocks removes the modules named in 'blocks')")
        if self.method == "channels" and "blocks" in given:
            raise ValueError("blocks: used by method 'blocks' only (method is 'channels')")
        ft = self.finetune
        if ft.steps and ft.output_weight + ft.feature_weight + ft.task_weight <= 0:
            raise ValueError("finetune: output_weight, feature_weight and task_weight are all 0")
        return self

    @model_serializer(mode="wrap")
    def _only_method_keys(self, handler):
        """Dumps carry only the chosen method's keys, so a dumped config (sdwb.json, a resolved
        recipe) parses again: the other method's defaults would read as given keys."""
        unused = {"blocks"} if self.method == "channels" else CHANNEL_ONLY
        return {k: v for k, v in handler(self).items() if k not in unused}


def parse_prune_config(data: dict, source: str = "prune config") -> PruneConfig:
    """Validate ``data`` as a :class:`PruneConfig`; every problem is one ``SdwbError`` line."""
    from sdwb.schema_errors import parse_model

    return parse_model(PruneConfig, data, source, "prune")


def load_prune_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **flags: Any
) -> PruneConfig:
    """Read ``configs/prune/*.yaml`` (or start empty), apply ``--set`` overrides, then ``flags``
    (command-line options, dotted keys for sections; None values ignored), and validate."""
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, flags)
    return parse_prune_config(data, source)


def resolved(config: PruneConfig) -> dict:
    """The config with every default filled in, as plain JSON data (recorded in sdwb.json); only the
    chosen method's keys (see ``PruneConfig._only_method_keys``), so the result parses again."""
    return config.model_dump(mode="json")
