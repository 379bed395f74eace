"""Calibration data for static quantization, gathered along real denoising trajectories.

Why trajectories (Q-Diffusion, PTQ4DM): a diffusion UNet's activations change a lot with the
timestep (near-pure noise at t=999, a nearly clean latent at t=1), so ranges calibrated on one
timestep, or on random tensors, clip the others. Here the float pipeline runs its own denoising
loop on ``prompts`` captions of the shapes **train** stream (never the evaluation set), and the
UNet's inputs are recorded at ``timesteps`` steps spread over the whole trajectory: ``sample``,
``timestep`` and ``encoder_hidden_states`` of the whole call, i.e. both classifier-free-guidance
halves. The text encoder's ``input_ids`` (prompts and the empty unconditional prompt) and the
VAE decoder's ``latent`` (the trajectory's end) are recorded too. Trajectory ``i`` starts from
the noise of ``torch.Generator().manual_seed(seed + i)``: same config, same arrays.

Works on a torch ``StableDiffusionPipeline`` (a forward pre-hook on the UNet) and on an
:class:`sdwb.backends.onnxruntime.ExportedPipeline` (its component runners are wrapped); the feeds
are numpy in the exported graphs' dtypes, ready for ONNX Runtime's ``CalibrationDataReader``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from sdwb.quant.config import CalibrationConfig


@dataclass
class CalibrationSet:
    """Recorded feeds per component plus what was visited (stored in the variant's sdwb.json)."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    prompts: list[str]
    step_indices: list[int]
    timesteps: list[float]  # the scheduler timesteps of the recorded UNet calls (unique, descending)
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able record: prompts, steps/timesteps visited, samples per component."""
        return {
            "prompts": self.prompts,
            "step_indices": self.step_indices,
            "timesteps_visited": self.timesteps,
            "samples": {k: len(v) for k, v in self.feeds.items()},
            **self.info,
        }


def calibration_prompts(count: int, offset: int = 0) -> list[str]:
    """Captions of the shapes train stream, seeds ``offset .. offset+count-1`` (not the eval set)."""
    from sdwb import shapes

    return [shapes.sample_from_seed(shapes.TRAIN_SEED_BASE + offset + i).caption for i in range(count)]


def selected_steps(steps: int, timesteps) -> list[int]:
    """Step indices to record: all, or K spread evenly over ``[0, steps-1]`` (first and last kept)."""
    if timesteps == "all" or int(timesteps) >= steps:
        return list(range(steps))
    k = max(int(timesteps), 1)
    if k == 1:
        return [steps // 2]
    return sorted({int(round(x)) for x in np.linspace(0, steps - 1, k)})


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().astype(dtype, copy=True)


@contextlib.contextmanager
def _record_torch(pipe, keep: set[int], log: list, latents: list):
    """Record UNet inputs of the calls whose index within the trajectory is in ``keep``."""
    counter = {"i": 0}

    def pre_hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        if counter["i"] in keep:
            t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1]
            feed = {"sample": _np(sample), "timestep": _np(t), "encoder_hidden_states": _np(ehs)}
            added = kwargs.get("added_cond_kwargs") or {}  # SDXL: pooled text embeds + time ids
            feed.update({key: _np(value) for key, value in added.items() if torch.is_tensor(value)})
            log.append(feed)
        counter["i"] += 1

    handle = pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    decode = pipe.vae.decode
    scale = float(pipe.vae.config.scaling_factor)

    def recording_decode(z, *args, **kwargs):
        latents.append({"latent": _np(z * scale)})
        return decode(z, *args, **kwargs)

    pipe.vae.decode = recording_decode
    try:
        yield counter
    finally:
        handle.remove()
        del pipe.vae.decode  # back to the class method


@contextlib.contextmanager
def _record_exported(pipe, keep: set[int], log: list, latents: list):
    counter = {"i": 0}
    unet, vae = pipe.components["unet"], pipe.components["vae_decoder"]

    def recording_unet(**inputs):
        if counter["i"] in keep:
            log.append({k: _np(v) for k, v in inputs.items()})
        counter["i"] += 1
        return unet(**inputs)

    def recording_vae(**inputs):
        latents.append({k: _np(v) for k, v in inputs.items()})
        return vae(**inputs)

    pipe.components["unet"], pipe.components["vae_decoder"] = recording_unet, recording_vae
    try:
        yield counter
    finally:
        pipe.components["unet"], pipe.components["vae_decoder"] = unet, vae


def record_trajectories(pipe, config: CalibrationConfig, progress=None) -> CalibrationSet:
    """Run the float pipeline on the calibration prompts; record the inputs of every component."""
    from sdwb.generate import make_scheduler, scheduler_swapped

    prompts = calibration_prompts(config.prompts, config.prompt_offset)
    keep = set(selected_steps(config.steps, config.timesteps))
    unet_feeds: list[dict] = []
    latents: list[dict] = []
    from sdwb.backends.onnxruntime import ExportedPipeline

    exported = isinstance(pipe, ExportedPipeline)
    scheduler = make_scheduler(config.scheduler, pipe.scheduler.config)
    scheduler.set_timesteps(config.steps)
    visited = sorted({float(scheduler.timesteps[i]) for i in keep}, reverse=True)
    recorder = _record_exported if exported else _record_torch
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(config.seed + i)
        with recorder(pipe, keep, unet_feeds, latents), scheduler_swapped(pipe, config.scheduler), \
                torch.inference_mode():
            pipe(
                [prompt],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                generator=[generator],
                output_type="np",
                height=config.height,
                width=config.width,
            )
        if progress:
            progress(f"calibration trajectory {i + 1}/{len(prompts)}")
    texts = prompts + ([""] if config.guidance > 1.0 else [])
    ids = pipe.tokenizer(
        texts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids.astype(np.int32)
    text_feeds = [{"input_ids": ids[i : i + 1]} for i in range(len(texts))]
    feeds = {"unet": unet_feeds, "text_encoder": text_feeds, "vae_decoder": latents}
    info = {
        "steps": config.steps,
        "guidance": config.guidance,
        "scheduler": config.scheduler,
        "seed": config.seed,
        "prompt_source": f"shapes train stream seeds {config.prompt_offset}.."
        f"{config.prompt_offset + config.prompts - 1}",
    }
    return CalibrationSet(feeds, prompts, sorted(keep), visited, info)


class FeedReader:
    """ONNX Runtime ``CalibrationDataReader`` over a list of feed dicts (rewindable)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str] | None = None):
        self.feeds = [{k: v for k, v in f.items() if input_names is None or k in input_names} for f in feeds]
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def calibration_reader(calib: CalibrationSet, component: str, input_names: list[str] | None = None):
    """A ``CalibrationDataReader`` subclass instance for ``component``'s recorded feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(calib.feeds[component], input_names)


def calibrate_w8a8(pipe, config) -> tuple[dict, dict]:
    """``(ranges, calibration summary)`` of ``torch-int8-static``: the UNet's input ranges at every
    targeted Conv2d/Linear, observed along the recorded denoising trajectories."""
    from sdwb.quant import w8a8

    calib = record_trajectories(pipe, config.calibration)
    names = w8a8.targets(pipe.unet, config.exclude)
    return w8a8.calibrate_ranges(pipe.unet, names, calib.feeds["unet"]), calib.summary()
