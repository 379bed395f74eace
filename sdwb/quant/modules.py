"""Which torch modules a quantization method reaches: component roots, keep-rules, Linear share."""

from __future__ import annotations

import fnmatch

import torch

from sdwb.errors import SdwbError


def component_modules(pipe, name: str) -> list[tuple[str, torch.nn.Module]]:
    """The torch modules a component name covers: ``vae_decoder`` is post_quant_conv + decoder."""
    if name == "unet":
        return [("unet", pipe.unet)]
    if name == "text_encoder":  # SDXL: both text encoders
        encoders = [("text_encoder", pipe.text_encoder),
                    ("text_encoder_2", getattr(pipe, "text_encoder_2", None))]
        return [(n, m) for n, m in encoders if m is not None]
    if name == "vae_decoder":
        mods = [
            ("vae.post_quant_conv", getattr(pipe.vae, "post_quant_conv", None)),
            ("vae.decoder", pipe.vae.decoder),
        ]
        return [(n, m) for n, m in mods if m is not None]
    raise SdwbError(f"component {name!r}: expected one of unet, text_encoder, vae_decoder")


def matches(rules: list[str], path: str, module: torch.nn.Module) -> bool:
    """A rule is a class name (``GroupNorm``) or a glob / prefix over the module path (``conv_out``)."""
    cls = type(module).__name__
    return any(
        rule == cls
        or fnmatch.fnmatchcase(path, rule)
        or path == rule
        or path.startswith(rule + ".")
        or fnmatch.fnmatchcase(path, f"*.{rule}")
        for rule in rules
    )


def linears(root: torch.nn.Module, exclude: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules under ``root`` that no ``exclude`` glob names."""
    return [
        n
        for n, m in root.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]


def linear_share(pipe, components) -> dict:
    """How much of each component's weights sits in ``nn.Linear`` (what Linear-only methods reach)."""
    out = {}
    for comp in components:
        total = linear = 0
        for _, root in component_modules(pipe, comp):
            for m in root.modules():
                n = sum(p.numel() for p in m.parameters(recurse=False))
                total += n
                linear += n if isinstance(m, torch.nn.Linear) else 0
        out[comp] = round(linear / max(total, 1), 4)
    return out
