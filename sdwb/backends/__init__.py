"""Generation on every backend: the pipelines that run exported models, and the backends table.

``torch`` runs a diffusers pipeline (:mod:`sdwb.loading`); ``onnxruntime`` an ONNX export
(:mod:`sdwb.backends.onnxruntime`); ``tensorrt`` engines (:mod:`sdwb.backends.tensorrt`). Which
model each backend takes, and opening it, is :mod:`sdwb.backends.registry`. Making the exports
and engines is the export stage's job; running them is the core's, so the benchmark and
calibration read an export without importing the stage that wrote it.
"""
