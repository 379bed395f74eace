"""Block removal in the style of BK-SDM: drop named residual / attention blocks of the UNet.

Why this shape: BK-SDM (Kim et al. 2023) shows that a Stable Diffusion UNet survives losing its
mid-stage and some residual+attention pairs once it is distilled from the full model. Removable
units, named by module path (globs allowed):

- ``mid_block``: the whole mid-stage (``unet.mid_block = None``; diffusers' forward skips it).
- ``...attentions.K`` (a ``Transformer2DModel``): its output is ``input + f(input)``, so it is
  replaced by :class:`SkippedAttention`, which returns its input.
- ``...resnets.K`` (a ``ResnetBlock2D``) whose input carries its output width: a resnet with equal
  input and output channels becomes the identity; the 2nd+ resnet of an up block, whose input
  is ``cat([hidden, skip])`` with ``hidden`` already at the block width, becomes
  :class:`SkippedResnet`, which passes ``hidden`` on and drops that skip connection. The skip is
  still produced and popped in order, so the skip bookkeeping of every other block is untouched.
  A resnet that changes the width (the first of a down block or of an up block) is refused.

Stand-ins hold no weights; the architecture record lists the removed names, and
:func:`apply_removals` repeats the removal when a variant is rebuilt.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from sdwb.errors import SdwbError

_UP_RESNET = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")


class SkippedAttention(nn.Module):
    """Stands in for a removed ``Transformer2DModel``: returns the hidden states unchanged."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


class SkippedResnet(nn.Module):
    """Stands in for a removed ``ResnetBlock2D``: passes the first ``channels`` input channels on."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        return input_tensor[:, : self.channels]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def candidates(unet) -> list[str]:
    """Names of the removable units of ``unet`` (see the module docstring)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    names = ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    for name, module in unet.named_modules():
        if name.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and isinstance(
            module, (ResnetBlock2D, Transformer2DModel)
        ):
            names.append(name)
    return names


def resolve(unet, patterns: list[str]) -> list[str]:
    """The unit names ``patterns`` select; a pattern that selects nothing is an error."""
    names = candidates(unet)
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise SdwbError(f"blocks: {pattern!r} names no removable block of this UNet (removable: {shown})")
        chosen += [n for n in hits if n not in chosen]
    if "mid_block" in chosen:  # the whole mid-stage goes; its parts need no separate removal
        chosen = [n for n in chosen if not n.startswith("mid_block.")]
    return chosen


def _stand_in(unet, name: str, module: nn.Module) -> nn.Module:
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, Transformer2DModel):
        return SkippedAttention()
    if not isinstance(module, ResnetBlock2D):
        raise SdwbError(f"blocks: {name} is a {type(module).__name__}, not a resnet or attention block")
    width_in, width_out = module.conv1.in_channels, module.conv2.out_channels
    if width_in == width_out:
        return SkippedResnet(width_out)
    match = _UP_RESNET.match(name)
    if match and int(match.group(2)) >= 1:
        previous = unet.up_blocks[int(match.group(1))].resnets[int(match.group(2)) - 1]
        hidden = previous.channels if isinstance(previous, SkippedResnet) else previous.conv2.out_channels
        if hidden == width_out:
            return SkippedResnet(width_out)
    raise SdwbError(
        f"blocks: cannot remove {name}: it changes the width ({width_in} -> {width_out} channels); "
        "removable resnets keep it or are the 2nd+ resnet of an up block"
    )


def apply_removals(unet, names: list[str]) -> list[str]:
    """Replace each named unit by its stand-in (``mid_block``: remove it). Returns ``names``."""
    for name in names:
        if name == "mid_block":
            if unet.mid_block is None:
                raise SdwbError("blocks: mid_block is already removed")
            unet.mid_block = None
            continue
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = unet.get_submodule(parent_name)
            module = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf)
        except (AttributeError, IndexError, ValueError):
            raise SdwbError(f"blocks: {name}: no such module in this UNet") from None
        stand_in = _stand_in(unet, name, module)
        if leaf.isdigit():
            parent[int(leaf)] = stand_in
        else:
            setattr(parent, leaf, stand_in)
    return list(names)


def remove_blocks(unet, patterns: list[str]) -> dict:
    """BK-SDM-style removal of the units ``patterns`` select; returns a summary for sdwb.json."""
    names = resolve(unet, patterns)
    before = sum(p.numel() for p in unet.parameters())
    apply_removals(unet, names)
    after = sum(p.numel() for p in unet.parameters())
    return {"removed": names, "removed_params_m": round((before - after) / 1e6, 4)}


def removed_blocks(unet) -> list[str]:
    """Names of the units already removed from ``unet`` (stand-ins, or a missing mid-stage)."""
    names = []
    if getattr(unet, "mid_block", None) is None and unet.config.get("mid_block_type") is not None:
        names.append("mid_block")
    names += [n for n, m in unet.named_modules() if isinstance(m, (SkippedAttention, SkippedResnet))]
    return names
