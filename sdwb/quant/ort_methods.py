"""The ONNX Runtime graph quantization methods' configs (their quantizers: ``compress.ort_variant``).

Why apart from the quantizers: every reader of variants (the core) must parse an ORT-quantized
variant's record, while quantizing a graph needs an exported graph, which only ``compress``
(with the exporter the application layer hands it) has.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sdwb.quant.registry import CalibrationConfig, MethodConfig, register


@register(backend="onnxruntime", device="cpu")
class OrtInt8DynamicConfig(MethodConfig):
    """ONNX Runtime ``quantize_dynamic``: int8 weights, activations quantized at run time."""

    method: Literal["ort-int8-dynamic"] = "ort-int8-dynamic"
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul"], min_length=1)
    per_channel: bool = False
    exclude_nodes: list[str] = Field(
        default_factory=list, description="node-name globs, or first_conv/last_conv"
    )


@register(backend="onnxruntime", device="cpu or cuda")
class OrtInt8StaticConfig(MethodConfig):
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
class OrtFp16Config(MethodConfig):
    """ONNX Runtime float16 graph (CUDA execution provider); ``op_block_list`` stays fp32."""

    method: Literal["ort-fp16"] = "ort-fp16"
    keep_io_types: bool = True
    op_block_list: list[str] = Field(default_factory=lambda: ["InstanceNormalization", "GroupNormalization"])
