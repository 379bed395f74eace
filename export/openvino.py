"""``sdwb export openvino``: OpenVINO IR per component, validated, hashed, in a manifest.

Route: the model is exported to ONNX first (``export.onnx``: the exporter, its dynamic axes and
its validation against PyTorch are the ones every other backend relies on), then every graph is
converted with ``openvino.convert_model`` and saved as IR (``model.xml`` + ``model.bin``, fp32
weights: ``compress_to_fp16=False``, so an "fp32" OpenVINO row is fp32). Each IR is validated
at the same two points as the ONNX graphs (the opt point and a second one, other batch and a
non-square latent) under OpenVINO's CPU plugin in f32:

- against **PyTorch's outputs** when the source is a model (spec, variant directory, pipeline):
  the references the ONNX export computed, on the same seeded inputs;
- against **ONNX Runtime on the same graph** when the source is an existing ONNX export
  (``--onnx DIR``, e.g. a graph ONNX Runtime quantized, which has no PyTorch twin); that
  export's own validation against PyTorch is kept in the manifest beside it.

Layout (built under a temporary name and renamed into place only when every component converted
and validated, like the ONNX export)::

    DIR/manifest.json   format sdwb-openvino-export: the ONNX manifest's interfaces, per component
                        the IR files, validation and what it was validated against; sha256 of files
    DIR/<component>/model.xml, model.bin
    DIR/tokenizer/ (tokenizer_2/), DIR/scheduler/, DIR/sdwb.json (the source variant's record)
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdwb.backends.openvino import run_f32
from sdwb.errors import SdwbError
from sdwb.runs import atomic_dir, atomic_write_json
from sdwb.variants.files import hash_files, library_versions
from sdwb.variants.manifest import EXPORT_FORMAT, MANIFEST, OPENVINO_FORMAT, resolve_dim, verify_manifest

XML, BIN = "model.xml", "model.bin"
KEEP = ("tokenizer", "tokenizer_2", "scheduler", "sdwb.json")  # copied from the ONNX export as they are


def _openvino():
    from sdwb.backends.openvino import require_openvino

    return require_openvino()


def manifest_feeds(entry: dict, point: dict[str, int], vocab_size: int, seed: int = 1) -> dict:
    """Seeded inputs of one component at ``point`` from its manifest entry (ONNX-source validation)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in entry["inputs"]:
        shape = tuple(resolve_dim(d, point) for d in spec["shape"])
        if spec["name"] == "input_ids":
            feeds[spec["name"]] = rng.integers(0, vocab_size, shape).astype(spec["dtype"])
        elif spec["name"] == "timestep":
            feeds[spec["name"]] = np.full(shape, 500.0, dtype=spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feeds


def _onnxruntime_outputs(path: Path, feeds: dict, names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def _validation_points(entry: dict) -> list[dict[str, int]]:
    """The distinct points the ONNX export validated this component at (opt and second)."""
    points = []
    for result in entry.get("validation", []):
        if result["point"] not in points:
            points.append(result["point"])
    if not points:
        points = [{axis: v["opt"] for axis, v in entry["axes"].items()}]
    return points


def validate_ir(core, model, entry: dict, onnx_path: Path, vocab_size: int, reference=None) -> list[dict]:
    """OpenVINO (CPU, f32) vs PyTorch (``reference`` = ``(interface, outputs)`` from the ONNX export)
    or vs ONNX Runtime on ``onnx_path``; raises beyond the component's tolerance."""
    from export.onnx import VALIDATION_POINTS, compare

    names = [o["name"] for o in entry["outputs"]]
    atol, rtol = entry["tolerance"]["atol"], entry["tolerance"]["rtol"]
    cases = []
    if reference is not None:
        iface, refs = reference
        for which in VALIDATION_POINTS:
            cases.append((iface.point(which), iface.sample_inputs(which, seed=1), refs[which], "pytorch"))
    else:
        for point in _validation_points(entry):
            feeds = manifest_feeds(entry, point, vocab_size)
            cases.append((point, feeds, _onnxruntime_outputs(onnx_path, feeds, names), "onnxruntime"))
    results = []
    for point, feeds, refs, against in cases:
        outs = run_f32(core, model, feeds, names)
        for name, out, ref in zip(names, outs, refs):
            result = {"point": point, "against": against, **compare(out, ref, atol, rtol)}
            if len(names) > 1:
                result["output"] = name
            results.append(result)
            if not result["ok"]:
                raise SdwbError(
                    f"validation of {entry['file']} ({name}) failed at {point}: OpenVINO vs {against} max "
                    f"abs error {result['max_abs']:.3g}, max rel error {result['max_rel']:.3g} (tolerance "
                    f"atol {atol:g}, rtol {rtol:g})"
                )
    return results


def convert_component(ov, onnx_path: Path, out_dir: Path):
    """ONNX graph -> IR files in ``out_dir``; returns the converted ``ov.Model``."""
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # the converter raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdwbError(f"OpenVINO could not convert {onnx_path}: {first}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out_dir / XML), compress_to_fp16=False)
    return model


def export_openvino(
    source,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_batch: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Convert ``source`` (a model spec / pipeline, or an ONNX export directory) to OpenVINO IR in
    ``out_dir``; returns the manifest (also written there). Bad input, a failed conversion or a
    component beyond tolerance raise :class:`SdwbError` with ``out_dir`` untouched."""
    from export.onnx import export_onnx
    from sdwb.backends.registry import manifest_format

    say = progress or (lambda _msg: None)
    ov = _openvino()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SdwbError(f"{out_dir}: already exists (refusing to overwrite a finished export)")
    is_onnx = isinstance(source, (str, Path)) and manifest_format(source) == EXPORT_FORMAT
    if isinstance(source, (str, Path)) and not is_onnx and manifest_format(source) is not None:
        raise SdwbError(f"{source}: a {manifest_format(source)} directory; export openvino takes a model "
                        "or an ONNX export (sdwb export onnx)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    references: dict = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if is_onnx:
            from sdwb.families import FAMILIES, check_verb

            onnx_dir = Path(source)
            say("verifying the ONNX export")
            onnx_manifest = verify_manifest(onnx_dir)
            check_verb(FAMILIES[onnx_manifest["pipeline"].get("family", "sd1")], "export openvino")
        else:
            from sdwb.loading import require_family

            require_family(source, "export openvino")
            onnx_dir = tmp / ".onnx"
            onnx_manifest = export_onnx(source, onnx_dir, max_batch=max_batch, references=references,
                                        progress=lambda m: say(f"ONNX export: {m}"))
        core, entries = ov.Core(), {}
        vocab = int(onnx_manifest["pipeline"].get("vocab_size", 49408))
        for name, entry in onnx_manifest["components"].items():
            say(f"converting {name}")
            started = time.perf_counter()
            model = convert_component(ov, onnx_dir / entry["file"], tmp / name)
            convert_s = time.perf_counter() - started
            say(f"validating {name}")
            validation = validate_ir(core, model, entry, onnx_dir / entry["file"], vocab,
                                     references.pop(name, None))
            del model
            gc.collect()
            drop = ("file", "external_data", "validation", "exporter")
            new = {k: v for k, v in entry.items() if k not in drop}
            entries[name] = {**new, "file": f"{name}/{XML}", "weights": f"{name}/{BIN}",
                             "convert_seconds": round(convert_s, 3),
                             "validation_seconds": round(time.perf_counter() - started - convert_s, 3),
                             "validation": validation, "onnx_validation": entry.get("validation", [])}
        for keep in KEEP:
            src = onnx_dir / keep
            if src.is_dir():
                shutil.copytree(src, tmp / keep)
            elif src.is_file():
                shutil.copyfile(src, tmp / keep)
        if not is_onnx:
            shutil.rmtree(onnx_dir)
        say("hashing files")
        manifest = {
            "format": OPENVINO_FORMAT,
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dtype": "float32",
            "openvino": ov.__version__,
            "max_batch": onnx_manifest.get("max_batch"),
            "source": {**onnx_manifest.get("source", {}),
                       "onnx_export": str(Path(source).resolve()) if is_onnx else None,
                       "quantization": onnx_manifest.get("quantization")},
            "pipeline": onnx_manifest["pipeline"],
            "libraries": library_versions(),
            "components": entries,
            "files": hash_files(tmp, skip=(MANIFEST,)),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def ir_summary(manifest: dict) -> list[tuple[str, int, float, str]]:
    """``(component, size in bytes, worst max abs error, validated against)`` per component."""
    rows = []
    for name, entry in manifest["components"].items():
        size = sum(v["size"] for k, v in manifest["files"].items() if k.startswith(name + "/"))
        worst = max(entry["validation"], key=lambda r: r["max_abs"])
        rows.append((name, size, worst["max_abs"], worst["against"]))
    return rows

