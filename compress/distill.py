"""``distill(source, config, out)``: teacher -> student step distillation, saved as a variant.

Progressive distillation (Salimans & Ho 2022): rounds of N -> N/2 DDIM steps; in each round a
student initialised from its teacher learns to take in one step what the teacher takes in two
(:mod:`compress.ddim_targets` has the grid and the target), and then teaches the next round,
down to ``student_steps``. With ``guidance_distill`` (Meng et al. 2023) round 1's teacher runs
classifier-free guidance (``uncond + w (cond - uncond)``, one 2B UNet call per step) while the
student sees only the prompt, so the student samples with guidance 1.0: one UNet call of batch
B per step. Without it, prompts are dropped at ``caption_dropout`` so the student keeps its
unconditional branch and is sampled with CFG at ``guidance``.

With ``method: lcm`` there is one "round": latent consistency distillation against the guided
teacher's ``teacher_steps`` grid (:mod:`compress.lcm`), an EMA target network beside the student,
saved with diffusers' ``LCMScheduler``.

Each method is registered in :mod:`compress.distill_methods` (its schedule check, rounds, loss,
scheduler and inference defaults: :mod:`compress.progressive`, :mod:`compress.lcm`); the loop
here trains any of them.

Only the UNet trains; the VAE and text encoder are the source's, frozen. Data: the shapes train
stream encoded once by the model's own VAE into a latent pool (posterior mean and std, a fresh
draw each step), captions tokenized as ``StableDiffusionPipeline`` does. Every random draw is a
function of (seed, round, step), so a killed run resumes exactly: each round checkpoints to
``WORK/round-R/checkpoint`` (safetensors weights + EMA, optimizer, step, elapsed time) and a
finished round leaves ``student.safetensors``, which later runs reuse. ``WORK`` (default
``OUT.work``) is checked against the resolved config and the source's content before reuse and
removed when the variant has been written.

The variant (``atomic_dir(out)``): the diffusers pipeline with the student UNet and a DDIM
scheduler with ``timestep_spacing: trailing`` (the training grid), and ``sdwb.json`` with
``stage: distill``, the resolved config, per-round losses and ``inference: {steps, scheduler,
guidance}``, which ``sdwb generate`` and the benchmark use when not told otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.ddim_targets import Grid, ddim_grid, student_scheduler_config
from compress.distill_config import DistillConfig, resolved
from compress.distill_methods import METHODS
from compress.lcm import update_target
from sdwb.conditioning import expand
from sdwb.errors import SdwbError
from sdwb.threads import adapt as adapt_threads

STUDENT_FILE = "student.safetensors"
POOL_FILE = "latent_pool.safetensors"


@dataclass
class Distilled:
    """A distilled model: the pipeline (student UNet, trailing DDIM), its record, where it was saved."""

    config: DistillConfig
    pipeline: object
    record: dict
    path: Path | None = None
    rounds: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RoundPlan:
    """What one round needs besides the models: grids, guidance, parameterisation, loss weighting."""

    teacher: Grid
    student: Grid
    guidance: float  # > 1: the teacher runs classifier-free guidance at this scale
    prediction_type: str
    weighting: str
    precision: str = "fp32"
    method: str = "progressive"  # a name in compress.distill_methods.METHODS
    scheduler: object = None  # the student's scheduler (lcm: its LCMScheduler; ``teacher`` is the ODE grid)
    huber_c: float = 0.001


# --------------------------------------------------------------------------- data


@torch.no_grad()
def latent_pool(pipe, count: int, path: Path | None = None, progress: bool = False,
                seed_base: int | None = None) -> dict:
    """The first ``count`` train-stream images encoded by ``pipe.vae`` (posterior mean, std) and their
    captions' token ids; cached at ``path`` (safetensors) when given. ``seed_base``: another stream
    (``shapes.EVAL_SEED_BASE``: held-out images); default the train stream."""
    import numpy as np
    from rich.progress import track
    from safetensors.torch import load_file, save

    from sdwb import shapes
    from sdwb.runs import atomic_write_bytes
    from sdwb.train.unet import tokenize
    from sdwb.train.vae import images_to_vae_input

    if path is not None and path.is_file():
        pool = load_file(path)
        if len(pool["mean"]) == count:
            return pool
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    means, stds, ids = [], [], []
    chunk = 128
    for start in track(range(0, count, chunk), description="latent pool", disable=not progress,
                       transient=True):
        base = shapes.TRAIN_SEED_BASE if seed_base is None else seed_base
        samples = [shapes.sample_from_seed(base + start + i)
                   for i in range(min(chunk, count - start))]
        x = images_to_vae_input(np.stack([s.render() for s in samples]))
        if x.shape[-1] != side:  # a model whose native size is not the data set's 64 px
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        dist = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        ids.append(tokenize([s.caption for s in samples], pipe.tokenizer))
    pool = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
            "input_ids": torch.cat(ids).contiguous()}
    if path is not None:
        atomic_write_bytes(path, save(pool))
    return pool


# --------------------------------------------------------------------------- source and work dir


def _load_source(source) -> tuple[object, dict, str | None]:
    """(fp32 CPU pipeline, parent record, fingerprint of the source files or None)."""
    from compress.variant_io import load_source
    from sdwb.loading import require_family
    from sdwb.variants.manifest import source_fingerprint

    require_family(source, "distill")
    src = load_source(source, refuse={
        "quantize": "{spec}: a quantized variant ({method}); distill its float parent ({parent}) and "
                    "quantize the student",
        "decoder": "{spec}: has a distilled tiny decoder, whose VAE cannot encode the training data; distil "
                   "its parent ({parent}), then distil the decoder of the student",
    }, export_error="{spec}: an ONNX export; distillation trains a torch UNet: give the diffusers pipeline "
                    "or "
                    "builtin model it was exported from")
    fingerprint = source_fingerprint(src.parent["spec"]) if src.path is not None else None
    return src.pipe, src.parent, fingerprint


def _absorbed_guidance(config: DistillConfig, parent: dict) -> float | None:
    """The guidance scale already distilled into a distilled source (None if not); a distilled
    source must be distilled further from its own step count, and guidance only once."""
    record = parent.get("variant") or {}
    if record.get("stage") != "distill":
        return None
    known = record.get("inference") or {}
    if known.get("steps") and known["steps"] != config.teacher_steps:
        raise SdwbError(f"{parent['spec']}: a {known['steps']}-step student; distil it further with "
                        f"--teacher-steps {known['steps']} (got {config.teacher_steps})")
    absorbed = known.get("guidance_distilled")
    if config.guidance_distill and absorbed and not METHODS[config.method].guidance_every_run:
        raise SdwbError(f"{parent['spec']}: guidance {absorbed:g} is already distilled into it; use "
                        "--no-guidance-distill (its students keep guidance 1.0)")
    return absorbed


def _prepare_work(work: Path, config: DistillConfig, fingerprint: str | None) -> None:
    """Create ``work`` or check that it holds a run of this exact config and source."""
    from sdwb.runs import prepare_work_dir

    prepare_work_dir(work, {"config": resolved(config), "source": fingerprint}, "distillation")


# --------------------------------------------------------------------------- training a round


def _lr_factor(config: DistillConfig, step: int, fraction: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr_floor`` over the budget."""
    warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
    floor = config.lr_floor
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, fraction)))))


@contextlib.contextmanager
def _bar(enabled: bool, name: str, total: float, completed: float, unit: str):
    if not enabled:
        yield lambda **_: None
        return
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sdwb.progress import make_progress

    columns = (TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} "
               + unit), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with make_progress(*columns) as progress:
        task = progress.add_task(name, total=total, completed=completed, info="resumed" if completed else "")
        yield lambda **kw: progress.update(task, **kw)


class _Round:
    """One round's training state; :meth:`step` is one optimizer step (resumable by ``step``)."""

    def __init__(self, index, config, plan, teacher, student, conditioner, pool, empty_ids, scaling,
                 accelerator, drop_captions: bool, trajectories: dict | None = None):
        self.index, self.config, self.plan, self.drop_captions = index, config, plan, drop_captions
        self.trajectories = trajectories  # the teacher's paths (trajectory_fraction), or None
        self.teacher, self.student, self.conditioner = teacher, student, conditioner
        self.pool, self.empty_ids, self.scaling = pool, empty_ids, scaling
        self.accelerator = accelerator
        # the target network (an EMA of the student, stop-gradient) the consistency target uses
        self.target = (copy.deepcopy(student).eval().requires_grad_(False)
                       if METHODS[plan.method].target_network else None)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        from sdwb.train.common import EMA

        self.ema = EMA(student, config.ema_decay) if config.ema_decay else None
        self.model, self.optimizer = accelerator.prepare(student, self.optimizer)

    def _embed(self, ids: torch.Tensor) -> dict:
        """The UNet's conditioning of caption ids (:mod:`sdwb.conditioning`; SDXL's added inputs too)."""
        return self.conditioner(ids.to(self.accelerator.device))

    def batch(self, step: int):
        """(x0, noise, j, cond, uncond, z_t) of ``step``: a function of (seed, round, step) only, drawn
        whole (``batch`` rows) by every process; under ``accelerate launch`` each process takes its
        share of the rows (:func:`sdwb.train.common.rank_rows`). ``z_t`` is None unless the round
        has teacher paths: then the first ``trajectory_fraction`` of the rows start on a path (their
        ``x0``/``noise`` unused) and the rest at ``x0`` noised to ``j``."""
        from sdwb.train.common import rank_rows, step_generator

        cfg, acc = self.config, self.accelerator
        gen = step_generator(cfg.seed, step, stream=1000 + self.index)
        n = len(self.pool["mean"])
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        mean, std = self.pool["mean"][idx], self.pool["std"][idx]
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        ids = self.pool["input_ids"][idx].clone()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        if self.drop_captions:  # a student sampled with CFG keeps its unconditional branch
            ids[drop] = self.empty_ids
        points = METHODS[self.plan.method].points(self.plan)
        j = torch.randint(0, points, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        z_t = None
        if self.trajectories is not None:  # drawn after the data rows: a run without paths is unchanged
            from compress.progressive import start_points

            k = round(cfg.trajectory_fraction * cfg.batch)
            paths = self.trajectories
            pick = torch.randint(0, len(paths["z"]), (k,), generator=gen)
            j[:k] = torch.randint(0, points, (k,), generator=gen)
            ids[:k] = paths["input_ids"][pick]
            if self.drop_captions:  # the same caption dropout as the data rows
                ids[:k][drop[:k]] = self.empty_ids
            z_t = start_points(x0, noise, j, self.plan)
            z_t[:k] = paths["z"][pick, j[:k]]
        rows = rank_rows(cfg.batch, acc)
        x0, ids, j, noise = x0[rows], ids[rows], j[rows], noise[rows]
        device = acc.device
        cond = self._embed(ids)
        uncond = expand(self._embed(self.empty_ids[None]), len(ids)) if self.plan.guidance > 1.0 else None
        z_t = None if z_t is None else z_t[rows].to(device)
        return x0.to(device), noise.to(device), j, cond, uncond, z_t

    def step(self, step: int, lr_factor: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor
        x0, noise, j, cond, uncond, z_t = self.batch(step)
        loss, per_sample = METHODS[self.plan.method].loss(self, x0, noise, j, cond, uncond, z_t)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.student, step)
        from sdwb.train.common import mean_over_processes

        acc = self.accelerator
        if self.target is not None:
            update_target(self.target, self.student, self.config.target_ema)
            return {"loss": mean_over_processes(acc, loss)}
        return {"loss": mean_over_processes(acc, loss), "x0_mse": mean_over_processes(acc, per_sample.mean())}


def _train_round(rnd: _Round, directory: Path, log_path: Path, progress: bool) -> dict:
    """Run ``rnd`` within the budget from its last checkpoint; returns the round's metrics."""
    from sdwb.train.common import Checkpointer

    cfg = rnd.config
    kind, amount = cfg.round_budget(guided=rnd.plan.guidance > 1.0)
    modules = {"unet": rnd.student} if rnd.target is None else {"unet": rnd.student, "target": rnd.target}
    ckpt = Checkpointer(directory / "checkpoint", modules, rnd.optimizer, ema=rnd.ema)
    step = ckpt.load()
    state = {"elapsed_s": 0.0, "loss_first": None}
    if step:
        saved = json.loads((directory / "checkpoint" / "progress.json").read_text())
        state.update({k: saved[k] for k in state if k in saved})
    losses: list[float] = []
    started = time.monotonic() - state["elapsed_s"]
    name = f"round {rnd.index + 1}: {rnd.plan.teacher.steps}->{rnd.plan.student.steps} steps"
    unit = "steps" if kind == "steps" else "s"
    window = max(1, min(10, int(amount) // 4)) if kind == "steps" else 10  # losses averaged at each end

    def elapsed() -> float:
        return time.monotonic() - started

    def save() -> None:
        state["elapsed_s"] = round(elapsed(), 3)
        ckpt.extra = dict(state)
        ckpt.save(step)  # written by the main process, the others wait for it

    from sdwb.train.common import from_main_process

    acc = rnd.accelerator
    main = acc.is_main_process
    start = step if kind == "steps" else state["elapsed_s"]
    with _bar(progress and main, name, amount, start, unit) as update, \
            open(log_path if main else os.devnull, "a") as log:
        while True:
            # how far the budget is spent; a time budget goes by the main process's clock, so
            # every process decides alike whether to take another step (one broadcast per step)
            spent = step if kind == "steps" else from_main_process(acc, elapsed())
            if spent >= amount and (kind == "steps" or step > 0):
                break
            fraction = spent / amount
            adapt_threads()  # load that arrived after the start: fewer threads, not a collapse
            metrics = rnd.step(step, _lr_factor(cfg, step, fraction))
            losses.append(metrics["loss"])
            if state["loss_first"] is None and len(losses) == window:
                state["loss_first"] = sum(losses) / window
            step += 1
            if step % 10 == 0 or step == 1:
                log.write(json.dumps({"round": rnd.index + 1, "step": step, "time_s": round(elapsed(), 2),
                                      **{k: round(v, 6) for k, v in metrics.items()}}) + "\n")
                log.flush()
            update(completed=step if kind == "steps" else min(elapsed(), amount),
                   info=f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if step % cfg.checkpoint_every == 0:
                save()
        save()
    if state["loss_first"] is None and losses:  # a time budget that allowed fewer than 10 steps
        window = max(1, len(losses) // 2)
        state["loss_first"] = sum(losses[:window]) / window
    tail = losses[-window:]
    return {"teacher_steps": rnd.plan.teacher.steps, "student_steps": rnd.plan.student.steps,
            "optimizer_steps": step, "seconds": state["elapsed_s"],
            "guidance_teacher": rnd.plan.guidance if rnd.plan.guidance > 1.0 else None,
            "loss_first": state["loss_first"], "loss_last": sum(tail) / len(tail) if tail else None}


def _save_state(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    from sdwb.runs import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}))


# --------------------------------------------------------------------------- the verb


def inference_defaults(config: DistillConfig, absorbed: float | None = None) -> dict:
    """What the student is sampled with (recorded as ``sdwb.json`` ``inference``); ``absorbed``:
    the guidance scale its (distilled) source already had distilled in."""
    distilled = config.guidance if config.guidance_distill else absorbed
    guidance = 1.0 if distilled else config.guidance
    return {
        "steps": config.student_steps,
        "guidance": guidance,
        "guidance_distilled": distilled,
        **METHODS[config.method].inference(config, absorbed),
        "unet_calls_per_step": 1,
        "unet_batch_per_image": 2 if guidance > 1.0 else 1,
    }


def distill(
    source,
    config: DistillConfig,
    out: str | Path | None = None,
    *,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> Distilled:
    """Distil ``source`` (spec or pipeline) per ``config``; write the variant to ``out`` when given.

    ``work_dir`` (default ``OUT.work``; required without ``out``) holds the resumable state.
    """
    say = say or (lambda _msg: None)
    from compress.variant_io import output_and_work

    out, work = output_and_work(out, work_dir, overwrite, "distill")
    say("loading the teacher")
    pipe, parent, fingerprint = _load_source(source)
    absorbed = _absorbed_guidance(config, parent)
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise SdwbError("the UNet has time_cond_proj_dim (a guidance-embedding student): not supported")
    sched_config = student_scheduler_config(pipe.scheduler.config)
    method = METHODS[config.method]
    scheduler = method.scheduler(sched_config, config)
    plans = []
    for r, (n_teacher, n_student) in enumerate(config.round_steps()):
        teacher_grid, student_grid = ddim_grid(sched_config, n_teacher), ddim_grid(sched_config, n_student)
        method.check_grids(teacher_grid, student_grid, sched_config["num_train_timesteps"])
        guided = config.guidance_distill and r == 0 and not absorbed
        plans.append(RoundPlan(teacher_grid, student_grid, config.guidance if guided else 1.0,
                               sched_config["prediction_type"], config.weighting, config.precision,
                               config.method, scheduler, config.huber_c))
    from sdwb.train.common import make_accelerator
    from sdwb.train.unet import tokenize

    accelerator = make_accelerator()
    device = accelerator.device
    main = accelerator.is_main_process
    say = say if main else (lambda _msg: None)
    from sdwb.train.common import rank_rows

    rank_rows(config.batch, accelerator)  # a batch N processes cannot share: refused before any work
    # under accelerate launch the main process checks the work directory and encodes the pool,
    # then the others read them (nothing is written twice)
    with accelerator.main_process_first():
        if main:
            _prepare_work(work, config, fingerprint)
        say("encoding the latent pool")
        pool = latent_pool(pipe, config.latent_pool, work / POOL_FILE, progress=progress and main)
    from sdwb.conditioning import TextConditioner

    conditioner = TextConditioner(pipe).to(device)  # the frozen text encoder(s)
    empty_ids = tokenize([""], pipe.tokenizer)[0]
    scaling = pipe.vae.config.scaling_factor
    current = pipe.unet.to(device)
    rounds = []
    started = time.perf_counter()
    for r, plan in enumerate(plans):
        directory = work / f"round-{r + 1}-{plan.teacher.steps}to{plan.student.steps}"
        directory.mkdir(parents=True, exist_ok=True)
        student = copy.deepcopy(current).train().requires_grad_(True)
        done = directory / STUDENT_FILE
        if done.is_file():
            from safetensors.torch import load_file

            student.load_state_dict(load_file(done))
            metrics = json.loads((directory / "round.json").read_text())
            say(f"round {r + 1}: reusing {done}")
        else:
            teacher = current.eval().requires_grad_(False)
            paths, path_seconds = None, None
            if config.trajectory_fraction:
                say(f"round {r + 1}: sampling {config.trajectory_pool} teacher paths")
                clock = time.perf_counter()
                with accelerator.main_process_first():  # the main process samples, the others read
                    from compress.trajectories import TRAJECTORY_FILE, teacher_trajectories
                    from sdwb.train.common import step_generator

                    paths = teacher_trajectories(
                        teacher, conditioner, pool["input_ids"], empty_ids, plan, config.trajectory_pool,
                        step_generator(config.seed, 0, stream=2000 + r), path=directory / TRAJECTORY_FILE,
                        progress=progress and main)
                path_seconds = round(time.perf_counter() - clock, 3)
            rnd = _Round(r, config, plan, teacher, student, conditioner, pool, empty_ids, scaling,
                         accelerator, drop_captions=not (config.guidance_distill or absorbed),
                         trajectories=paths)
            metrics = _train_round(rnd, directory, work / "train_log.jsonl", progress)
            if paths is not None:  # seconds to sample the paths (or, resumed, to read them back)
                metrics["trajectory_paths"] = config.trajectory_pool
                metrics["trajectory_seconds"] = path_seconds
            if rnd.ema is not None:
                rnd.ema.copy_to(student)
            from sdwb.runs import atomic_write_json

            if main:
                atomic_write_json(directory / "round.json", metrics)
                _save_state(student, done)
                shutil.rmtree(directory / "checkpoint", ignore_errors=True)
            accelerator.wait_for_everyone()
            accelerator.free_memory()
        rounds.append(metrics)
        current = student.eval().requires_grad_(False)
    pipe.unet = current.cpu().float()
    conditioner.to("cpu")
    pipe.scheduler = scheduler
    from sdwb.inference import attach

    inference = inference_defaults(config, absorbed)
    attach(pipe, inference)
    seconds = round(time.perf_counter() - started, 3)
    record = _record(config, parent, rounds, inference, seconds)
    if out is not None and main:
        from compress.variant_io import write_float_variant

        record = write_float_variant(pipe, out, record, overwrite, say)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return Distilled(config, pipe, record, out, rounds)


def _record(config: DistillConfig, parent: dict, rounds: list[dict], inference: dict, seconds: float) -> dict:
    from sdwb.variants.record import new_record

    return new_record(
        stage="distill", method=config.method, backend="torch",
        weights="float32 student UNet; VAE and text encoder are the parent's",
        parent=parent, config=resolved(config), inference=inference, rounds=rounds,
        metrics={"distill_seconds": seconds},
    )
