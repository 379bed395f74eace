"""Which denoising step of which generation a UNet call is: the per-generation reset of the cache methods.

Why the scheduler's ``timesteps`` tensor: every diffusers pipeline call (and so every
:func:`sdwb.generate.generate` chunk, every benchmark run) starts with
``scheduler.set_timesteps``, which builds a new ``timesteps`` tensor; ``generate`` even swaps in a
fresh scheduler per call. A UNet call that sees another tensor than the previous call (or latents
of another shape) starts a new generation: the step counter restarts at 0 and nothing cached from
the previous generation is reused. A pipeline with no timesteps set (a UNet called on its own)
makes every call a first step.
"""

from __future__ import annotations

import weakref


def sample_of(args: tuple, kwargs: dict):
    """The latents of a UNet call (``unet(sample, t, ...)`` or ``unet(sample=...)``)."""
    return args[0] if args else kwargs.get("sample")


class GenerationClock:
    """``tick(sample)`` per UNet call: True when the call starts a new generation; ``step`` is the
    call's index within its generation (0 for the first)."""

    def __init__(self, pipe):
        self._pipe = weakref.ref(pipe)
        self._timesteps = None
        self._shape = None
        self.step = 0

    def tick(self, sample) -> bool:
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        shape = tuple(getattr(sample, "shape", ()))
        new = timesteps is None or timesteps is not self._timesteps or shape != self._shape
        if new:
            self._timesteps, self._shape, self.step = timesteps, shape, 0
        else:
            self.step += 1
        return new
