"""Re-apply a torch variant's recorded quantization when it is loaded.

Why: torch's dynamically quantized and torchao modules hold packed weights that safetensors
cannot store, and pickle is not allowed, so those variants store the float weights and
:func:`reapply` re-quantizes them from the recorded config when ``sdwb.loading`` opens the
directory (deterministic: same weights, same config, same model). bf16/fp16 variants store
their low-precision weights (half the disk) and the cast is re-applied the same way;
``torch-int8-static`` variants also store their calibrated activation ranges.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdwb.errors import SdwbError
from sdwb.variants.record import RECORD, verify_record


def reapply(pipe, directory: str | Path, record: dict, device: str = "cpu"):
    """Re-apply the recorded torch quantization to a pipeline just loaded (fp32) from ``directory``.

    Returns the pipeline, on ``device``. Verifies the files against the record first. ONNX
    Runtime variants are export directories and are refused here (they load with
    ``OrtStableDiffusionPipeline.from_export`` / ``--backend onnxruntime``).
    """
    from sdwb.quant.config import backend_of, parse_quant_config
    from sdwb.quant.torch_methods import apply_torch_method

    directory = Path(directory)
    config = parse_quant_config(record.get("config", {}), str(directory / RECORD))
    if backend_of(config) != "torch":
        raise SdwbError(
            f"{directory}: an ONNX Runtime variant ({config.method}); load it with --backend onnxruntime"
        )
    verify_record(directory, record)
    state = None
    if config.method == "torch-int8-static":
        from sdwb.quant.w8a8 import RANGES_FILE

        try:
            state = json.loads((directory / RANGES_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SdwbError(f"{directory / RANGES_FILE}: cannot read the calibrated ranges: {exc}") from None
    if str(device).startswith("cuda"):
        pipe = pipe.to(device)
    apply_torch_method(pipe, config, device, state)
    return pipe
