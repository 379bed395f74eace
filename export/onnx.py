"""Export a Stable Diffusion pipeline to ONNX, validate every graph, write a hashed manifest.

Layout of an export directory (built under a temporary name, renamed into place only when every
component exported *and* validated, so a killed export leaves nothing that looks complete)::

    DIR/manifest.json        names, shapes, dynamic axes, min/opt/max profiles, opset, versions,
                             measured validation errors, source variant, sha256 + size of each file
    DIR/<component>/model.onnx  (+ model.onnx.data once the weights pass 2 GB)
    DIR/tokenizer/  DIR/scheduler/  DIR/sdwb.json (the source variant's record, when it has one)

Exporter (``exporter="auto"``): both torch.onnx exporters export these diffusers/transformers
models at opset 18 with dynamic batch/height/width and agree with PyTorch to ~1e-6. Components
under 2 GB of weights use the TorchScript one (``dynamo=False``): ~15-30x faster to export here
(tiny UNet 0.5 s vs 18 s on 2 cores, which keeps tests fast), no onnxscript needed. Past 2 GB
(sd15-arch's UNet) the ``dynamo=True`` one: the TorchScript exporter copies the weights into
its protobuf and peaks at ~4x their size in RAM (8.8 GB for a 2.2 GB layer), the dynamo one
writes them straight from torch storage (2.5 GB for the same layer). TorchScript is deprecated
upstream, so "auto" also falls back to dynamo when it fails; ``"torchscript"``/``"dynamo"``
force one. dynamo needs ``onnxscript``.

Validation: ONNX Runtime (CPU EP) vs the PyTorch wrapper on seeded sample inputs at the opt
point and at a second point of the dynamic ranges (another batch, non-square latent). It passes
when ``|ort - torch| <= atol + rtol * |torch|`` everywhere; ``max_rel`` in the manifest is
``max |ort - torch| / max(|torch|, atol)`` (relative error, floored so zeros do not explode).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from export.interfaces import COMPONENTS, DEFAULT_COMPONENTS, build_interfaces, pipeline_facts, wrapper
from sdwb.errors import SdwbError
from sdwb.runs import atomic_dir, atomic_write_json
from sdwb.variants.files import hash_files, library_versions
from sdwb.variants.manifest import EXPORT_FORMAT, MANIFEST, source_fingerprint
from sdwb.variants.record import RECORD, read_record

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TWO_GB = 2**31 - 1  # protobuf's limit on one serialized message


# --------------------------------------------------------------------------- export of one graph


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _torch_export(module, iface, path: Path, opset: int, exporter: str) -> str:
    """Export ``module`` to ``path`` with ``exporter``; returns the exporter actually used."""
    import warnings

    names = dict(input_names=[s.name for s in iface.inputs], output_names=[o.name for o in iface.outputs],
                 opset_version=opset)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        if exporter == "auto" and _param_bytes(module) > TWO_GB and _has_onnxscript():
            exporter = "dynamo"  # TorchScript peaks at ~4x the weights in RAM; dynamo at ~1x
        if exporter in ("auto", "torchscript"):
            args = tuple(torch.from_numpy(v) for v in iface.sample_inputs("opt").values())
            try:
                torch.onnx.export(module, args, str(path), dynamo=False,
                                  dynamic_axes=iface.dynamic_axes(), **names)
                return "torchscript"
            except Exception as exc:
                if exporter == "torchscript" or not _has_onnxscript():
                    raise SdwbError(f"ONNX export of {iface.name} failed: {_why(exc)}") from None
        # torch.export specialises axes whose example size is 0 or 1: trace at sizes >= 2
        point = {a: max(v, min(2, iface.axes[a][2])) for a, v in iface.point("opt").items()}
        args = tuple(torch.from_numpy(v) for v in iface.sample_inputs(point).values())
        try:
            program = torch.onnx.export(module, args, None, dynamo=True,
                                        dynamic_shapes=_dynamo_shapes(iface), **names)
            program.save(str(path), external_data=_param_bytes(module) > TWO_GB)
        except Exception as exc:
            raise SdwbError(f"ONNX export (dynamo) of {iface.name} failed: {_why(exc)}") from None
    return "dynamo"


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _has_onnxscript() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxscript") is not None


def _dynamo_shapes(iface) -> tuple:
    """``dynamic_shapes`` for ``dynamo=True`` from the declared axes (shared Dim per axis)."""
    dims = {}
    for axis, (lo, _, hi) in iface.axes.items():
        dims[axis] = torch.export.Dim(axis, min=1 if lo == hi else lo, max=hi)
    shapes = []
    for spec in iface.inputs:
        entry = {}
        for i, d in enumerate(spec.shape):
            if isinstance(d, str):
                axis, _, factor = d.partition("*")
                entry[i] = dims[axis] * int(factor) if factor else dims[axis]
        shapes.append(entry or None)
    return tuple(shapes)


def _consolidate(raw: Path, final: Path, external: bool) -> None:
    """Move the exported graph from ``raw`` to ``final``: one .onnx, plus one .data if ``external``.

    The TorchScript exporter writes one file per tensor past 2 GB; those (or, under the threshold,
    the inline tensors) are streamed into a single page-aligned ``model.onnx.data``
    (``save_as_external_data`` layout). A graph whose tensors already all live in one
    ``model.onnx.data`` (the dynamo exporter's layout) is moved as it is.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    tensors = list(_get_all_tensors(model))
    locations = {ExternalDataInfo(t).location for t in tensors if uses_external_data(t)}
    if not locations and not external:
        shutil.move(raw, final)
        return
    if locations == {DATA_FILE}:
        shutil.move(raw.with_name(DATA_FILE), final.with_name(DATA_FILE))
        shutil.move(raw, final)
        return
    with open(final.with_name(DATA_FILE), "wb") as out:
        for tensor in tensors:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                start = _align(out)
                _copy_range(raw.parent / info.location, info.offset or 0, info.length, out)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                start = _align(out)
                out.write(tensor.raw_data)
            else:
                continue
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            fields = (("location", DATA_FILE), ("offset", str(start)), ("length", str(out.tell() - start)))
            for key, value in fields:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(final))


def _align(out, page: int = 4096) -> int:
    """Pad ``out`` to a page boundary (runtimes can mmap the tensors); return the offset."""
    out.write(b"\0" * (-out.tell() % page))
    return out.tell()


def _copy_range(src: Path, offset: int, length: int | None, out, chunk: int = 1 << 24) -> None:
    """Stream ``length`` bytes (None: to the end) of ``src`` from ``offset`` into ``out``."""
    with open(src, "rb") as f:
        f.seek(offset)
        remaining = length if length is not None else float("inf")
        while remaining > 0 and (block := f.read(int(min(chunk, remaining)))):
            out.write(block)
            remaining -= len(block)


def _slim(path: Path) -> None:
    """ONNX Runtime offline optimisation at the BASIC level, written over ``path``.

    BASIC = constant folding, redundant-node removal and fusions into standard ONNX ops: the
    graph stays portable (TensorRT parses it). EXTENDED/ALL would bake in CPU-EP contrib ops
    and layouts. onnxslim would do similar work but is not a dependency.
    """
    import onnxruntime as ort

    work = path.parent / "slim"
    work.mkdir()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(work / MODEL_FILE)
    if (path.parent / DATA_FILE).exists():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for name in (MODEL_FILE, DATA_FILE):
        if (path.parent / name).exists():
            (path.parent / name).unlink()
        if (work / name).exists():
            shutil.move(work / name, path.parent / name)
    shutil.rmtree(work)


# --------------------------------------------------------------------------- validation


def compare(ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    """Max abs / rel error of ``ort_out`` vs ``ref`` and whether it is within tolerance."""
    if ort_out.shape != ref.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False,
                "shape": f"{list(ort_out.shape)} != {list(ref.shape)}"}
    a, b = ort_out.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(a - b)
    if not np.isfinite(diff).all():
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False}
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(b), atol)).max(initial=0.0))
    ok = bool((diff <= atol + rtol * np.abs(b)).all())
    return {"max_abs": max_abs, "max_rel": max_rel, "ok": ok}


VALIDATION_POINTS = ("opt", "second")


def reference_outputs(module, iface) -> dict[str, list[np.ndarray]]:
    """PyTorch's outputs at the validation points (seeded inputs), per point a list per output."""
    refs = {}
    with torch.inference_mode():
        for which in VALIDATION_POINTS:
            feeds = iface.sample_inputs(which, seed=1)
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
            out = out if isinstance(out, tuple) else (out,)  # SDXL's second text encoder: two outputs
            refs[which] = [t.float().numpy() for t in out]
    return refs


def validate_component(path: Path, reference, iface) -> list[dict]:
    """ONNX Runtime (CPU EP) vs PyTorch at the opt and the second point; raises beyond tolerance.

    ``reference``: :func:`reference_outputs` (computed first, so the caller can free the torch
    module before ONNX Runtime loads its own copy of the weights: one copy at a time, which is what
    lets SDXL's 10 GB UNet be validated on a 24 GB machine), or the torch module itself. The
    session runs the graph as exported (basic optimisations only, no weight prepacking): the full
    optimisation level doubled the weights and pushed the sd15-arch export past 12 GB. The
    runtime pipeline uses the full level; the image-match tests cover that.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()  # BASIC level, no prepacking: one copy of the weights (sd15 RAM)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False  # give activation memory back after each run
    refs = reference if isinstance(reference, dict) else reference_outputs(reference, iface)
    points = {which: iface.sample_inputs(which, seed=1) for which in VALIDATION_POINTS}
    names = [o.name for o in iface.outputs]
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    results = []
    for which, feeds in points.items():
        outs = session.run(names, feeds)
        for name, out, ref in zip(names, outs, refs[which]):
            result = {"point": iface.point(which), **compare(out, ref, iface.atol, iface.rtol)}
            if len(names) > 1:
                result["output"] = name
            results.append(result)
            if not result["ok"]:
                shape = f"; shape {result['shape']}" if "shape" in result else ""
                what = f"{iface.name}.{name}" if len(names) > 1 else iface.name
                raise SdwbError(
                    f"validation of {what} failed at {result['point']}: ONNX Runtime vs PyTorch max abs "
                    f"error {result['max_abs']:.3g}, max rel error {result['max_rel']:.3g} (tolerance atol "
                    f"{iface.atol:g}, rtol {iface.rtol:g}{shape})"
                )
    del session
    return results


# --------------------------------------------------------------------------- whole pipeline


def _save_scheduler(scheduler, directory: Path) -> None:
    """``save_pretrained`` plus the ``_use_default_values`` list diffusers drops on save.

    Why: ``make_scheduler("euler", config)`` lets Euler's own defaults (``timestep_spacing``
    "linspace") replace values the source scheduler only had by default (DDIM's "leading"); a
    plain save marks them explicit, and the export's Euler/DPM++ images would then differ from
    the torch backend's for an in-memory pipeline. ``from_config`` honours the list on load.
    """
    scheduler.save_pretrained(directory)
    defaults = scheduler.config.get("_use_default_values")
    if defaults:
        path = directory / "scheduler_config.json"
        config = json.loads(path.read_text())
        config["_use_default_values"] = sorted(defaults)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _source(spec_or_pipe) -> tuple[object, dict, Path | None]:
    """(pipeline, source record, directory holding its sdwb.json or None)."""
    from sdwb.loading import load_pipeline, require_family, resolve_spec

    require_family(spec_or_pipe, "export onnx")
    if not isinstance(spec_or_pipe, (str, Path)):
        from sdwb.cache.config import applied

        if applied(spec_or_pipe) is not None:
            raise SdwbError(f"export onnx: the pipeline runs {applied(spec_or_pipe).method} (a torch-only "
                            "patch); export the model it was applied to")
        return spec_or_pipe, {"spec": None, "class": type(spec_or_pipe).__name__}, None
    from sdwb.cache.config import refuse_cache_variant

    refuse_cache_variant(spec_or_pipe, "export onnx")
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin

    spec = str(spec_or_pipe)
    built_in_code = spec.startswith(BUILTIN_PREFIX) and get_builtin(spec).asset is None
    path = None if built_in_code else resolve_spec(spec, "pipeline")
    pipe = load_pipeline(spec, device="cpu", dtype=torch.float32)
    record = {"spec": spec, "path": str(Path(path).resolve()) if path else None,
              "fingerprint": source_fingerprint(spec)}
    variant = read_record(path) if path else None
    if variant is not None:
        record["variant"] = variant
        return pipe, record, Path(path) / RECORD
    return pipe, record, None


def export_onnx(
    spec_or_pipe,
    out_dir: str | Path,
    opset: int = 18,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    slim: bool = False,
    *,
    max_batch: int = 8,
    exporter: str = "auto",
    atol: float = 1e-3,
    rtol: float = 1e-3,
    external_data_threshold: int = TWO_GB,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    references: dict | None = None,
) -> dict:
    """Export, validate and hash ``components`` of a pipeline (or model spec) into ``out_dir``.

    ``references``: when given, filled with ``{component: (interface, PyTorch's outputs at the
    validation points)}``, so a converter of this export (``export.openvino``) validates its own
    graphs against PyTorch on the same inputs without loading the model again.

    Returns the manifest (also written to ``out_dir/manifest.json``). Raises :class:`SdwbError`
    on bad arguments, a failed export, or a component beyond tolerance; then ``out_dir`` is
    untouched (an existing one is replaced only with ``overwrite`` and only on success).
    ``external_data_threshold``: weights of a component above this many bytes go to
    ``model.onnx.data`` (always when the graph would pass protobuf's 2 GB).
    """
    say = progress or (lambda _msg: None)
    components = list(dict.fromkeys(components))
    if not components:
        raise SdwbError("components: expected at least one of text_encoder, unet, vae_decoder, vae_encoder")
    if not 17 <= opset <= 21:
        raise SdwbError(f"opset {opset}: expected 17 to 21")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise SdwbError(f"exporter {exporter!r}: expected auto, torchscript or dynamo")
    if max_batch < 1:
        raise SdwbError(f"max_batch {max_batch}: expected >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SdwbError(f"{out_dir}: already exists (refusing to overwrite a finished export)")
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise SdwbError(f"components {bad}: expected some of {', '.join(COMPONENTS)}")
    say("loading model")
    pipe, source, sdwb_json = _source(spec_or_pipe)
    if "vae_encoder" in components and type(pipe.vae).__name__ == "AutoencoderTiny":
        raise SdwbError("components: vae_encoder: the VAE is an AutoencoderTiny (a distilled decoder, "
                        "`sdwb compress decoder`) whose encoder is not trained; export without vae_encoder")
    networks = [getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    dtypes = {str(m.dtype).removeprefix("torch.") for m in networks if m is not None}
    if dtypes != {"float32"}:
        raise SdwbError(f"export needs an fp32 pipeline (got {', '.join(sorted(dtypes))}); "
                        "half-precision engines come from `sdwb export tensorrt --fp16`")
    facts = pipeline_facts(pipe)
    if facts["family"] != "sdxl" and "text_encoder_2" in components:
        raise SdwbError("components: text_encoder_2 is SDXL's second text encoder; this pipeline has one")
    if facts["family"] == "sdxl" and "text_encoder" in components and "text_encoder_2" not in components:
        components.insert(components.index("text_encoder") + 1, "text_encoder_2")  # SDXL encodes with both
    if facts["time_cond_proj_dim"] is not None:
        raise SdwbError("UNet has time_cond_proj_dim (LCM-style guidance embedding): not supported by export")
    interfaces = build_interfaces(pipe, components, max_batch=max_batch, atol=atol, rtol=rtol)
    # Smallest first, and each torch module dropped once validated: a pipeline loaded here from a
    # spec holds only the UNet's weights while the UNet (sd15-arch: 3.4 GB) is validated.
    modules = {name: wrapper(name, pipe) for name in components}
    order = sorted(components, key=lambda n: _param_bytes(modules[n]))
    tokenizers = {"tokenizer": pipe.tokenizer}
    if getattr(pipe, "tokenizer_2", None) is not None:
        tokenizers["tokenizer_2"] = pipe.tokenizer_2
    scheduler = pipe.scheduler
    del pipe
    entries = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name in order:
            iface, module = interfaces[name], modules.pop(name)
            say(f"exporting {name}")
            started = time.perf_counter()
            raw_dir = tmp / name / "raw"
            raw_dir.mkdir(parents=True)
            used = _torch_export(module, iface, raw_dir / MODEL_FILE, opset, exporter)
            gc.collect()  # the exporter's traced program
            _consolidate(raw_dir / MODEL_FILE, tmp / name / MODEL_FILE,
                         external=_param_bytes(module) > external_data_threshold)
            shutil.rmtree(raw_dir)
            if slim:
                say(f"optimising {name} (ONNX Runtime, basic level)")
                _slim(tmp / name / MODEL_FILE)
            export_s = time.perf_counter() - started
            say(f"validating {name}")
            reference = reference_outputs(module, iface)
            if references is not None:
                references[name] = (iface, reference)
            del module  # torch's copy of the weights goes before ONNX Runtime loads its own
            gc.collect()
            validation = validate_component(tmp / name / MODEL_FILE, reference, iface)
            entries[name] = {
                "file": f"{name}/{MODEL_FILE}",
                "external_data": f"{name}/{DATA_FILE}" if (tmp / name / DATA_FILE).exists() else None,
                "exporter": used,
                "export_seconds": round(export_s, 3),
                "validation_seconds": round(time.perf_counter() - started - export_s, 3),
                **iface.to_dict(),
                "validation": validation,
            }
        entries = {name: entries[name] for name in components}
        for folder, tokenizer in tokenizers.items():
            tokenizer.save_pretrained(tmp / folder)
        _save_scheduler(scheduler, tmp / "scheduler")
        if sdwb_json is not None:
            shutil.copyfile(sdwb_json, tmp / "sdwb.json")
        say("hashing files")
        manifest = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "opset": opset,
            "slim": bool(slim),
            "dtype": "float32",
            "max_batch": max_batch,
            "source": source,
            "pipeline": {**facts, **{folder: folder for folder in tokenizers}, "scheduler": "scheduler",
                         "scheduler_class": type(scheduler).__name__},
            "libraries": library_versions(),
            "components": entries,
            "files": hash_files(tmp, skip=(MANIFEST,)),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
