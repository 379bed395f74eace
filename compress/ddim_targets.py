"""DDIM (eta = 0) on diffusers' discrete grid, and the progressive-distillation target.

Why exact diffusers arithmetic: a distilled student is sampled by plain diffusers
(``DDIMScheduler`` from its saved config), so the grid it is trained on and the update it learns
must be bit-for-bit what ``DDIMScheduler.set_timesteps(N)`` / ``.step`` do:

- the grid of N steps is ``set_timesteps(N).timesteps`` with ``timestep_spacing="trailing"``
  (``round(arange(T, 0, -T/N)) - 1``): T/N is exact in binary for T = 1000 and N a power of two,
  so the N/2 grid is exactly every other point of the N grid (``"leading"`` grids, the SD
  default, do not nest: 1000 // 64 = 15 but 1000 // 32 = 31), and it starts at t = T - 1;
- a step from t lands on ``alphas_cumprod[t - T // N]`` (``final_alpha_cumprod`` below 0), as
  ``DDIMScheduler.step`` computes it, even where that is one timestep off the next grid point.

Progressive distillation (Salimans & Ho 2022, Algorithm 2): from ``z_t`` the teacher takes two
DDIM steps of the N grid; the student, one step of the N/2 grid, must land on the same point.
With ``a = sqrt(alpha_bar)``, ``s = sqrt(1 - alpha_bar)``, t the start and p where the student's
step lands, the x0 that makes a DDIM step land exactly on the teacher's ``z_target`` is

    x0 = (z_target - (s_p / s_t) z_t) / (a_p - (s_p / s_t) a_t)

(the denominator is > 0 because the SNR decreases with t), and the student's epsilon target is
``(z_t - a_t x0) / s_t``. Nothing divides by ``a_t`` or by ``s_p``, so the high-noise end
(alpha_bar_t -> 0 at t = 999) and the final step (p below 0: ``final_alpha_cumprod``) are safe.
The loss is in x-space with weight ``max(SNR_t, 1)`` (truncated SNR) or ``SNR_t + 1``: for an
epsilon UNet that is ``max(1, 1/SNR) |eps - eps_target|^2``, i.e. x0 errors count at high noise
where an epsilon error is amplified by ``s_t / a_t`` into the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdwb.errors import SdwbError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def student_scheduler_config(config) -> dict:
    """The DDIM (trailing) scheduler config a distilled student is trained on and saved with."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}  # all explicit
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise SdwbError(f"scheduler prediction_type {prediction!r}: distillation supports "
                        f"{' and '.join(PREDICTION_TYPES)}")
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False,
                                          thresholding=False)
    return dict(scheduler.config)


@dataclass(frozen=True)
class Grid:
    """The N-step DDIM grid: timesteps (descending) and the alpha_bar each step starts / lands at."""

    steps: int
    timesteps: torch.Tensor  # (N,) int64
    alpha_bar: torch.Tensor  # (N,) float32, alphas_cumprod[timesteps]
    alpha_bar_prev: torch.Tensor  # (N,) float32, where DDIMScheduler.step from each timestep lands
    timesteps_prev: torch.Tensor  # (N,) int64, the timestep it lands on (below 0 past the last point)


def ddim_grid(config: dict, steps: int) -> Grid:
    """The grid of ``DDIMScheduler.from_config(config).set_timesteps(steps)``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise SdwbError(f"{steps} DDIM steps: expected 1 to {scheduler.config.num_train_timesteps} "
                        "(the model's training timesteps)")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.clone().long()
    prev = timesteps - scheduler.config.num_train_timesteps // steps
    abar = scheduler.alphas_cumprod
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=abar.dtype)
    prev_abar = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    return Grid(steps, timesteps, abar[timesteps].clone(), prev_abar, prev)


def check_nested(teacher: Grid, student: Grid) -> None:
    """The student's grid must be every other point of the teacher's (two teacher steps per step)."""
    if teacher.steps != 2 * student.steps or not torch.equal(teacher.timesteps[::2], student.timesteps):
        raise SdwbError(
            f"the {student.steps}-step DDIM grid {student.timesteps.tolist()[:6]}... is not every other "
            f"point of the {teacher.steps}-step grid {teacher.timesteps.tolist()[:6]}...: use a "
            "power-of-two teacher_steps (num_train_timesteps / steps must be exact)")


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def split(pred: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """``(x0, eps)`` from a model output at noise level ``alpha_bar`` (per sample), as diffusers does."""
    abar = _expand(alpha_bar, z)
    beta = 1 - abar
    if prediction_type == "epsilon":
        return (z - beta ** (0.5) * pred) / abar ** (0.5), pred
    if prediction_type == "v_prediction":
        return (abar**0.5) * z - (beta**0.5) * pred, (abar**0.5) * pred + (beta**0.5) * z
    raise SdwbError(f"prediction_type {prediction_type!r}: expected {' or '.join(PREDICTION_TYPES)}")


def ddim_step(pred, z, alpha_bar, alpha_bar_prev, prediction_type: str) -> torch.Tensor:
    """One DDIM (eta = 0) step: ``DDIMScheduler.step``'s arithmetic, per-sample alpha_bar."""
    x0, eps = split(pred, z, alpha_bar, prediction_type)
    prev = _expand(alpha_bar_prev, z)
    return prev ** (0.5) * x0 + (1 - prev) ** (0.5) * eps


def student_target(z_t, z_target, alpha_bar_t, alpha_bar_p, prediction_type: str):
    """``(x0, model-output target)`` whose one DDIM step from ``z_t`` lands exactly on ``z_target``."""
    a_t, a_p = _expand(alpha_bar_t, z_t) ** 0.5, _expand(alpha_bar_p, z_t) ** 0.5
    s_t, s_p = (1 - _expand(alpha_bar_t, z_t)) ** 0.5, (1 - _expand(alpha_bar_p, z_t)) ** 0.5
    ratio = s_p / s_t
    x0 = (z_target - ratio * z_t) / (a_p - ratio * a_t)
    eps = (z_t - a_t * x0) / s_t
    if prediction_type == "epsilon":
        return x0, eps
    if prediction_type == "v_prediction":
        return x0, a_t * eps - s_t * x0
    raise SdwbError(f"prediction_type {prediction_type!r}: expected {' or '.join(PREDICTION_TYPES)}")


def loss_weight(alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample x-space weight: ``max(SNR, 1)`` (truncated-snr) or ``SNR + 1`` (snr+1)."""
    snr = alpha_bar / (1 - alpha_bar)
    if weighting == "truncated-snr":
        return torch.clamp(snr, min=1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise SdwbError(f"weighting {weighting!r}: expected truncated-snr or snr+1")
