"""Recovery fine-tuning of a pruned UNet by distillation from the unpruned one (BK-SDM style).

Why three losses: the pruned student starts close to its teacher but not at it. BK-SDM (Kim et
al. 2023) recovers with the denoising loss plus output-level and feature-level knowledge
distillation; the same here, on shapes data (:mod:`compress.denoise_data`):

- ``output``: MSE between the student's and the teacher's noise predictions;
- ``feature``: at the output of every down block, the mid block and every up block, present in
  both, the MSE between student and teacher features divided by the teacher features' mean square
  (scale-free across blocks), averaged over blocks. Where channel pruning made the student's block
  narrower, a 1x1 convolution projects student -> teacher width (FitNets-style). It is initialised
  by least squares on the first held-out batch -- after pruning, each student channel is close to
  a teacher channel, so the projection starts near that selection -- trained with the student, and
  discarded when the variant is saved. Where the widths match, features are compared directly.
- ``task``: the denoising loss against the true noise (or velocity).

``loss = output_weight * output + feature_weight * feature + task_weight * task``. Training runs
in one process through HF accelerate (device, backward, gradient clipping), with a cosine schedule,
optional bf16 autocast, a rich progress bar, a JSON-lines log and resumable checkpoints
(:class:`sdwb.train.common.Checkpointer`: safetensors weights + optimizer state + step; the run
continues where it stopped because every batch is a function of the step). The distillation MSE
(output loss, fp32) on fixed held-out batches is measured before and after, for the record.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.denoise_data import EVAL_STREAM, TRAIN_STREAM, DenoisingData, unet_inputs


def block_modules(unet) -> dict[str, nn.Module]:
    """The blocks whose outputs feature distillation compares: down_blocks.i, mid_block, up_blocks.j."""
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if getattr(unet, "mid_block", None) is not None:
        blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{j}": b for j, b in enumerate(unet.up_blocks)})
    return blocks


class FeatureTap:
    """Forward hooks that keep each block's output tensor from the last forward."""

    def __init__(self, unet, names: list[str]):
        self.features: dict[str, torch.Tensor] = {}
        modules = block_modules(unet)
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def keep(_module, _inputs, output):
            self.features[name] = output[0] if isinstance(output, tuple) else output

        return keep

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Recovering(nn.Module):
    """The student UNet and its feature projections as one module (one optimizer, one checkpoint)."""

    def __init__(self, student, projections: dict[str, nn.Module]):
        super().__init__()
        self.student = student
        self.projections = nn.ModuleDict({k.replace(".", "_"): v for k, v in projections.items()})

    def forward(self, **inputs):
        """The student's call (its features reach the taps); through accelerate's wrapper under
        ``accelerate launch``, so the gradients of the whole module are averaged over processes."""
        return self.student(**inputs)

    def project(self, name: str, feature: torch.Tensor) -> torch.Tensor:
        key = name.replace(".", "_")
        return self.projections[key](feature) if key in self.projections else feature


def _fit_projections(student_feats: dict, teacher_feats: dict) -> dict[str, nn.Conv2d]:
    """A 1x1 conv student -> teacher width per block whose widths differ, fitted by least squares."""
    projections = {}
    for name, s in student_feats.items():
        t = teacher_feats[name]
        if s.shape[1] == t.shape[1]:
            continue
        x = s.detach().float().permute(0, 2, 3, 1).reshape(-1, s.shape[1])
        y = t.detach().float().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
        solution = torch.linalg.lstsq(x, y).solution  # (C_s, C_t)
        conv = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(solution.T[:, :, None, None])
        projections[name] = conv
    return projections


def feature_loss(recovering: Recovering, student_feats: dict, teacher_feats: dict,
                 batch_mean=lambda value: value) -> torch.Tensor:
    """Mean over blocks of MSE(project(student), teacher) / mean(teacher^2).

    ``batch_mean`` turns a statistic of this process's rows into the global batch's (under
    ``accelerate launch``: the mean over processes), so the normaliser, a statistic of the whole
    batch, is the same in every process as in one process."""
    losses = []
    for name, t in teacher_feats.items():
        s = recovering.project(name, student_feats[name]).float()
        t = t.float()
        losses.append(F.mse_loss(s, t) / (batch_mean(t.pow(2).mean()) + 1e-6))
    return torch.stack(losses).mean()


@torch.no_grad()
def distill_mse(student, teacher, batches: list[dict]) -> float:
    """Mean MSE between the student's and teacher's predictions on ``batches`` (fp32)."""
    device = next(student.parameters()).device
    total = 0.0
    for batch in batches:
        inputs = unet_inputs(batch, device)
        total += float(F.mse_loss(student(**inputs).sample.float(), teacher(**inputs).sample.float()))
    return total / len(batches)


def recover(student, teacher, data: DenoisingData, config, work: Path, progress: bool = True) -> dict:
    """Fine-tune ``student`` (in place) toward ``teacher`` per ``config`` (a ``FinetuneConfig``).

    Checkpoints go to ``work/checkpoint`` and resume from there; returns the metrics for sdwb.json.
    """
    from sdwb.train.common import (
        Checkpointer,
        autocast,
        batch_mean,
        cosine_lr,
        make_accelerator,
        mean_over_processes,
        rank_rows,
        rows_of,
        run_loop,
    )

    accelerator = make_accelerator()
    device = accelerator.device
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).eval()
    names = [n for n in block_modules(teacher) if n in block_modules(student)]
    evals = [data.batch(i, config.batch, EVAL_STREAM) for i in range(config.eval_batches)]
    before = distill_mse(student, teacher, evals)
    teacher_tap, student_tap = FeatureTap(teacher, names), FeatureTap(student, names)
    try:
        with torch.no_grad():
            inputs = unet_inputs(evals[0], device)
            teacher(**inputs), student(**inputs)
        projections = _fit_projections(student_tap.features, teacher_tap.features)
        recovering = Recovering(student, projections).to(device)
        recovering.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(recovering.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        wrapped, optimizer = accelerator.prepare(recovering, optimizer)
        global_mean = functools.partial(batch_mean, accelerator)  # feature loss normaliser: the whole batch's

        def step_fn(step: int) -> dict[str, float]:
            for g in optimizer.param_groups:
                g["lr"] = config.lr * cosine_lr(step, config.steps, config.warmup)
            # the step's whole batch, of which this process trains its rows (all of it in one process)
            rows = rank_rows(config.batch, accelerator)
            batch = rows_of(data.batch(step, config.batch, TRAIN_STREAM), rows)
            inputs = unet_inputs(batch, device)
            with torch.no_grad(), autocast(device, config.precision):
                target_out = teacher(**inputs).sample.float()
            with autocast(device, config.precision):
                out = wrapped(**inputs).sample.float()
                feat = feature_loss(recovering, student_tap.features, teacher_tap.features, global_mean) \
                    if config.feature_weight > 0 else out.new_zeros(())
            output = F.mse_loss(out, target_out)
            task = F.mse_loss(out, batch["target"].to(device))
            loss = config.output_weight * output + config.feature_weight * feat + config.task_weight * task
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(recovering.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {k: mean_over_processes(accelerator, v) for k, v in
                    (("loss", loss), ("out", output), ("feat", feat), ("task", task))}

        started = time.perf_counter()
        checkpointer = Checkpointer(work / "checkpoint", {"recovering": recovering}, optimizer)
        smoothed = run_loop(name="recover", total_steps=config.steps, step_fn=step_fn,
                            checkpointer=checkpointer, checkpoint_every=config.checkpoint_every,
                            log_path=work / "train_log.jsonl", progress=progress)
        seconds = time.perf_counter() - started
    finally:
        teacher_tap.close()
        student_tap.close()
    student.eval().requires_grad_(False)
    after = distill_mse(student, teacher, evals)
    student.cpu(), teacher.cpu()  # the pipeline (and the MACs counter) run on the CPU afterwards
    return {
        "steps": config.steps,
        "seconds_this_run": round(seconds, 1),
        "distill_mse_before": before,
        "distill_mse_after": after,
        "feature_blocks": names,
        "projected_blocks": sorted(projections),
        "final_smoothed_losses": {k: round(v, 6) for k, v in smoothed.items()},
    }
