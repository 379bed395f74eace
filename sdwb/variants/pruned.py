"""A pruned UNet's architecture as data, and the UNet rebuilt from it without pickle.

Why: diffusers' ``config.json`` cannot express per-layer widths after channel pruning, nor blocks
removed here and there, and pickling the module is not allowed. So a pruned variant keeps the
parent's ``unet/config.json`` and its ``sdwb.json`` gets ``architecture``: the removed blocks, the
head count of every attention module and the shape of every tensor of the state dict. Rebuilding
(:func:`build_unet`) instantiates the original config on the meta device (no memory, no random
init), removes the same blocks, gives every tensor its recorded shape, makes the width attributes
``forward`` reads agree (:func:`sync_attributes`), materialises the module and loads the
safetensors weights with strict key and shape checks; any mismatch is one ``SdwbError`` line.

The variant's own reader (:func:`pruned_components`, called by ``sdwb.loading``) finds the
architecture in the record's ancestry, verifies the files and rebuilds the UNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdwb.errors import SdwbError

FORMAT = "sdwb-pruned-unet"


def describe(unet, kept: dict | None = None) -> dict:
    """The architecture record of ``unet``: removed blocks, attention heads, every tensor's shape, and
    (``kept``, :func:`sdwb.variants.kept.recording`) the rows / columns each resized Linear kept."""
    from diffusers.models.attention_processor import Attention

    from sdwb.variants.unet_blocks import removed_blocks

    return {
        "format": FORMAT,
        "version": 1,
        "base": "unet/config.json",
        "removed": removed_blocks(unet),
        "heads": {name: int(m.heads) for name, m in unet.named_modules() if isinstance(m, Attention)},
        "shapes": {k: list(v.shape) for k, v in unet.state_dict().items()},
        **({"kept": kept} if kept is not None else {}),
    }


def sync_attributes(unet) -> None:
    """Make every width attribute that diffusers/torch forwards read agree with the tensors.

    Pruning (and :func:`build_unet`) changes weights; ``GroupNorm.num_channels``,
    ``LayerNorm.normalized_shape``, ``Upsample2D/Downsample2D.channels`` (asserted in forward) and
    ``Attention.inner_dim`` must follow. ``Attention.heads`` is set by whoever changed the heads.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    for name, m in unet.named_modules():  # layers first: the blocks below read their widths
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
            if m.num_channels % m.num_groups:
                raise SdwbError(f"{name}: {m.num_channels} channels do not split into {m.num_groups} groups")
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = (m.weight.shape[0],)
    for name, m in unet.named_modules():
        if isinstance(m, (Upsample2D, Downsample2D)) and isinstance(getattr(m, "conv", None), nn.Conv2d):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Transformer2DModel) and isinstance(getattr(m, "proj_in", None), _LAYERS):
            m.in_channels = m.norm.num_channels
            m.inner_dim = _width(m.proj_in)
            m.out_channels = _width(m.proj_out)
        elif isinstance(m, Attention):
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
            m.sliceable_head_dim = m.heads
            m.out_dim = m.to_out[0].out_features
            m.query_dim = m.to_q.in_features
            if m.inner_dim % m.heads or m.inner_kv_dim % m.heads:
                raise SdwbError(f"{name}: {m.heads} heads do not divide its {m.inner_dim} query dims")


_LAYERS = (nn.Conv2d, nn.Linear)


def _width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _resize(unet, shapes: dict, heads: dict) -> None:
    """Give every (meta) tensor its recorded shape and every attention module its head count."""
    from diffusers.models.attention_processor import Attention

    have = set(unet.state_dict())
    if have != set(shapes):
        missing, extra = sorted(set(shapes) - have), sorted(have - set(shapes))
        raise SdwbError(
            f"architecture record does not fit the base config: {len(missing)} recorded tensors missing "
            f"(e.g. {missing[:2]}), {len(extra)} unrecorded (e.g. {extra[:2]})"
        )
    for prefix, module in unet.named_modules():
        for pname, tensor in list(module.named_parameters(recurse=False)):
            shape = tuple(shapes[f"{prefix}.{pname}" if prefix else pname])
            if tuple(tensor.shape) != shape:
                empty = torch.empty(shape, device="meta", dtype=tensor.dtype)
                setattr(module, pname, nn.Parameter(empty, requires_grad=tensor.requires_grad))
        for bname, tensor in list(module.named_buffers(recurse=False)):
            shape = tuple(shapes[f"{prefix}.{bname}" if prefix else bname])
            if tensor is not None and tuple(tensor.shape) != shape:
                module.register_buffer(bname, torch.empty(shape, device="meta", dtype=tensor.dtype))
        if isinstance(module, Attention) and prefix in heads:
            module.heads = int(heads[prefix])


def build_unet(config: dict, architecture: dict, state: dict[str, torch.Tensor], source: str = "weights"):
    """A ``UNet2DConditionModel`` of ``config`` reshaped to ``architecture`` holding ``state`` (fp32, CPU)."""
    from diffusers import UNet2DConditionModel

    from sdwb.variants.unet_blocks import apply_removals

    if not isinstance(architecture, dict) or architecture.get("format") != FORMAT:
        raise SdwbError(f"{source}: architecture record is not a {FORMAT} record")
    shapes = architecture.get("shapes") or {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    apply_removals(unet, architecture.get("removed", []))
    _resize(unet, shapes, architecture.get("heads", {}))
    sync_attributes(unet)
    for key in sorted(set(shapes) | set(state)):
        if key not in state or key not in shapes:
            where = "the architecture" if key not in shapes else source
            raise SdwbError(f"{source}: tensor {key} is missing from {where}")
        if list(state[key].shape) != list(shapes[key]):
            raise SdwbError(f"{source}: tensor {key} has shape {list(state[key].shape)}, the architecture "
                            f"record says {shapes[key]}")
    unet.to_empty(device="cpu")
    unet.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return unet.float().eval().requires_grad_(False)


def load_unet(unet_dir: Path, architecture: dict):
    """Rebuild the pruned UNet stored in ``unet_dir`` (config.json + safetensors) from its record."""
    import json

    from safetensors.torch import load_file

    config_file = unet_dir / "config.json"
    files = sorted(unet_dir.glob("*.safetensors"))
    if not config_file.is_file() or not files:
        raise SdwbError(f"{unet_dir}: expected config.json and safetensors weights of the pruned UNet")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {config_file}: {exc}") from None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as exc:  # safetensors raises its own error types
            raise SdwbError(f"corrupt weights: {file}: {exc}") from None
    return build_unet(config, architecture, state, source=str(unet_dir))


def find_architecture(record: dict | None) -> dict | None:
    """The ``architecture`` of the pruned variant in ``record``'s chain (itself or a parent), or None.

    Why the chain: a variant made from a pruned one (quantized, say) stores weights of the pruned
    shapes, and only the pruned ancestor's record says what those shapes are.
    """
    from sdwb.variants.record import ancestry

    return next((r.get("architecture") for r in ancestry(record) if r.get("stage") == "prune"), None)


def pruned_components(path: Path) -> dict:
    """``{"unet": ...}`` for a pruned variant (or one made from it): its files checked against the
    record, the UNet rebuilt from the recorded architecture (diffusers' config alone cannot express
    pruned widths); ``{}`` for anything else."""
    from sdwb.variants.record import read_record, verify_record

    record = read_record(path)  # None when the directory has no sdwb.json
    architecture = find_architecture(record)
    if architecture is None:
        return {}
    verify_record(path, record)
    return {"unet": load_unet(path / "unet", architecture)}
