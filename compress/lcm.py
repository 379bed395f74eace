"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): the loss.

Why a second method next to progressive distillation: progressive distillation needs one round
per halving (64 -> 4 steps is four rounds, each teaching the next), while consistency
distillation trains one student in one run that maps *any* point of the teacher's probability
flow ODE straight to its clean end; it is sampled with diffusers' ``LCMScheduler`` in 1-8 steps
(denoise, re-noise to the next timestep, denoise, ...).

The arithmetic is diffusers' own, so the saved student samples correctly with a plain
``LCMScheduler``:

- the consistency function is ``f(z, t) = c_skip(t) z + c_out(t) x0(z, t)`` with the boundary
  scalings of the student's own ``LCMScheduler``
  (:meth:`~diffusers.LCMScheduler.get_scalings_for_boundary_condition_discrete`): ``f`` is the
  identity at ``t = 0``;
- the ODE solver is one DDIM step of the (guided) teacher on the ``N``-step trailing grid
  (``N = teacher_steps``; its points are ``LCMScheduler``'s ``original_inference_steps`` grid),
  so ``z_hat`` is where the teacher goes from ``z_{t_n}`` to the next grid point ``t_{n+1}``;
- the target is the *target network* (an EMA of the student, stop-gradient) at
  ``(z_hat, t_{n+1})``, the identity past the last grid point; the loss is the pseudo-Huber
  distance ``sqrt(d^2 + c^2) - c`` the LCM training script uses.

Guidance is distilled in (the teacher runs CFG at a fixed scale, the student sees only the
prompt), as in the LCM paper with a fixed ``w``; the student then samples with guidance 1.0.
"""

from __future__ import annotations

import torch

from compress.ddim_targets import Grid, ddim_step, split
from compress.distill_methods import DistillMethod, register
from compress.progressive import teacher_prediction, unet_call
from sdwb.errors import SdwbError


def boundary_scalings(scheduler, timesteps: torch.Tensor):
    """``(c_skip, c_out)`` per timestep from ``scheduler`` (an ``LCMScheduler``); timesteps below 0
    (past the last grid point) count as 0, where ``f`` is the identity."""
    return scheduler.get_scalings_for_boundary_condition_discrete(timesteps.clamp(min=0).float())


def consistency_output(scheduler, pred, z, timesteps, alpha_bar) -> torch.Tensor:
    """``f(z, t) = c_skip z + c_out x0``: what ``scheduler.step`` (an ``LCMScheduler``) calls ``denoised``."""
    x0, _ = split(pred, z, alpha_bar, scheduler.config.prediction_type)
    c_skip, c_out = boundary_scalings(scheduler, timesteps)
    shape = (-1,) + (1,) * (z.dim() - 1)
    return c_skip.to(z.device).reshape(shape) * z + c_out.to(z.device).reshape(shape) * x0


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample mean of ``sqrt((a - b)^2 + c^2) - c`` (the LCM script's ``huber_c``)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean(dim=tuple(range(1, a.dim())))


def lcm_loss(student, target_net, teacher_fn, unet_fn, x0, noise, n, grid: Grid, scheduler, huber_c: float):
    """``(loss, per-sample distance)`` of one batch of consistency distillation.

    ``n``: indices into ``grid`` (descending timesteps); ``teacher_fn(z, t)`` the (guided) teacher's
    model output; ``unet_fn(model, z, t)`` a model's output with the batch's prompt embedding;
    ``scheduler``: the student's ``LCMScheduler`` (boundary scalings, parameterisation).
    """
    prediction_type = scheduler.config.prediction_type
    abar_n = grid.alpha_bar[n]
    a = abar_n.to(x0.device).reshape(-1, 1, 1, 1)
    z_n = a.sqrt() * x0 + (1 - a).sqrt() * noise
    t_n = grid.timesteps[n].to(x0.device)
    t_next = grid.timesteps_prev[n].to(x0.device)  # < 0 past the grid's last point
    with torch.no_grad():
        z_hat = ddim_step(teacher_fn(z_n, t_n), z_n, abar_n, grid.alpha_bar_prev[n], prediction_type)
        target_pred = unet_fn(target_net, z_hat, t_next.clamp(min=0))
        target = consistency_output(scheduler, target_pred, z_hat, t_next, grid.alpha_bar_prev[n])
    online = consistency_output(scheduler, unet_fn(student, z_n, t_n), z_n, t_n, abar_n)
    per_sample = pseudo_huber(online, target, huber_c)
    return per_sample.mean(), per_sample.detach()


@torch.no_grad()
def update_target(target_net: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * student`` (the target network, stop-gradient)."""
    for t, s in zip(target_net.parameters(), student.parameters()):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)


def check_lcm_grid(grid: Grid, num_train: int) -> None:
    """The teacher's grid must be ``LCMScheduler``'s: evenly spaced by ``num_train / N`` exactly, so
    each DDIM step lands on the next grid point (``t - num_train // N``)."""
    spacing = num_train // grid.steps
    gaps = grid.timesteps[:-1] - grid.timesteps[1:]
    if num_train % grid.steps or not bool((gaps == spacing).all()):
        raise SdwbError(f"teacher_steps {grid.steps}: lcm needs a grid that divides the {num_train} training "
                        f"timesteps evenly (e.g. 50 or 25)")


def _validate(config) -> None:
    teacher, student = config.teacher_steps, config.student_steps
    if student > teacher:
        raise ValueError(f"student_steps {student} must be at most teacher_steps {teacher} (the "
                         "LCMScheduler picks its steps from the teacher's grid)")
    if "guidance_distill" in config.model_fields_set and not config.guidance_distill:
        raise ValueError("method lcm always distils guidance (the student samples with guidance "
                         "1.0); drop guidance_distill: false, or set guidance: 1.0 for none")
    if config.guidance_budget is not None:
        raise ValueError("guidance_budget: method lcm has one run, set its length with budget")
    config.guidance_distill = True


def _scheduler(scheduler_config: dict, config):
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler_config, original_inference_steps=config.teacher_steps)


def _loss(rnd, x0, noise, n, cond, uncond, z_t=None):
    plan = rnd.plan  # z_t is always None: lcm noises the data at its own grid points

    def teacher_fn(z, t):
        return teacher_prediction(rnd.teacher, z, t, cond, uncond, plan.guidance, plan.precision)

    def unet_fn(model, z, t):
        return unet_call(model, z, t, cond, plan.precision)

    return lcm_loss(rnd.model, rnd.target, teacher_fn, unet_fn, x0, noise, n, plan.teacher,
                    plan.scheduler, plan.huber_c)


def _inference(config, absorbed) -> dict:
    return {"scheduler": "lcm", "original_inference_steps": config.teacher_steps,
            "guidance_distilled": absorbed or config.guidance}


register(DistillMethod(
    name="lcm",
    summary="latent consistency distillation against the guided teacher's ODE grid (Luo et al. 2023)",
    validate=_validate,
    round_steps=lambda config: [(config.teacher_steps, config.student_steps)],
    scheduler=_scheduler,
    check_grids=lambda teacher, student, num_train: check_lcm_grid(teacher, num_train),
    points=lambda plan: plan.teacher.steps,
    loss=_loss,
    inference=_inference,
    target_network=True,
    guidance_every_run=True,
))
