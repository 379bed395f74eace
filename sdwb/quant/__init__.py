"""Quantization as the variant format needs it: the typed method configs a record stores, and the
torch methods that re-apply them when a quantized variant is loaded.

Why in the core: a torch-quantized variant stores float weights (torch's packed int8 modules
cannot go to safetensors, and pickle is not allowed), so loading it means re-applying the
recorded method: every reader of variants needs this code, not only ``compress``. What only
making a variant needs (calibration along denoising trajectories, the guard, ONNX Runtime
graph quantization) stays in ``compress``.
"""
