"""``tomesd``: Token Merging for Stable Diffusion (Bolya & Hoffman, 2023), the ``tomesd`` package.

What: in every transformer block of the UNet at most ``max_downsample`` below the latent
resolution, ``ratio`` of the image tokens are merged into similar ones before self-attention and
unmerged after it (``tomesd.apply_patch`` with its defaults: attention only, not cross-attention
or the MLP), so attention runs on fewer tokens. ``sx`` / ``sy``: the stride of the destination
tokens; ``use_rand``: pick each stride window's destination at random.

Why the package as it is (0.1.3, pure Python): its diffusers block is a copy of
``BasicTransformerBlock.forward`` for the ``layer_norm`` blocks of SD 1.x / 2.x / SDXL, and with
diffusers 0.42 it computes the same as diffusers' own (checked: ratio 0 gives identical images,
``tests/test_cache.py``); blocks it would get wrong (another ``norm_type``, positional
embeddings, chunked feed-forward) are refused. Two things are ours: its size hook is replaced by
one that also takes the latents by keyword, and its random generator (forked from the global RNG
at the first call and carried across generations) is re-seeded with ``seed`` at the start of every
generation (:mod:`sdwb.cache.clock`), so an image depends on its prompt and seed only. With an
odd batch (no guidance, one image) tomesd turns ``use_rand`` off itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdwb.cache.clock import GenerationClock, sample_of
from sdwb.cache.registry import ATTRIBUTE, Strict, applies, register
from sdwb.errors import SdwbError


@register
class ToMeConfig(Strict):
    """Token Merging: ``ratio`` of the image tokens merged before self-attention (tomesd)."""

    method: Literal["tomesd"] = "tomesd"
    ratio: float = Field(0.5, ge=0.0, description="fraction of tokens merged, at most 1 - 1/(sx*sy)")
    max_downsample: Literal[1, 2, 4, 8] = Field(
        1, description="merge in transformer blocks at most this far below the latent resolution")
    sx: int = Field(2, ge=1, le=8, description="destination stride in x")
    sy: int = Field(2, ge=1, le=8, description="destination stride in y")
    use_rand: bool = Field(True, description="random destination per stride window (seeded per generation)")
    seed: int = Field(0, ge=0, description="seed of use_rand's generator, re-seeded at every generation")

    @model_validator(mode="after")
    def _ratio_fits(self) -> ToMeConfig:
        most = 1 - 1 / (self.sx * self.sy)
        if self.ratio > most:
            raise ValueError(f"ratio {self.ratio:g}: at most 1 - 1/(sx*sy) = {most:g} with sx={self.sx}, "
                             f"sy={self.sy}")
        return self


def transformer_blocks(unet) -> list[tuple[str, int]]:
    """``(name, downsample)`` of every ``BasicTransformerBlock`` of a diffusers UNet (downsample:
    how far below the latent resolution it runs: 1, 2, 4, ...)."""
    from diffusers.models.attention import BasicTransformerBlock

    found: list[tuple[str, int]] = []
    factor = 1

    def add(prefix: str, block) -> None:
        for name, module in block.named_modules():
            if isinstance(module, BasicTransformerBlock):
                found.append((f"{prefix}.{name}", factor))

    for i, block in enumerate(getattr(unet, "down_blocks", ())):
        add(f"down_blocks.{i}", block)
        if getattr(block, "downsamplers", None):
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        add("mid_block", unet.mid_block)
    for i, block in enumerate(getattr(unet, "up_blocks", ())):
        add(f"up_blocks.{i}", block)
        if getattr(block, "upsamplers", None):
            factor //= 2
    return found


def _check_blocks(unet) -> None:
    """Refuse blocks whose forward tomesd's copy does not reproduce."""
    from diffusers.models.attention import BasicTransformerBlock

    for name, m in unet.named_modules():
        if isinstance(m, BasicTransformerBlock):
            if m.norm_type != "layer_norm" or m.pos_embed is not None or m._chunk_size is not None:
                raise SdwbError(f"tomesd: {name}: a transformer block tomesd does not patch faithfully "
                                f"(norm_type {m.norm_type}, positional embedding or chunked feed-forward)")


@applies(ToMeConfig)
def apply_tome(pipe, config: ToMeConfig) -> dict:
    """Patch ``pipe.unet`` with tomesd in place (undone by :func:`sdwb.cache.config.remove_cache`)."""
    unet = pipe.unet
    blocks = transformer_blocks(unet)
    if not blocks:
        raise SdwbError("tomesd: this UNet has no transformer blocks (no self-attention tokens to merge)")
    reached = [name for name, factor in blocks if factor <= config.max_downsample]
    if not reached:
        at = ", ".join(str(f) for f in sorted({f for _, f in blocks}))
        raise SdwbError(f"tomesd: max_downsample {config.max_downsample}: no transformer block of this UNet "
                        f"runs that close to the latent resolution (they run at downsample {at}); raise "
                        "max_downsample")
    _check_blocks(unet)
    try:
        import tomesd
    except ImportError:
        raise SdwbError("tomesd: the tomesd package is not installed (pip install tomesd)") from None
    import torch

    tomesd.apply_patch(unet, ratio=config.ratio, max_downsample=config.max_downsample, sx=config.sx,
                       sy=config.sy, use_rand=config.use_rand)
    info = unet._tome_info
    for handle in info["hooks"]:  # tomesd's hook reads the latents as args[0] only
        handle.remove()
    info["hooks"].clear()
    clock = GenerationClock(pipe)

    def before_call(_module, args, kwargs):
        sample = sample_of(args, kwargs)
        info["size"] = (sample.shape[2], sample.shape[3])
        if clock.tick(sample):
            info["args"]["generator"] = torch.Generator(device=sample.device).manual_seed(config.seed)

    info["hooks"].append(unet.register_forward_pre_hook(before_call, with_kwargs=True))
    from types import SimpleNamespace

    object.__setattr__(pipe, ATTRIBUTE, SimpleNamespace(config=config, last_call=None, patched=[unet]))
    return {"ratio": config.ratio, "patched_blocks": len(reached), "transformer_blocks": len(blocks)}
