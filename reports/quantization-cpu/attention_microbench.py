"""One SD 1.5 64x64-level self-attention on the CPU: unfused ONNX graph vs ORT MultiHeadAttention.

The unfused graph is what the exporters write (MatMul -> Mul -> Softmax -> MatMul, with the
2x8x4096x4096 score tensor); com.microsoft.MultiHeadAttention is what compress/ort_fusion.py fuses it
into. Prints the max abs difference and three interleaved timings of each, 1 intra-op thread.

usage: python reports/quantization-cpu/attention_microbench.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

B, S, N, H = 2, 4096, 8, 40
C = N * H


def unfused():
    nodes = [
        h.make_node("Reshape", ["q", "shp"], ["q4"]),
        h.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["k", "shp"], ["k4"]),
        h.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        h.make_node("Reshape", ["v", "shp"], ["v4"]),
        h.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        h.make_node("MatMul", ["qt", "kt"], ["s"]),
        h.make_node("Mul", ["s", "scale"], ["s2"]),
        h.make_node("Softmax", ["s2"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "vt"], ["o"]),
        h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["ot", "shp3"], ["out"]),
    ]
    init = [
        h.make_tensor("shp", T.INT64, [4], [B, S, N, H]),
        h.make_tensor("shp3", T.INT64, [3], [B, S, C]),
        h.make_tensor("scale", T.FLOAT, [], [H**-0.5]),
    ]
    return nodes, init


def fused():
    return [
        h.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=N)
    ], []


res = {}
for name, f in [("unfused", unfused), ("mha", fused)]:
    nodes, init = f()
    g = h.make_graph(
        nodes,
        name,
        [h.make_tensor_value_info(x, T.FLOAT, [B, S, C]) for x in "qkv"],
        [h.make_tensor_value_info("out", T.FLOAT, [B, S, C])],
        init,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    res[name] = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {x: rng.standard_normal((B, S, C)).astype(np.float32) for x in "qkv"}
outs = {k: s.run(None, feeds)[0] for k, s in res.items()}
print("max diff", float(np.abs(outs["unfused"] - outs["mha"]).max()))
for _ in range(3):
    for k, s in res.items():
        t0 = time.perf_counter()
        s.run(None, feeds)
        print(k, round(time.perf_counter() - t0, 3), "s")
