"""Start points from the round teacher's own sampled paths (``trajectory_fraction``).

Progressive distillation (Salimans & Ho 2022) draws a round's start point ``z_t`` by noising a
data latent. A guided teacher does not walk through noised data: from pure noise its DDIM path
at CFG 7.5 runs through sharper, more saturated latents than the data set's, and the
guidance-distilled student, which at inference walks that path, is trained on points it never
meets there. On ``builtin:tiny-shapes`` the guidance round is where the quality goes
(reports/distillation-cpu: the 16-step student after it already sits 7-13 shape points under the
teacher; the later halvings cost nothing), and more so at 7.5 than at 4.

:func:`teacher_trajectories` samples ``count`` paths of the round's teacher on its own N-step
DDIM grid (guided when the round distils guidance) from pure noise, for captions drawn from the
latent pool, and keeps the latent at every other grid point: the student's N/2 grid points,
where a batch row then starts. A seeded function of (seed, round), cached in the round's work
directory so a resumed run reads the same paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.progressive import teacher_two_steps
from sdwb.conditioning import expand

TRAJECTORY_FILE = "trajectories.safetensors"


@torch.no_grad()
def teacher_trajectories(teacher, conditioner, pool_ids: torch.Tensor, empty_ids: torch.Tensor, plan,
                         count: int, generator: torch.Generator, *, batch: int = 64,
                         path: Path | None = None, progress: bool = False) -> dict:
    """``{"z": (count, student points, C, H, W), "input_ids": (count, L)}``: row ``i``'s latent at
    the student's grid point ``j`` is where the teacher's DDIM path (``plan.teacher`` grid, guidance
    ``plan.guidance``) from its noise stands at teacher point ``2 j``. Read from ``path`` when it
    holds ``count`` paths, else made and written there."""
    from rich.progress import track
    from safetensors.torch import load_file, save

    from sdwb.runs import atomic_write_bytes

    if path is not None and path.is_file():
        saved = load_file(path)
        if len(saved["z"]) == count:
            return saved
    points = plan.student.steps
    cfg = teacher.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    rows = torch.randint(0, len(pool_ids), (count,), generator=generator)
    ids = pool_ids[rows].clone()
    noise = torch.randn((count, *shape), generator=generator)
    device = next(teacher.parameters()).device
    paths = torch.empty((count, points, *shape))
    for start in track(range(0, count, batch), description="teacher paths", disable=not progress,
                       transient=True):
        stop = min(count, start + batch)
        n = stop - start
        z = noise[start:stop].to(device)
        cond = conditioner(ids[start:stop].to(device))
        uncond = expand(conditioner(empty_ids[None].to(device)), n) if plan.guidance > 1.0 else None
        for j in range(points):  # the round's own two teacher steps from point j land on point j + 1
            paths[start:stop, j] = z.float().cpu()
            if j < points - 1:
                z = teacher_two_steps(teacher, z, torch.full((n,), j), cond, uncond, plan)
    made = {"z": paths.contiguous(), "input_ids": ids.contiguous()}
    if path is not None:
        atomic_write_bytes(path, save(made))
    return made
