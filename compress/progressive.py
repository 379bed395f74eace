"""Progressive distillation (Salimans & Ho 2022), registered as the ``progressive`` method.

Rounds of N -> N/2 DDIM steps; in each round a student initialised from its teacher learns to
take in one step what the teacher takes in two (:mod:`compress.ddim_targets` has the grid and
the target). With guidance distillation (Meng et al. 2023) round 1's teacher runs classifier-free
guidance, one 2B UNet call per step, while the student sees only the prompt. The teacher calls
here are shared with :mod:`compress.lcm`.
"""

from __future__ import annotations

import math

import torch

from compress.ddim_targets import (
    check_nested,
    ddim_step,
    loss_weight,
    split,
    student_target,
)
from compress.distill_methods import DistillMethod, register
from sdwb.conditioning import as_conditioning, cat


def unet_call(unet, z, t, context, precision: str) -> torch.Tensor:
    """``unet(z, t, **context).sample`` in fp32 (under bf16 autocast with ``precision: bf16``);
    ``context``: a conditioning (:mod:`sdwb.conditioning`) or a bare ``encoder_hidden_states``."""
    from sdwb.train.common import autocast

    with autocast(z.device, precision):
        return unet(z, t, **as_conditioning(context)).sample.float()


@torch.no_grad()
def teacher_prediction(teacher, z, t, cond, uncond, guidance: float, precision: str = "fp32"):
    """The teacher's output at ``t``: conditional, or guided ``uncond + w (cond - uncond)`` (one 2B call)."""
    if guidance <= 1.0 or uncond is None:
        return unet_call(teacher, z, t, cond, precision)
    both = unet_call(teacher, torch.cat([z, z]), torch.cat([t, t]), cat(uncond, cond), precision)
    u, c = both.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def teacher_two_steps(teacher, z_t, j, cond, uncond, plan) -> torch.Tensor:
    """Two teacher DDIM steps from student grid point ``j`` (per sample): teacher points 2j, 2j+1."""
    tg = plan.teacher
    i0, i1 = 2 * j, 2 * j + 1
    pred = teacher_prediction(teacher, z_t, tg.timesteps[i0].to(z_t.device), cond, uncond, plan.guidance,
                              plan.precision)
    z_mid = ddim_step(pred, z_t, tg.alpha_bar[i0], tg.alpha_bar_prev[i0], plan.prediction_type)
    pred = teacher_prediction(teacher, z_mid, tg.timesteps[i1].to(z_t.device), cond, uncond, plan.guidance,
                              plan.precision)
    return ddim_step(pred, z_mid, tg.alpha_bar[i1], tg.alpha_bar_prev[i1], plan.prediction_type)


def start_points(x0, noise, j, plan) -> torch.Tensor:
    """``z_t`` of data rows: clean latents ``x0`` noised with ``noise`` to student grid point ``j``."""
    a = plan.student.alpha_bar[j].to(x0.device).reshape(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def round_loss(student, teacher, x0, noise, j, cond, uncond, plan, z_t=None):
    """``(loss, per-sample x-space error)`` of one batch: Algorithm 2 of Salimans & Ho.

    ``x0`` clean (scaled) latents, ``noise`` their epsilon, ``j`` student grid indices,
    ``cond``/``uncond`` text embeddings (``uncond`` only used by a guided teacher); ``z_t``: the
    start points when given (rows from the teacher's paths, :mod:`compress.trajectories`), else
    ``x0`` noised to ``j``.
    """
    sg = plan.student
    abar_t = sg.alpha_bar[j]
    if z_t is None:
        z_t = start_points(x0, noise, j, plan)
    t = sg.timesteps[j].to(x0.device)
    z_target = teacher_two_steps(teacher, z_t, j, cond, uncond, plan)
    x0_target, _ = student_target(z_t, z_target, abar_t, sg.alpha_bar_prev[j], plan.prediction_type)
    pred = unet_call(student, z_t, t, cond, plan.precision)
    x0_pred, _ = split(pred, z_t, abar_t, plan.prediction_type)
    per_sample = (x0_pred - x0_target).pow(2).mean(dim=(1, 2, 3))
    weights = loss_weight(abar_t, plan.weighting).to(per_sample.device)
    return (weights * per_sample).mean(), per_sample.detach()


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _validate(config) -> None:
    teacher, student = config.teacher_steps, config.student_steps
    if student >= teacher:
        raise ValueError(
            f"student_steps {student} must be fewer than teacher_steps {teacher} (each round halves "
            "the steps)")
    if teacher % student or not _power_of_two(teacher // student):
        valid = ", ".join(str(teacher >> k) for k in range(1, 11) if teacher % (1 << k) == 0)
        valid = valid or "none, use an even teacher_steps"
        raise ValueError(
            f"teacher_steps {teacher} / student_steps {student} must be a power of two (each round "
            f"halves the steps; student_steps for {teacher}: {valid})")


def _round_steps(config) -> list[tuple[int, int]]:
    rounds = int(math.log2(config.teacher_steps // config.student_steps))
    return [(config.teacher_steps >> r, config.teacher_steps >> (r + 1)) for r in range(rounds)]


def _scheduler(scheduler_config: dict, config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config)


def _loss(rnd, x0, noise, j, cond, uncond, z_t=None):
    return round_loss(rnd.model, rnd.teacher, x0, noise, j, cond, uncond, rnd.plan, z_t)


register(DistillMethod(
    name="progressive",
    summary="halving rounds N -> N/2 of DDIM steps (Salimans & Ho 2022; + guidance, Meng et al. 2023)",
    validate=_validate,
    round_steps=_round_steps,
    scheduler=_scheduler,
    check_grids=lambda teacher, student, num_train: check_nested(teacher, student),
    points=lambda plan: plan.student.steps,
    loss=_loss,
    inference=lambda config, absorbed: {"scheduler": "ddim", "eta": 0.0, "timestep_spacing": "trailing"},
    trajectory_starts=True,
))
