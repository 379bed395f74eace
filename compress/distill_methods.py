"""The step-distillation method registry: one :class:`DistillMethod` per method, found by name.

Why: the config schema (its ``method`` choices and per-method checks), the round plan, the
training loss, the student's scheduler and the inference defaults a student is recorded with all
differ per method; each method states them in one place (:mod:`compress.progressive`,
:mod:`compress.lcm`) and ``compress.distill`` runs any of them without asking which it holds.
A new method is one module that calls :func:`register`, plus its import in
``compress.distill_config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DistillMethod:
    """What a distillation method is, as the shared training loop needs it.

    - ``validate(config)``: raise ``ValueError`` on a schedule the method cannot run (may fill in
      what the method implies, e.g. lcm always distils guidance);
    - ``round_steps(config)``: ``[(teacher steps, student steps), ...]``, one entry per round;
    - ``scheduler(scheduler_config, config)``: the student's diffusers scheduler (saved with it);
    - ``check_grids(teacher_grid, student_grid, num_train_timesteps)``: refuse grids it cannot use;
    - ``points(plan)``: how many grid points a batch draws its index ``j`` from;
    - ``loss(round, x0, noise, j, cond, uncond, z_t)``: ``(loss, per-sample x-space error or None)``;
      ``z_t``: the rows' start points when the batch gave them (``trajectory_fraction``), else None;
    - ``inference(config, guidance, distilled, absorbed)``: the student's recorded ``inference``
      block without the shared keys (steps, guidance, call counts);
    - ``target_network``: the method trains against an EMA copy of the student (stop-gradient);
    - ``guidance_every_run``: the method distils guidance in every run, also from a source whose
      guidance is already distilled (else guidance is distilled once, in round 1);
    - ``trajectory_starts``: the loss takes given start points ``z_t`` (``trajectory_fraction``).
    """

    name: str
    summary: str
    validate: Callable
    round_steps: Callable
    scheduler: Callable
    check_grids: Callable
    points: Callable
    loss: Callable
    inference: Callable
    target_network: bool = False
    guidance_every_run: bool = False
    trajectory_starts: bool = False


METHODS: dict[str, DistillMethod] = {}


def register(method: DistillMethod) -> DistillMethod:
    """Add ``method`` to the registry (each name once)."""
    if method.name in METHODS:
        raise ValueError(f"distillation method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method
