"""The variant format: what every stage writes and every stage reads, in one place.

A *variant* is a model directory in diffusers layout (torch) or an export directory (ONNX,
engines) plus a record: ``sdwb.json`` for a variant (:mod:`sdwb.variants.record`), ``manifest.json``
for an export (:mod:`sdwb.variants.manifest`); both list the sha256 and size of every file
(:mod:`sdwb.variants.files`). A pruned UNet is rebuilt from its recorded architecture
(:mod:`sdwb.variants.pruned`, with the block stand-ins of :mod:`sdwb.variants.unet_blocks`), and a
quantized torch variant is re-quantized on load from its recorded config
(:mod:`sdwb.variants.requantize`).

Why in the core: ``compress`` writes variants, ``export`` reads and writes them, ``bench`` and the
loaders read them. With the format here, no stage imports another to read an artifact.
"""
