"""``torch-bf16`` / ``torch-fp16``: cast components to a low dtype, with fp32 keep-rules.

A component's modules are cast to the low dtype, except those matching a keep-rule, which stay
fp32 (a rule is a class name such as ``GroupNorm`` or a glob over the module path such as
``conv_out`` / ``*.norm*``). Dtypes meet at module borders: every low-precision module with
weights casts its floating inputs to the low dtype, every kept module casts its inputs to fp32,
and the component returns fp32 so the scheduler's arithmetic stays fp32 (diffusers draws the
latents in the text encoder's dtype, so the text encoder's embeddings always stay fp32). A hook
is a dtype check on tensors that are mostly already right.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sdwb.quant.modules import component_modules, matches
from sdwb.quant.registry import DEFAULT_KEEP_FP32, MethodConfig, applies, register

LOW_DTYPES = {"torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}
ALWAYS_FP32 = {"text_encoder": ["text_model.embeddings", "embeddings"]}


@register(backend="torch", device="cpu or cuda")
class TorchBf16Config(MethodConfig):
    """Cast to bfloat16; modules matching ``keep_fp32`` (class name or module-path glob) stay fp32."""

    method: Literal["torch-bf16"] = "torch-bf16"
    keep_fp32: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FP32))


@register(
    backend="torch",
    device="cuda",
    why="float16 needs a CUDA GPU (CPU fp16 kernels are emulated and slow); use torch-bf16 on the CPU",
)
class TorchFp16Config(MethodConfig):
    """Cast to float16 on a CUDA GPU; ``keep_fp32`` as for bf16."""

    method: Literal["torch-fp16"] = "torch-fp16"
    keep_fp32: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FP32))


def _cast_tree(obj, dtype):
    """``obj`` with every floating tensor cast to ``dtype`` (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):  # also diffusers/transformers ModelOutput (an OrderedDict)
        for key in list(obj.keys()):
            obj[key] = _cast_tree(obj[key], dtype)
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_tree(x, dtype) for x in obj)
    return obj


def _input_caster(dtype):
    def hook(_module, args, kwargs):
        return _cast_tree(args, dtype), _cast_tree(kwargs, dtype)

    return hook


def _output_caster(dtype):
    def hook(_module, _args, output):
        return _cast_tree(output, dtype)

    return hook


@applies(TorchBf16Config, TorchFp16Config)
def apply_cast(pipe, config, device: str = "cpu", state: dict | None = None) -> dict:
    """Cast the configured components to bf16/fp16 with fp32 keep-rules; returns a summary."""
    dtype = LOW_DTYPES[config.method]
    kept, low, handles = [], 0, []
    for comp in config.components:
        rules = list(config.keep_fp32) + ALWAYS_FP32.get(comp, [])
        for root_name, root in component_modules(pipe, comp):
            keep_roots = [n for n, m in root.named_modules() if n and matches(rules, n, m)]
            keep_roots = [
                n for n in keep_roots if not any(n.startswith(k + ".") for k in keep_roots if k != n)
            ]
            kept += [f"{root_name}.{n}" for n in keep_roots]
            kept_set = set(keep_roots)
            for name, module in root.named_modules():
                inside_kept = any(name == k or name.startswith(k + ".") for k in kept_set)
                if name in kept_set:
                    handles.append(
                        module.register_forward_pre_hook(_input_caster(torch.float32), with_kwargs=True)
                    )
                    continue
                if inside_kept:
                    continue
                own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
                own += [b for b in module.buffers(recurse=False) if b.is_floating_point()]
                if own:
                    for t in own:
                        t.data = t.data.to(dtype)
                    low += sum(t.numel() for t in own)
                    handles.append(module.register_forward_pre_hook(_input_caster(dtype), with_kwargs=True))
            handles.append(root.register_forward_hook(_output_caster(torch.float32)))
    return {
        "low_precision_params": low,
        "kept_fp32_modules": kept,
        "dtype": str(dtype).removeprefix("torch."),
    }
