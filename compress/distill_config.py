"""``DistillConfig``: the typed, validated settings of a step-distillation run (``configs/distill/``).

Why typed: a distillation run costs tens of CPU minutes per round; a typo (``student_step: 4``)
or an impossible schedule (64 -> 6 steps is not a chain of halvings) must fail before a model is
loaded. Unknown keys are errors, types are strict, and every problem is one ``SdwbError`` line
naming the source, the key and what was expected. The resolved config is recorded in the
student's ``sdwb.json`` and keys the resumable work directory.

``budget`` is per round: an integer (or ``"200"``) is optimizer steps; ``"90s"``, ``"10m"``,
``"1.5h"`` is wall-clock time (the learning-rate schedule then follows elapsed time, so a run
under a time budget is seeded but not bit-reproducible).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress import lcm, progressive  # noqa: F401  (register the distillation methods)
from compress.distill_methods import METHODS as REGISTRY
from sdwb.errors import SdwbError

METHODS = tuple(REGISTRY)  # progressive, lcm: every registered method
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(value: Union[int, str]) -> tuple[str, float]:
    """``("steps", n)`` or ``("seconds", s)`` for a budget such as 200, "200", "10m", "90s", "1.5h"."""
    if isinstance(value, bool):
        raise ValueError(f"expected optimizer steps (200) or a duration (10m, 90s, 1.5h), got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        steps = int(value)
        if steps < 1:
            raise ValueError(f"expected at least 1 step per round, got {steps}")
        return "steps", float(steps)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"expected optimizer steps (200) or a duration (10m, 90s, 1.5h), got {value!r}")
    return "seconds", float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class DistillConfig(BaseModel):
    """Progressive distillation (Salimans & Ho 2022), optionally with guidance distillation
    (Meng et al. 2023) in the first round: ``teacher_steps`` -> ... -> ``student_steps``; or latent
    consistency distillation (``method: lcm``, Luo et al. 2023): one run against the guided
    teacher's ``teacher_steps``-point ODE grid, sampled with ``LCMScheduler`` in ``student_steps``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "progressive", description=" | ".join(f"{m.name} ({m.summary})" for m in REGISTRY.values()))
    teacher_steps: int = Field(64, ge=2, le=1000, description="DDIM steps of the teacher in round 1")
    student_steps: int = Field(4, ge=1, le=500, description="DDIM steps of the final student")
    guidance_distill: bool = Field(
        False, description="round 1's teacher is the guided prediction at `guidance`; the student sees "
        "only the prompt and then runs with guidance 1.0 (one UNet call of batch B per step)")
    guidance: float = Field(
        7.5, ge=1.0, le=50.0, description="CFG scale: absorbed with guidance_distill, else the student's "
        "default guidance at inference")
    budget: Union[int, str] = Field(200, description="per round: optimizer steps, or a duration 10m/90s/1h")
    guidance_budget: Optional[Union[int, str]] = Field(
        None, description="budget of the round that distils guidance (round 1 with guidance_distill), "
        "the hardest one: its loss starts ~20x above a plain halving round's; null: budget")
    batch: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    warmup: int = Field(20, ge=0, description="linear warm-up steps of each round")
    lr_floor: float = Field(0.1, ge=0.0, le=1.0, description="cosine decay to this fraction of lr")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: Optional[float] = Field(
        0.995, gt=0.0, lt=1.0, description="the saved student of each round is its EMA; null: raw weights")
    weighting: Literal["truncated-snr", "snr+1"] = Field(
        "truncated-snr", description="x-space loss weight max(SNR, 1) or SNR + 1 (Salimans & Ho, sec. 4)")
    caption_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="empty-prompt fraction (keeps the unconditional branch for CFG); "
        "unused with guidance_distill, whose student never sees an empty prompt")
    latent_pool: int = Field(4096, ge=1, description="train-stream images pre-encoded by the model's VAE")
    trajectory_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="progressive: the share of each batch that starts on the round "
        "teacher's own (guided) DDIM path from noise, at the student's grid point, instead of at a noised "
        "train-stream latent: the points the student walks at inference (compress/trajectories.py)")
    trajectory_pool: int = Field(
        1024, ge=1, description="teacher paths sampled per round for trajectory_fraction (each costs the "
        "round's teacher steps of UNet calls, once; cached in the work directory)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast for the UNet calls")
    target_ema: float = Field(
        0.95, gt=0.0, lt=1.0, description="lcm: EMA decay of the target network (stop-gradient) per step")
    huber_c: float = Field(0.001, gt=0.0, description="lcm: pseudo-Huber loss constant")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")

    @field_validator("budget", "guidance_budget")
    @classmethod
    def _budget(cls, value):
        if value is None:
            return None
        kind, amount = parse_budget(value)
        return int(amount) if kind == "steps" else value.strip()

    @model_validator(mode="after")
    def _schedule(self) -> DistillConfig:
        REGISTRY[self.method].validate(self)
        if self.trajectory_fraction and not REGISTRY[self.method].trajectory_starts:
            raise ValueError(f"trajectory_fraction: method {self.method} draws its own start points "
                             "(only progressive starts on the teacher's paths); leave it at 0")
        return self

    @property
    def rounds(self) -> int:
        """Number of rounds (progressive: halvings; lcm: one run)."""
        return len(self.round_steps())

    def round_steps(self) -> list[tuple[int, int]]:
        """``[(teacher N, student N/2), ...]`` for every round, in order; lcm: ``[(N, student_steps)]``."""
        return REGISTRY[self.method].round_steps(self)

    @property
    def budget_kind(self) -> tuple[str, float]:
        return parse_budget(self.budget)

    def round_budget(self, guided: bool) -> tuple[str, float]:
        """``("steps", n)`` or ``("seconds", s)`` of a round; ``guided``: it distils guidance."""
        if guided and self.guidance_budget is not None:
            return parse_budget(self.guidance_budget)
        return self.budget_kind


def resolved(config: DistillConfig) -> dict:
    """The config with every default filled in, as plain JSON data (recorded in sdwb.json)."""
    return config.model_dump(mode="json")


def parse_distill_config(data: Any, source: str = "distill config") -> DistillConfig:
    """Validate ``data`` as a :class:`DistillConfig`; one-line errors naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise SdwbError(f"{source}: expected a mapping of distillation keys, got {type(data).__name__}")
    method = data.get("method", "progressive")
    if method not in METHODS:
        raise SdwbError(f"{source}: method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    from sdwb.schema_errors import fields_of, format_errors

    try:
        return DistillConfig.model_validate(data)
    except ValidationError as e:
        raise SdwbError(f"{source}: {format_errors(e, allowed=fields_of(DistillConfig))}") from None


def load_distill_config(path: str | Path | None = None, overrides: list[str] | None = None,
                        **flags: Any) -> DistillConfig:
    """Read ``configs/distill/*.yaml`` (or start from the defaults), apply ``--set KEY=VALUE``
    overrides, then ``flags`` (command-line options; None values are ignored), and validate."""
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, flags)
    return parse_distill_config(data, source)
