"""Shared training machinery: accelerate set-up, resumable checkpoints, EMA, LR schedule, progress.

Why: every builtin model (judge, VAE, UNet + text encoder) is trained by the same loop shape,
and all of them must survive being killed: a checkpoint every N steps holds the weights
(safetensors), the optimizer state (``torch.save`` of tensors, read back with
``weights_only=True``) and the step. Batches and noise are functions of (seed, step), so a resumed
run continues exactly where it stopped without saving RNG state. HF accelerate picks the device
and mixed precision, so the same code trains on CPU (bf16 autocast on AMX) or on several GPUs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def make_accelerator(cpu: bool | None = None):
    """An ``accelerate.Accelerator`` (several GPUs under ``accelerate launch``; else the CPU).

    Mixed precision is applied by :func:`autocast` rather than by accelerate, because on the CPU
    accelerate's bf16 mode leaves module forwards in fp32.
    """
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision="no", cpu=cpu)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU (AMX) or GPU; ``precision="fp32"`` disables it."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor`` x the peak learning rate (a multiplier)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of a module's parameters (with the usual early warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def rank_rows(global_batch: int, accelerator) -> slice:
    """This process's rows of a global batch of ``global_batch`` under ``accelerate launch``.

    Why: a step's batch is a function of (seed, step) drawn whole by every process, and each
    process trains on its equal, contiguous share; accelerate averages the gradients, so N
    processes take the same optimizer step as one process on the whole batch (to float rounding),
    and checkpoints resume under any process count. One process: every row."""
    from sdwb.errors import SdwbError

    n, rank = accelerator.num_processes, accelerator.process_index
    if global_batch % n:
        raise SdwbError(f"batch {global_batch} does not split evenly over {n} processes (give a multiple)")
    size = global_batch // n
    return slice(rank * size, (rank + 1) * size)


def batch_mean(accelerator, value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-process scalar over all processes: with equal shares, the global batch's
    statistic. One process: ``value`` itself; several: a detached tensor (no gradient crosses)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.detach().reshape(1).float(), reduction="mean")[0]


def mean_over_processes(accelerator, value: torch.Tensor) -> float:
    """:func:`batch_mean` as a number (a loss to log)."""
    return float(batch_mean(accelerator, value).detach())


def from_main_process(accelerator, value: float) -> float:
    """The main process's ``value`` on every process (a time budget's clock: every process must
    decide alike whether to take another step, or the gradient all-reduce waits forever)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return float(broadcast(torch.tensor([value], dtype=torch.float64, device=accelerator.device))[0])


def process_state():
    """accelerate's process state, as :func:`make_accelerator` makes it (the first call fixes it for
    the process): gloo between CPU processes when there is no GPU, else one GPU per process. Without
    ``cpu=True`` accelerate sees a CPU-only ``accelerate launch`` as one process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in a single process and in the main process of ``accelerate launch`` (the one that writes)."""
    return process_state().is_main_process


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def main_process_first():
    """``with main_process_first():`` the main process runs the block first (it writes a shared work
    directory or cache), then the others (which find it written); a no-op in one process."""
    return process_state().main_process_first()


def rows_of(batch: dict, rows: slice) -> dict:
    """The rows ``rows`` of every tensor of a (nested) batch dict (SDXL's added conditions too)."""
    return {k: rows_of(v, rows) if isinstance(v, dict) else v[rows] for k, v in batch.items()}


@dataclass
class Checkpointer:
    """Periodic, atomic, resumable checkpoints of named modules + optimizer in ``directory``."""

    directory: Path
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    ema: EMA | None = None
    extra: dict = field(default_factory=dict)

    def save(self, step: int) -> None:
        """Written by the main process only (every process holds the same weights); the others wait
        until it is on disk, so a process killed after this point resumes from it under any count."""
        if is_main_process():
            self._write(step)
        wait_for_everyone()

    def _write(self, step: int) -> None:
        tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {
            f"{name}.{k}": v.detach().contiguous().cpu()
            for name, m in self.modules.items()
            for k, v in m.state_dict().items()
        }
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.contiguous() for k, v in self.ema.shadow.items()})
        save_file(_dedupe_shared(tensors), tmp / "weights.safetensors")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, **self.extra}))
        old = self.directory.with_name(self.directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.directory.exists():
            os.replace(self.directory, old)
        os.replace(tmp, self.directory)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> int:
        """Restore the last checkpoint if there is one; returns the step to continue from."""
        progress = self.directory / "progress.json"
        if not progress.exists():
            return 0
        tensors = load_file(self.directory / "weights.safetensors")
        for name, m in self.modules.items():
            prefix = f"{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            m.load_state_dict(state, strict=False)
        if self.ema is not None:
            for k in self.ema.shadow:
                if f"ema.{k}" in tensors:
                    self.ema.shadow[k] = tensors[f"ema.{k}"].float()
        self.optimizer.load_state_dict(torch.load(self.directory / "optimizer.pt", weights_only=True))
        return int(json.loads(progress.read_text())["step"])


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): store clones."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def run_loop(
    *,
    name: str,
    total_steps: int,
    step_fn: Callable[[int], dict[str, float]],
    checkpointer: Checkpointer,
    checkpoint_every: int,
    log_path: Path,
    progress: bool = True,
) -> dict[str, float]:
    """Run ``step_fn(step)`` from the last checkpoint to ``total_steps`` with a progress bar.

    Logs smoothed losses to ``log_path`` (JSON lines) and checkpoints every ``checkpoint_every``
    steps and at the end. Returns the last smoothed metrics.
    """
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sdwb.progress import make_progress
    from sdwb.threads import adapt as adapt_threads

    start = checkpointer.load()
    smoothed: dict[str, float] = {}
    t0 = time.time()
    columns = (
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    main = is_main_process()  # under accelerate launch the main process logs and draws the bar
    with make_progress(*columns, disable=not (progress and main)) as bar, \
            open(log_path if main else os.devnull, "a") as log:
        task = bar.add_task(name, total=total_steps, completed=start, info="resumed" if start else "")
        for step in range(start, total_steps):
            adapt_threads()  # load that arrived after the start: fewer threads, not a collapse
            metrics = step_fn(step)
            for k, v in metrics.items():
                smoothed[k] = v if k not in smoothed else 0.98 * smoothed[k] + 0.02 * v
            if step % 25 == 0 or step == total_steps - 1:
                info = " ".join(f"{k}={v:.4f}" for k, v in smoothed.items())
                bar.update(task, info=info)
                log.write(
                    json.dumps(
                        {
                            "stage": name,
                            "step": step,
                            "time_s": round(time.time() - t0, 2),
                            "threads": torch.get_num_threads(),
                            **{k: round(v, 6) for k, v in metrics.items()},
                        }
                    )
                    + "\n"
                )
                log.flush()
            bar.advance(task)
            if (step + 1) % checkpoint_every == 0 or step + 1 == total_steps:
                checkpointer.save(step + 1)
    return smoothed


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch generator that depends only on (seed, step, stream): resumable randomness."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 17 + stream)
