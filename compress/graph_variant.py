"""The steps every graph-quantization variant shares (ONNX Runtime and OpenVINO alike).

Why one place: ``compress.ort_variant`` and ``compress.ov_variant`` differ in how a graph is
quantized and stored, not in how the float source is obtained, probed, calibrated, guarded and
recorded. :func:`float_source` exports a torch source when needed and checks the components;
:func:`probe_and_calibrate` renders the guard's float images and records calibration
trajectories; :func:`finish` guards the quantized pipeline and writes ``sdwb.json`` plus the
re-hashed manifest, last, inside the variant's atomic directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compress import guard as guard_mod
from sdwb.errors import SdwbError


def float_source(pipe, export_dir: Path | None, exporter, scratch, parent: dict, say,
                 read_manifest: Callable[[Path], dict], components: list[str]) -> tuple[Path, dict, dict]:
    """``(export directory, parent record, its verified manifest)``: ``pipe`` exported with
    ``exporter`` into ``scratch`` when no export was given; every one of ``components`` present."""
    if export_dir is None:
        say("exporting the float model to ONNX")
        export_dir = Path(scratch) / "float"
        exporter(pipe, export_dir, progress=lambda m: say(f"float export: {m}"))
        parent = {**parent, "export": None}
    else:
        parent = {**parent, "export": str(export_dir.resolve())}
    manifest = read_manifest(export_dir)
    missing = [c for c in components if c not in manifest["components"]]
    if missing:
        raise SdwbError(
            f"components {missing}: not in the export {export_dir} (it has "
            f"{', '.join(manifest['components'])})"
        )
    return export_dir, parent, manifest


def probe_and_calibrate(float_pipe, config, calibrates: bool, say):
    """``(guard reference images or None, calibration set or None)`` from the float pipeline."""
    reference = calib = None
    if config.guard.enabled:
        say("guard: probe images with the float model")
        reference = guard_mod.render(float_pipe, config.guard)
    if calibrates:
        from compress.calibration import record_trajectories

        say("calibration: recording denoising trajectories")
        calib = record_trajectories(float_pipe, config.calibration, progress=say)
    return reference, calib


def finish(tmp: Path, manifest: dict, metrics: dict, *, config, backend: str, weights: str, parent: dict,
           calib, reference, open_quantized: Callable[[Path], object], say) -> dict:
    """Guard the quantized pipeline (``open_quantized(tmp)``) against ``reference``, then write the
    record and the manifest re-hashed with it; returns the record."""
    from sdwb.quant.config import resolved
    from sdwb.runs import atomic_write_json
    from sdwb.variants.files import hash_files
    from sdwb.variants.manifest import MANIFEST
    from sdwb.variants.record import RECORD, new_record

    if config.guard.enabled:
        say("guard: probe images with the quantized model")
        quant_pipe = open_quantized(tmp)
        metrics["guard"] = guard_mod.check(config.method, reference, quant_pipe, config.guard)
        del quant_pipe
    else:
        metrics["guard"] = "disabled"
    record = new_record(
        stage="quantize", method=config.method, backend=backend, weights=weights,
        parent=parent, config=resolved(config), calibration=calib.summary() if calib else None,
        metrics=metrics,
    )
    record["files"] = hash_files(tmp, skip=(RECORD, MANIFEST))
    atomic_write_json(tmp / RECORD, record)
    manifest["files"] = hash_files(tmp, skip=(MANIFEST,))  # now including sdwb.json
    atomic_write_json(tmp / MANIFEST, manifest)
    return record
