"""Typed configuration of `sdwb baseline train` (defaults = the run that produced the shipped weights).

Why: the shipped models must be reproducible from a command and a config that validates itself.
``--fast`` swaps in :func:`fast_config`, a one-to-two-minute version used by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdwb.errors import SdwbError
from sdwb.yaml_io import Scheduler


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeTrain(_Strict):
    steps: int = Field(2500, ge=1)
    batch: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    weight_decay: float = 0.05
    minimal_pairs: float = Field(
        0.5, ge=0, le=1, description="share of each batch in minimal pairs (half of it shape-swapped twins)"
    )
    eval_images: int = Field(1080, ge=1, description="held-out images for the zero-shot accuracy")


class VaeTrain(_Strict):
    steps: int = Field(1600, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(50, ge=0)
    calib_images: int = Field(512, ge=2, description="held-out images for scaling factor and PSNR")
    kl_weight: float = Field(2e-4, ge=0, description="weight of the mean per-element KL term")
    foreground_weight: float = Field(
        10.0, ge=0, description="extra reconstruction weight of shape pixels (they are ~4% of an image)"
    )


class UnetPhase(_Strict):
    """From ``start`` (a fraction of the UNet steps) on: this caption dropout and loss weighting."""

    start: float = Field(ge=0, lt=1, description="fraction of unet.steps where this phase begins")
    caption_dropout: float = Field(ge=0, lt=1)
    min_snr_gamma: float | None = None
    agreement_weight: float = Field(
        0.0, ge=0, description="weight of the low-noise branch-agreement loss in this phase (0 = off)"
    )


class PhaseSettings(NamedTuple):
    """What the UNet's loss uses at one step (see :meth:`UnetTrain.phase_at`)."""

    caption_dropout: float
    min_snr_gamma: float | None
    agreement_weight: float


def _shipped_curriculum() -> list[UnetPhase]:
    return [
        UnetPhase(start=0.6, caption_dropout=0.3, min_snr_gamma=None, agreement_weight=3.0),
        UnetPhase(start=0.8, caption_dropout=0.5, min_snr_gamma=None, agreement_weight=3.0),
    ]


class UnetTrain(_Strict):
    steps: int = Field(3700, ge=1)
    batch: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(200, ge=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty captions (for CFG)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    min_snr_gamma: float | None = Field(5.0, description="Min-SNR loss weighting; null = plain MSE")
    min_snr_floor: float = Field(
        1.0, gt=0, description="v-prediction: the Min-SNR weight's SNR floor (keeps zero-SNR steps trained)"
    )
    latent_pool: int = Field(32768, ge=1, description="pre-encoded training images (random templates)")
    lr_floor: float = Field(0.25, ge=0, le=1, description="cosine decay ends at this fraction of lr")
    agreement_weight: float = Field(
        0.0,
        ge=0,
        description="branch agreement: for captioned samples with t < agreement_t_max, the empty-caption "
        "prediction is also trained toward the (stop-gradient) captioned one, weighted by this; 0 = off",
    )
    agreement_t_max: int = Field(
        400, ge=1, le=1000, description="branch agreement applies below this timestep"
    )
    phases: list[UnetPhase] = Field(
        default_factory=_shipped_curriculum,
        description="later phases that change caption_dropout / min_snr_gamma / agreement_weight "
        "(a curriculum); "
        "before the first one, the top-level values apply",
    )

    @model_validator(mode="after")
    def _phases_in_order(self) -> UnetTrain:
        starts = [p.start for p in self.phases]
        if starts != sorted(set(starts)):
            raise ValueError(f"phases must start at strictly increasing fractions, got {starts}")
        return self

    def phase_at(self, step: int) -> PhaseSettings:
        """The settings in force at ``step``: a pure function of the step, so a resumed run
        continues the curriculum exactly where it was killed."""
        now = PhaseSettings(self.caption_dropout, self.min_snr_gamma, self.agreement_weight)
        for phase in self.phases:
            if step >= phase.start * self.steps:
                now = PhaseSettings(phase.caption_dropout, phase.min_snr_gamma, phase.agreement_weight)
        return now


class EvalConfig(_Strict):
    prompts: int = Field(270, ge=1)
    steps: int = Field(50, ge=1)
    guidance: float = 7.5
    scheduler: Scheduler = "ddim"
    batch: int = Field(54, ge=1)
    grid: int = Field(36, ge=0, description="images in the saved grid")


class BaselineTrainConfig(_Strict):
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"
    checkpoint_every: int = Field(200, ge=1)
    store_dtype: Literal["fp16", "fp32"] = Field(
        "fp16", description="storage dtype of the tiny-shapes UNet and VAE"
    )
    judge: JudgeTrain = JudgeTrain()
    vae: VaeTrain = VaeTrain()
    unet: UnetTrain = UnetTrain()
    eval: EvalConfig = EvalConfig()


def fast_config() -> BaselineTrainConfig:
    """A 1-2 minute end-to-end run: every stage, a handful of steps. Quality is not the point."""
    return BaselineTrainConfig(
        checkpoint_every=10,
        judge=JudgeTrain(steps=10, batch=16, warmup=2, eval_images=32),
        vae=VaeTrain(steps=10, batch=8, warmup=2, calib_images=32),
        unet=UnetTrain(steps=15, batch=8, warmup=2, latent_pool=64),
        eval=EvalConfig(prompts=4, steps=3, batch=4, grid=4),
    )


def load_train_config(path: str | Path | None, fast: bool = False) -> BaselineTrainConfig:
    """The config from a YAML file (unknown keys are errors), or the defaults / the fast preset.

    With both a file and ``fast``, the file's settings (learning rates, curriculum, ...) are kept
    and only the sizes the fast preset sets (steps, batches, pools, eval counts) replace them."""
    if path is None:
        return fast_config() if fast else BaselineTrainConfig()
    path = Path(path)
    if not path.is_file():
        raise SdwbError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SdwbError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from exc
    if fast:  # the file's settings at the fast preset's sizes (steps, batches, pools, eval counts)
        data = _merge(data, fast_config().model_dump(exclude_unset=True))
    try:
        return BaselineTrainConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SdwbError(f"{path}: {where}: {err['msg']}") from exc


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
