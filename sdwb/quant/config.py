"""The quantization methods: one typed config per method, in one registry, validated on load.

Why typed configs: a quantization recipe must be reproducible from one YAML file, and a typo
(``min_psrn: 20``) must fail before a model is loaded. Every config forbids unknown keys and is
strictly typed; :func:`parse_quant_config` turns any problem into one ``SdwbError`` line naming
the source, the key and what was expected. The resolved config (every default filled in) is what
a variant's ``sdwb.json`` records, and what loading re-applies.

Methods (``METHODS``): ``torch-bf16``/``torch-fp16`` cast with fp32 keep-rules;
``torch-int8-dynamic`` (torch.ao dynamic int8 of ``nn.Linear``); ``torch-int8-static`` (W8A8
Conv2d + Linear, trajectory-calibrated, :mod:`sdwb.quant.w8a8`); ``torchao-int8-weight-only`` /
``torchao-int4-weight-only`` (optional ``torchao``); ``ort-int8-dynamic``/``ort-int8-static``
(ONNX Runtime quantization of an exported graph; static uses QDQ and diffusion-trajectory
calibration); ``ort-fp16`` (GPU). Which device each needs is declared in ``METHOD_INFO``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdwb.errors import SdwbError
from sdwb.schema_errors import fields_of, format_errors
from sdwb.yaml_io import Scheduler

Component = Literal["unet", "text_encoder", "vae_decoder"]
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "vae_decoder")
DEFAULT_KEEP_FP32 = ["GroupNorm", "LayerNorm", "conv_out", "time_embedding"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GuardConfig(_Strict):
    """The probe generation run after quantizing: refuse to save on NaN/inf or low fidelity."""

    enabled: bool = Field(True, description="false skips the probe (recorded in sdwb.json)")
    prompts: int = Field(2, ge=1, le=64, description="probe prompts from the shapes train stream")
    prompt_offset: int = Field(1_000_000, ge=0, description="train-stream seed of the first probe prompt")
    steps: int = Field(10, ge=1, le=200)
    guidance: float = Field(7.5, ge=0.0)
    scheduler: Scheduler = "ddim"
    seed: int = Field(0, ge=0, description="probe image i starts from the noise of seed + i")
    min_psnr: float = Field(20.0, description="dB vs the float model's images for the same prompts/seeds")


class CalibrationConfig(_Strict):
    """Activations gathered along real denoising trajectories (Q-Diffusion / PTQ4DM style)."""

    prompts: int = Field(8, ge=1, le=4096, description="calibration prompts (shapes train stream)")
    prompt_offset: int = Field(0, ge=0, description="train-stream seed of the first calibration prompt")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps of each calibration trajectory")
    timesteps: Union[Literal["all"], int] = Field(
        10, description="'all' steps or K steps spread evenly over the whole trajectory (first and last kept)"
    )
    guidance: float = Field(7.5, ge=0.0, description="> 1: both CFG halves are recorded (one 2B call)")
    scheduler: Scheduler = "ddim"
    seed: int = Field(0, ge=0, description="trajectory i starts from the noise of seed + i")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    height: Optional[int] = Field(
        None, ge=64, multiple_of=64, description="image height of the trajectories (None: the model's own)"
    )
    width: Optional[int] = Field(
        None, ge=64, multiple_of=64, description="image width of the trajectories (None: the model's own)"
    )


class _Method(_Strict):
    components: list[Component] = Field(default_factory=lambda: ["unet"], min_length=1)
    guard: GuardConfig = Field(default_factory=GuardConfig)


# The registry: method name -> config class. A method is one config class registered here with
# what it runs on, plus the function that applies it, registered with the applier of its backend
# (``sdwb.quant.torch_methods.applies`` for torch; ``compress.ort_variant`` for ONNX Runtime
# graphs). ``METHODS``, ``METHOD_INFO``, the ``QuantConfig`` union, the CLI's ``--method`` help and
# the docs' method list are all read from it.
METHODS: dict[str, type[_Method]] = {}
# backend: what the variant runs on; device: where the method can run ("cpu" means any CPU here).
METHOD_INFO: dict[str, dict[str, str]] = {}


def register(*, backend: Literal["torch", "onnxruntime"], device: str):
    """Class decorator: register a method config (its ``method`` literal is its name)."""

    def add(cls: type[_Method]) -> type[_Method]:
        name = cls.model_fields["method"].default
        if name in METHODS:
            raise ValueError(f"quantization method {name!r} registered twice")
        METHODS[name] = cls
        METHOD_INFO[name] = {"backend": backend, "device": device}
        return cls

    return add


@register(backend="torch", device="cpu or cuda")
class TorchBf16Config(_Method):
    """Cast to bfloat16; modules matching ``keep_fp32`` (class name or module-path glob) stay fp32."""

    method: Literal["torch-bf16"] = "torch-bf16"
    keep_fp32: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FP32))


@register(backend="torch", device="cuda")
class TorchFp16Config(_Method):
    """Cast to float16 on a CUDA GPU; ``keep_fp32`` as for bf16."""

    method: Literal["torch-fp16"] = "torch-fp16"
    keep_fp32: list[str] = Field(default_factory=lambda: list(DEFAULT_KEEP_FP32))


@register(backend="torch", device="cpu")
class TorchInt8DynamicConfig(_Method):
    """torch.ao dynamic int8: ``nn.Linear`` weights int8, activations quantized per call (CPU)."""

    method: Literal["torch-int8-dynamic"] = "torch-int8-dynamic"
    engine: Literal["x86", "fbgemm", "onednn"] = "x86"
    exclude: list[str] = Field(default_factory=list, description="module-path globs left in fp32")


@register(backend="torch", device="cpu")
class TorchInt8StaticConfig(_Method):
    """W8A8 static int8 Conv2d + Linear of the UNet (torch.ao quantized kernels, CPU), calibrated on
    denoising trajectories; ``attention: bf16-sliced`` also moves the attention core to bf16."""

    method: Literal["torch-int8-static"] = "torch-int8-static"
    components: list[Literal["unet"]] = Field(default_factory=lambda: ["unet"], min_length=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    engine: Literal["fbgemm", "x86", "onednn"] = "fbgemm"
    channels_last: bool = True
    exclude: list[str] = Field(
        default_factory=lambda: ["conv_in", "conv_out"], description="module-path globs left in float"
    )
    attention: Literal["sdpa", "bf16-sliced"] = Field(
        "sdpa", description="sdpa: diffusers' default (fp32 flash); bf16-sliced: sdwb.quant.attention"
    )


@register(backend="torch", device="cpu or cuda")
class TorchaoInt8WeightOnlyConfig(_Method):
    """torchao int8 weight-only quantization of ``nn.Linear`` (needs the ``[torchao]`` extra)."""

    method: Literal["torchao-int8-weight-only"] = "torchao-int8-weight-only"
    exclude: list[str] = Field(default_factory=list, description="module-path globs left in fp32")


@register(backend="torch", device="cuda")
class TorchaoInt4WeightOnlyConfig(_Method):
    """torchao int4 weight-only (grouped) quantization of ``nn.Linear``; needs a CUDA kernel."""

    method: Literal["torchao-int4-weight-only"] = "torchao-int4-weight-only"
    group_size: Literal[32, 64, 128, 256] = 128
    exclude: list[str] = Field(default_factory=list)


@register(backend="onnxruntime", device="cpu")
class OrtInt8DynamicConfig(_Method):
    """ONNX Runtime ``quantize_dynamic``: int8 weights, activations quantized at run time."""

    method: Literal["ort-int8-dynamic"] = "ort-int8-dynamic"
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul"], min_length=1)
    per_channel: bool = False
    exclude_nodes: list[str] = Field(
        default_factory=list, description="node-name globs, or first_conv/last_conv"
    )


@register(backend="onnxruntime", device="cpu or cuda")
class OrtInt8StaticConfig(_Method):
    """ONNX Runtime ``quantize_static`` in QDQ format, calibrated on denoising trajectories."""

    method: Literal["ort-int8-static"] = "ort-int8-static"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul", "Gemm"], min_length=1)
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="int8 + symmetric for TensorRT")
    activation_symmetric: bool = False
    quantize_activation_matmuls: bool = Field(
        False, description="also quantize MatMuls of two activations (attention scores, attention x V)"
    )
    fuse_attention: bool = Field(
        False,
        description="UNet: fuse attention into ONNX Runtime's MultiHeadAttention (CPU flash attention) "
        "before quantizing; see compress/ort_fusion.py",
    )
    exclude_op_types: list[str] = Field(
        default_factory=lambda: [
            "Softmax",
            "InstanceNormalization",
            "GroupNormalization",
            "LayerNormalization",
        ]
    )
    exclude_nodes: list[str] = Field(
        default_factory=lambda: ["first_conv", "last_conv"],
        description="node-name globs; first_conv/last_conv name the graph's first and last Conv",
    )


@register(backend="onnxruntime", device="cuda")
class OrtFp16Config(_Method):
    """ONNX Runtime float16 graph (CUDA execution provider); ``op_block_list`` stays fp32."""

    method: Literal["ort-fp16"] = "ort-fp16"
    keep_io_types: bool = True
    op_block_list: list[str] = Field(default_factory=lambda: ["InstanceNormalization", "GroupNormalization"])


QuantConfig = Union[tuple(METHODS.values())]  # type: ignore[valid-type]  # every registered config


def methods_help() -> str:
    """``torch-bf16 | torch-fp16 | ...``: the registered methods, for help texts."""
    return " | ".join(METHODS)


def backend_of(config: QuantConfig) -> str:
    """``"torch"`` or ``"onnxruntime"``: what a variant of this config runs on."""
    return METHOD_INFO[config.method]["backend"]


def parse_quant_config(data: dict, source: str = "quantize config") -> QuantConfig:
    """Validate ``data`` (must hold ``method``) as that method's config; one-line errors."""
    if not isinstance(data, dict):
        raise SdwbError(f"{source}: expected a mapping of quantization keys, got {type(data).__name__}")
    method = data.get("method")
    if method is None:
        raise SdwbError(f"{source}: method: required key is missing (expected one of {', '.join(METHODS)})")
    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise SdwbError(f"{source}: method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SdwbError(f"{source}: " + format_errors(e, allowed=fields_of(cls))) from None


def load_quant_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **flags: Any
) -> QuantConfig:
    """Read a ``configs/quantize/*.yaml`` file (or start empty), apply ``--set`` overrides, then
    ``flags`` (command-line options; None values ignored), and validate."""
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, flags, guard={"method": "--method"})
    return parse_quant_config(data, source)


def resolved(config: QuantConfig) -> dict:
    """The config with every default filled in, as plain JSON data (recorded in sdwb.json)."""
    return config.model_dump(mode="json")
