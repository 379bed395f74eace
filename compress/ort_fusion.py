"""Fuse an exported UNet's attention into ONNX Runtime's ``MultiHeadAttention`` for the CPU.

Why: once convolutions and linears run in int8, the float attention core is the largest float
part of an SD 1.5 UNet call on the CPU (five self-attentions over 4096 tokens at the 64x64 level).
The exported graph computes it as MatMul -> Mul -> Softmax -> MatMul and materialises every
4096x4096 score matrix; ONNX Runtime's ``com.microsoft.MultiHeadAttention`` has a CPU
flash-attention kernel that does not (one 2x8x4096x40 attention, 1 thread: 0.53 s fused vs 0.66 s
unfused, max abs difference 2e-7; reports/quantization-cpu/attention_microbench.py).

How: two library fusers, because the two exporters write attention differently.
- dynamo-exported graphs (sd15-arch's UNet, over 2 GB): onnxscript's ``optimize_for_ort``
  rewrites scaled-dot-product attention into ``MultiHeadAttention`` with Q/K/V projections left as
  separate MatMuls (32 attentions of the sd15-arch UNet), plus SkipLayerNorm and Gelu fusions.
- TorchScript-exported graphs (the small models): ONNX Runtime's own transformer optimizer
  (``model_type="unet"``), with its CUDA-only fusions (GroupNorm, NhwcConv, BiasSplitGelu,
  BiasAdd) switched off, and Q/K/V packing off too: the CPU kernel does not implement it ("Packed
  QKV ... not implemented for CPU"). Unpacked, the optimizer writes self-attention as the
  ``Attention`` op, whose projection weights live inside the op where static int8 quantization
  cannot reach them; :func:`_split_self_attention` rewrites each one back into three ``MatMul``
  projections feeding a ``MultiHeadAttention``, so ``quantize_static`` still quantizes them.
Each fuser finds nothing in the other exporter's graph; the first that fuses any attention wins.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from compress.quant_ort import has_external_data
from sdwb.errors import SdwbError

_CUDA_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_nhwc_conv",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)


@contextmanager
def _numpy2_num_heads():
    """Patch ``FusionAttentionUnet.get_num_heads`` for numpy >= 2 (ONNX Runtime 1.32).

    The optimizer calls ``int()`` on a shape-[1] array, which numpy 2 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"), so no attention is fused. Restored on exit. The
    optimizer's scripts are importable under two module names; both are patched.
    """
    import onnxruntime.transformers.fusion_attention_unet as fau

    modules = [fau] + [m for m in (sys.modules.get("fusion_attention_unet"),) if m is not None]
    originals = [m.FusionAttentionUnet.get_num_heads for m in modules]

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if not is_torch2:
            return originals[0](self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(-1)[0]) > 0:
                return int(value.reshape(-1)[0])
        return 0

    for m in modules:
        m.FusionAttentionUnet.get_num_heads = get_num_heads
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.FusionAttentionUnet.get_num_heads = original


def _split_self_attention(model) -> int:
    """Rewrite every ``Attention`` node (packed Q/K/V weight) as 3 MatMuls + ``MultiHeadAttention``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            continue
        x, w_name = node.input[0], node.input[1]
        bias_name = node.input[2] if len(node.input) > 2 else ""
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        weight = numpy_helper.to_array(inits[w_name])
        if weight.shape[1] % 3:
            raise SdwbError(f"attention fusion: {node.name} has a Q/K/V weight of shape {weight.shape}")
        new_nodes, outputs = [], []
        for part, w in zip("qkv", np.split(weight, 3, axis=1)):
            name = f"{node.name}_{part}_proj"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name + "_weight"))
            new_nodes.append(helper.make_node("MatMul", [x, name + "_weight"], [name + "_out"], name=name))
            outputs.append(name + "_out")
        inputs = outputs
        if bias_name and np.any(numpy_helper.to_array(inits[bias_name])):
            inputs = outputs + [bias_name]
        new_nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                inputs,
                list(node.output),
                name=f"{node.name or index}_mha",
                domain="com.microsoft",
                num_heads=heads,
            )
        )
        del graph.node[index]
        for offset, new in enumerate(new_nodes):
            graph.node.insert(index + offset, new)
        graph.initializer.remove(inits[w_name])
        if bias_name in inits and bias_name not in inputs:  # the optimizer's all-zero bias, unused now
            graph.initializer.remove(inits[bias_name])
        rewritten += 1
    return rewritten


def _infer_types(model):
    """Symbolic shape/type inference that knows the contrib ops (ONNX's own stops at them).

    ``quantize_static`` needs the element type of every tensor it quantizes; without this it skips
    the MatMuls and LayerNorm outputs downstream of a ``MultiHeadAttention`` ("failed to infer the
    type of tensor ... Skip to quantize it"). Returns the number of typed intermediate tensors.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return len(model.graph.value_info)


def _fuse_with_onnxscript(src: Path, dst: Path) -> dict | None:
    """onnxscript's ORT fusions (dynamo graphs); None when they find no attention."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))  # external weights stay memory-mapped
    optimize_for_ort(model)
    counts = Counter(node.op_type for node in model.graph)
    if not counts.get("MultiHeadAttention"):
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst), external_data=dst.name + ".data" if has_external_data(src) else None)
    return {"fuser": "onnxscript.optimize_for_ort", **_summary(counts, split=0)}


@contextmanager
def _no_tqdm_bars():
    """ORT's UNet fusion draws its own tqdm bar ("fusion: 0/18 ...") that garbles logs and sits
    between sdwb's lines; it is turned off for the call (tqdm reads ``TQDM_DISABLE`` only at import,
    so the class is swapped for one that is always disabled, and put back afterwards)."""
    try:
        import tqdm
    except ImportError:
        yield
        return
    original = tqdm.tqdm

    class Quiet(original):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm.tqdm = Quiet
    try:
        yield
    finally:
        tqdm.tqdm = original


def _fuse_with_ort_optimizer(src: Path, dst: Path) -> dict | None:
    """ONNX Runtime's transformer optimizer (TorchScript graphs); None when it finds no attention."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for name in _CUDA_ONLY_FUSIONS:
        setattr(options, name, False)
    with _numpy2_num_heads(), _no_tqdm_bars():
        optimized = optimize_model(
            str(src),
            model_type="unet",
            num_heads=0,
            hidden_size=0,
            optimization_options=options,
            opt_level=0,
            use_gpu=False,
        )
    split = _split_self_attention(optimized.model)
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    if not counts.get("MultiHeadAttention"):
        return None
    typed = _infer_types(optimized.model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(
        str(dst), use_external_data_format=has_external_data(src), all_tensors_to_one_file=True
    )
    return {"fuser": "onnxruntime.transformers.optimizer", **_summary(counts, split), "typed_tensors": typed}


def _summary(counts: Counter, split: int) -> dict:
    return {
        "multi_head_attention": counts.get("MultiHeadAttention", 0),
        "self_attention_split": split,
        "layer_norm": counts.get("LayerNormalization", 0) + counts.get("SkipLayerNormalization", 0),
    }


def fuse_attention(src: Path, dst: Path) -> dict:
    """Write ``src`` with its attention fused into ``MultiHeadAttention`` to ``dst``; what was fused.

    Raises SdwbError when neither fuser finds attention (an export neither recognises): a silently
    unfused graph would be benchmarked as if it were fused.
    """
    for fuser in (_fuse_with_onnxscript, _fuse_with_ort_optimizer):
        info = fuser(src, dst)
        if info is not None:
            return info
    raise SdwbError(
        f"attention fusion found no attention in {src}; export the graph again or set fuse_attention: false"
    )
