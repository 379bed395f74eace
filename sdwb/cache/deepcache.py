"""``deepcache``: DeepCache (Ma et al., 2023): the full UNet every ``interval``-th step, the deep
features reused in between.

What: on a full step every block runs and the outputs of the deep part are kept. On the
``interval - 1`` steps after it only the shallow branch runs: ``conv_in``, the down-block layers
above the branch, the up-block layers from the branch up, ``conv_out``; the deep down layers,
the mid block and the deep up layers return their outputs of the last full step. ``branch`` is
DeepCache's ``cache_branch_id``: the skip connections of the UNet numbered from the shallowest
(0: ``conv_in``'s skip into the last layer of the last up block) down, ``len(resnets)`` per up
block (3 per block on SD 1.x / 2.x / SDXL, so branch ``k`` is DeepCache's block ``k // 3``, layer
``k % 3``); the larger, the more is recomputed each step. The skip rule is the one of
``DeepCacheSDHelper.is_skip_step`` (down layers ``>= layer`` and up layers ``> layer`` of the
branch's block, every deeper block and the mid block are reused).

Why our own implementation and not the ``DeepCache`` package (0.1.1): with diffusers 0.42 its
bundled pipelines (``DeepCache.sd``) do not import (``PositionNet`` is gone from diffusers), and
its ``DeepCacheSDHelper``, which does import, finds the step by looking the UNet call's
positional timestep up in ``pipe.scheduler.timesteps`` (an error for a call by keyword or at a
timestep outside the schedule), never forgets its cache between generations, hard-codes 3 skips
per block (wrong for UNets with another ``layers_per_block``, e.g. tiny-shapes) and offers no way
to tell a full call from a shallow one (the benchmark's ``unet_shallow_calls``). The same
mechanism in ~100 lines here -- diffusers' own ``UNet2DConditionModel.forward`` runs unchanged
(time embedding, SDXL's added conditions, skip bookkeeping) and the reused blocks' ``forward``
returns the cached output -- works on every UNet2DConditionModel the workbench loads, resets per
generation (:mod:`sdwb.cache.clock`) and counts its calls. The batch of a call is whatever the
pipeline passes (2B with classifier-free guidance); a new generation, or latents of another
shape, always starts with a full step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sdwb.cache.clock import GenerationClock, sample_of
from sdwb.cache.registry import ATTRIBUTE, Strict, applies, register
from sdwb.errors import SdwbError


@register
class DeepCacheConfig(Strict):
    """DeepCache: the full UNet every ``interval``-th denoising step, its deep features reused in between."""

    method: Literal["deepcache"] = "deepcache"
    interval: int = Field(3, ge=1, le=1000,
                          description="the full UNet every N-th step (1: every step, no reuse)")
    branch: int = Field(0, ge=0, description="skip branch recomputed on the other steps (DeepCache's "
                        "cache_branch_id; 0: the shallowest, conv_in's skip)")


def branch_count(unet) -> int:
    """How many skip branches ``unet`` has (the valid ``branch`` values are 0 .. count - 1)."""
    return sum(len(getattr(block, "resnets", None) or ()) for block in unet.up_blocks)


def _branch_position(unet, branch: int) -> tuple[int, int]:
    """``branch`` as (block counted from the shallowest, layer within it)."""
    for depth, block in enumerate(reversed(unet.up_blocks)):
        layers = len(getattr(block, "resnets", None) or ())
        if branch < layers:
            return depth, branch
        branch -= layers
    raise AssertionError("branch checked against branch_count")


def _reused_modules(unet, block: int, layer: int) -> dict[str, object]:
    """``{name: module}`` whose output a shallow step takes from the last full step."""
    out: dict[str, object] = {}
    for i, down in enumerate(unet.down_blocks):
        if i > block:
            out[f"down_blocks.{i}"] = down
        elif i == block:
            resnets = list(getattr(down, "resnets", None) or ())
            attentions = list(getattr(down, "attentions", None) or ())
            for j in range(layer, len(resnets)):
                out[f"down_blocks.{i}.resnets.{j}"] = resnets[j]
                if j < len(attentions):
                    out[f"down_blocks.{i}.attentions.{j}"] = attentions[j]
            if getattr(down, "downsamplers", None) and len(resnets) >= layer:
                for k, sampler in enumerate(down.downsamplers):
                    out[f"down_blocks.{i}.downsamplers.{k}"] = sampler
    if unet.mid_block is not None:
        out["mid_block"] = unet.mid_block
    n = len(unet.up_blocks)
    for i, up in enumerate(unet.up_blocks):
        depth = n - 1 - i
        if depth > block:
            out[f"up_blocks.{i}"] = up
        elif depth == block:
            resnets = list(getattr(up, "resnets", None) or ())
            attentions = list(getattr(up, "attentions", None) or ())
            for j in range(len(resnets)):
                if len(resnets) - 1 - j > layer:  # up layers are numbered from the block's last one
                    out[f"up_blocks.{i}.resnets.{j}"] = resnets[j]
                    if j < len(attentions):
                        out[f"up_blocks.{i}.attentions.{j}"] = attentions[j]
    return out


class DeepCacheState:
    """The live state of DeepCache on one pipeline: the schedule, the cache, the call counters."""

    def __init__(self, pipe, config: DeepCacheConfig, reused: dict[str, object]):
        self.config = config
        self.clock = GenerationClock(pipe)
        self.reused = reused
        self.cache: dict[str, object] = {}
        self.full = True
        self.counts = {"full": 0, "shallow": 0}
        self.last_call: str | None = None

    def start_call(self, sample) -> None:
        if self.clock.tick(sample):
            self.cache.clear()  # nothing of another generation is reused
        self.full = self.clock.step % self.config.interval == 0 or len(self.cache) < len(self.reused)
        self.last_call = "full" if self.full else "shallow"
        self.counts[self.last_call] += 1


def _reusing(state: DeepCacheState, name: str, original):
    def forward(*args, **kwargs):
        if state.full:
            out = state.cache[name] = original(*args, **kwargs)
            return out
        return state.cache[name]

    return forward


@applies(DeepCacheConfig)
def apply_deepcache(pipe, config: DeepCacheConfig) -> dict:
    """Install DeepCache on ``pipe.unet`` in place (undone by :func:`sdwb.cache.config.remove_cache`)."""
    unet = pipe.unet
    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block")):
        raise SdwbError(f"deepcache: {type(unet).__name__} is not a diffusers UNet2DConditionModel")
    count = branch_count(unet)
    if config.branch >= count:
        raise SdwbError(f"deepcache: branch {config.branch}: this UNet has {count} skip branches "
                        f"(0..{count - 1}; 0 is the shallowest)")
    reused = _reused_modules(unet, *_branch_position(unet, config.branch))
    state = DeepCacheState(pipe, config, reused)
    for name, module in reused.items():
        module.forward = _reusing(state, name, module.forward)
    original = unet.forward

    def forward(*args, **kwargs):
        state.start_call(sample_of(args, kwargs))
        return original(*args, **kwargs)

    unet.forward = forward
    state.patched = [unet, *reused.values()]
    object.__setattr__(pipe, ATTRIBUTE, state)
    return {"interval": config.interval, "branch": config.branch, "branches": count,
            "reused_modules": len(reused)}
