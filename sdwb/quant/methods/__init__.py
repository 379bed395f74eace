"""The PyTorch quantization methods, one module each (config class + applier).

Every module in this package is imported by :mod:`sdwb.quant.config`, so a new torch method is
one new file here: its ``@register``-ed config and its ``@applies`` function.
"""
