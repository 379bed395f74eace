"""The quantization methods as one typed union, parsed and validated on load.

Why typed configs: a quantization recipe must be reproducible from one YAML file, and a typo
(``min_psrn: 20``) must fail before a model is loaded. Every config forbids unknown keys and is
strictly typed; :func:`parse_quant_config` turns any problem into one ``SdwbError`` line naming
the source, the key and what was expected. The resolved config (every default filled in) is what
a variant's ``sdwb.json`` records, and what loading re-applies.

The methods themselves are registered (:mod:`sdwb.quant.registry`): the torch methods one module
each under :mod:`sdwb.quant.methods` (every module there is imported here), the ONNX Runtime
graph methods in :mod:`sdwb.quant.ort_methods`, the OpenVINO ones in :mod:`sdwb.quant.ov_methods`.
``METHODS``, ``METHOD_INFO``, ``QuantConfig``
and :func:`methods_help` are read from that registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Union

from sdwb.quant import methods as _methods
from sdwb.quant import (
    ort_methods,  # noqa: F401  (registers the ONNX Runtime methods)
    ov_methods,  # noqa: F401  (registers the OpenVINO / NNCF methods)
)
from sdwb.quant.registry import (  # noqa: F401  (the public names of the quantization configs)
    COMPONENTS,
    DEFAULT_KEEP_FP32,
    METHOD_INFO,
    METHODS,
    CalibrationConfig,
    Component,
    GuardConfig,
)
from sdwb.schema_errors import parse_by_method

for _module in pkgutil.iter_modules(_methods.__path__):  # one module per torch method
    importlib.import_module(f"{_methods.__name__}.{_module.name}")

QuantConfig = Union[tuple(METHODS.values())]  # type: ignore[valid-type]  # every registered config


def methods_help() -> str:
    """``torch-bf16 | torch-fp16 | ...``: the registered methods, for help texts."""
    return " | ".join(METHODS)


def backend_of(config: QuantConfig) -> str:
    """``"torch"``, ``"onnxruntime"`` or ``"openvino"``: what a variant of this config runs on."""
    return METHOD_INFO[config.method]["backend"]


def parse_quant_config(data: dict, source: str = "quantize config") -> QuantConfig:
    """Validate ``data`` (must hold ``method``) as that method's config; one-line errors."""
    return parse_by_method(data, METHODS, source, "quantization")


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
