"""Export stage: ONNX export + validation, manifests, the ONNX Runtime pipeline, TensorRT plumbing.

Everything runs on the 0.3 M-param tiny pipeline (``sdwb.testing``) on the CPU; the TensorRT
build itself is a ``gpu`` test that skips without a GPU and the tensorrt package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.interfaces import build_interfaces, wrapper
from export.onnx import export_onnx
from sdwb.errors import SdwbError
from sdwb.testing import build_tiny_pipeline
from sdwb.variants.manifest import verify_manifest

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PROMPTS = ["a small red circle at the top on a gray background", "a large blue square on a white background"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    """(export dir, manifest) of the tiny pipeline's three components."""
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    manifest = export_onnx(pipe, out)
    return out, manifest


def _psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- export + manifest


def test_manifest_lists_components_with_hashes_and_validation(exported):
    out, manifest = exported
    assert (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert set(manifest["components"]) == set(COMPONENTS)
    assert manifest["opset"] == 18 and manifest["libraries"]["onnxruntime"]
    for entry in manifest["components"].values():
        meta = manifest["files"][entry["file"]]
        assert len(meta["sha256"]) == 64 and meta["size"] == (out / entry["file"]).stat().st_size > 0
        assert entry["inputs"] and entry["outputs"] and entry["dynamic_axes"] and entry["profile"]
        # validated at two points of the dynamic range, errors recorded and within tolerance
        assert len(entry["validation"]) == 2
        assert entry["validation"][0]["point"] != entry["validation"][1]["point"]
        for result in entry["validation"]:
            assert result["ok"] and 0 <= result["max_abs"] <= entry["tolerance"]["atol"]
    assert {"tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"} <= set(manifest["files"])
    assert verify_manifest(out)["components"].keys() == manifest["components"].keys()


def test_onnx_matches_torch_dynamic_batch_and_resolution(pipe, exported):
    out, manifest = exported
    interfaces = build_interfaces(pipe)
    for name in COMPONENTS:
        iface, module = interfaces[name], wrapper(name, pipe)
        session = _session(out / manifest["components"][name]["file"])
        points = [iface.point("min"), iface.point("opt"), iface.point("second")]
        if name == "unet":  # batch 1 and 2 at the model's size, and a second (non-square) resolution
            points += [{**iface.point("opt"), "batch": 1}, {**iface.point("opt"), "height": 8, "width": 24}]
        for point in points:
            rng = np.random.default_rng(7)
            feeds = {}
            for spec in iface.inputs:
                shape = spec.resolve(point)
                feeds[spec.name] = (rng.integers(0, 100, shape) if spec.dtype == "int32"
                                    else rng.standard_normal(shape)).astype(spec.dtype)
            if "timestep" in feeds:
                feeds["timestep"][:] = 321.0
            with torch.inference_mode():
                ref = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
            got = session.run(None, feeds)[0]
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= iface.atol, (name, point)


def test_ort_pipeline_images_match_torch(pipe, exported):
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.generate import generate

    ort_pipe = OrtStableDiffusionPipeline.from_export(exported[0], threads=1)
    assert ort_pipe.info["providers"] == ["CPUExecutionProvider"]
    for scheduler in ("ddim", "euler"):
        ref = generate(pipe, PROMPTS, steps=4, seed=5, scheduler=scheduler, batch=2, progress=False)
        with ort_pipe.record_timings() as log:
            got = generate(ort_pipe, PROMPTS, steps=4, seed=5, scheduler=scheduler, batch=2,
                               progress=False)
        assert [im.size for im in got] == [im.size for im in ref] == [(32, 32)] * 2
        for a, b in zip(ref, got):
            assert _psnr(a, b) >= 40.0, scheduler
        assert {k: len(v) for k, v in log.items()} == {"text_encoder": 1, "unet": 4, "vae_decoder": 1}
        assert all(s > 0 for v in log.values() for s in v)
        assert ort_pipe.last_batch == {"text_encoder": 4, "unet": 4, "vae_decoder": 2}  # CFG doubles
    # image i depends on seed + i only, not on the batch it was generated in
    single = generate(ort_pipe, PROMPTS[1:], steps=4, seed=6, scheduler="ddim", batch=1, progress=False)
    pair = generate(ort_pipe, PROMPTS, steps=4, seed=5, scheduler="ddim", batch=2, progress=False)
    assert _psnr(single[0], pair[1]) >= 40.0


def test_tampered_or_truncated_model_is_refused(exported, tmp_path):
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

    src, _ = exported
    modified, truncated = tmp_path / "modified", tmp_path / "truncated"
    shutil.copytree(src, modified)
    shutil.copytree(src, truncated)
    data = bytearray((modified / "unet/model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (modified / "unet/model.onnx").write_bytes(bytes(data))
    with open(truncated / "unet/model.onnx", "r+b") as f:
        f.truncate(len(data) - 100)
    with pytest.raises(SdwbError) as err:
        verify_manifest(modified)
    assert "unet/model.onnx" in _one_line(err) and "modified" in str(err.value)
    with pytest.raises(SdwbError) as err:
        OrtStableDiffusionPipeline.from_export(truncated)
    assert "unet/model.onnx" in _one_line(err) and "truncated" in str(err.value)
    with pytest.raises(SdwbError) as err:
        verify_manifest(tmp_path)
    assert "manifest.json" in _one_line(err)


def test_killed_export_leaves_nothing_complete(pipe, tmp_path, monkeypatch):
    import export.onnx as onnx_mod

    real, calls = onnx_mod.validate_component, []

    def dies_after_first(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as if killed while the second component was in flight
        return real(*args, **kw)

    monkeypatch.setattr(onnx_mod, "validate_component", dies_after_first)
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(pipe, out, components=["text_encoder", "vae_decoder"])
    assert len(calls) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validation_beyond_tolerance_fails_the_export(pipe, tmp_path):
    out = tmp_path / "export"
    with pytest.raises(SdwbError) as err:
        export_onnx(pipe, out, components=["text_encoder"], atol=0.0, rtol=0.0)
    msg = _one_line(err)
    assert "text_encoder" in msg and "max abs error" in msg and "max rel error" in msg
    assert not out.exists()
    out.mkdir()
    with pytest.raises(SdwbError, match="already exists"):
        export_onnx(pipe, out, components=["text_encoder"])


def test_external_data_slim_and_vae_encoder(pipe, tmp_path):
    out = tmp_path / "export"
    manifest = export_onnx(pipe, out, components=["vae_decoder", "vae_encoder"], slim=True,
                           external_data_threshold=0)
    assert manifest["components"]["vae_encoder"]["inputs"][0]["shape"] == ["batch", 3, "height*2", "width*2"]
    entry = manifest["components"]["vae_decoder"]
    assert entry["external_data"] == "vae_decoder/model.onnx.data"
    assert manifest["slim"] and "vae_decoder/model.onnx.data" in manifest["files"]
    sizes = {p.name: p.stat().st_size for p in (out / "vae_decoder").iterdir()}
    assert sizes["model.onnx.data"] > sizes["model.onnx"]
    assert all(r["ok"] for r in entry["validation"])
    assert sorted(p.name for p in (out / "vae_decoder").iterdir()) == ["model.onnx", "model.onnx.data"]


def test_profiles_hold_the_guidance_batch(pipe, exported):
    from export.tensorrt import trt_profiles
    from sdwb.backends.tensorrt import profile_covers

    interfaces = build_interfaces(pipe, max_batch=8)
    unet = interfaces["unet"]
    lo, opt, hi = unet.axes["batch"]
    assert opt == 2 and all(lo <= 2 * b <= hi for b in range(1, 9))
    assert interfaces["vae_decoder"].axes["batch"] == (1, 1, 8)
    for axis in ("height", "width"):
        assert unet.axes[axis] == (8, 16, 32) and all(v % 2 == 0 for v in unet.axes[axis])
    profile = unet.profile()["sample"]
    assert (profile["min"], profile["opt"], profile["max"]) == ([1, 4, 8, 8], [2, 4, 16, 16], [16, 4, 32, 32])
    profiles = trt_profiles(exported[1])
    assert profiles["unet"]["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (16, 4, 32, 32))
    assert profile_covers(profiles["unet"], {"sample": (2 * 8, 4, 16, 16)}) is None
    assert "outside" in profile_covers(profiles["unet"], {"sample": (17, 4, 16, 16)})
    image = exported[1]["components"]["vae_decoder"]["outputs"][0]["shape"]
    assert image == ["batch", 3, "height*2", "width*2"]


def test_dynamo_exporter(pipe, tmp_path):
    pytest.importorskip("onnxscript")
    manifest = export_onnx(pipe, tmp_path / "export", components=["text_encoder"], exporter="dynamo")
    entry = manifest["components"]["text_encoder"]
    assert entry["exporter"] == "dynamo" and all(r["ok"] for r in entry["validation"])
    assert entry["validation"][1]["point"]["batch"] == 3  # dynamic batch survived torch.export


# --------------------------------------------------------------------------- TensorRT without a GPU


def _trt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_tensorrt_names_and_missing_gpu(exported, tmp_path):
    from export.tensorrt import build_engines
    from sdwb.backends.tensorrt import engine_filename

    name = engine_filename("10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert name == "engine_10.13.0.35_NVIDIA-H100-80GB-HBM3.plan"
    with pytest.raises(SdwbError) as err:  # input checks come before the GPU check
        build_engines(exported[0], tmp_path / "int8", int8=True)
    assert "QuantizeLinear" in _one_line(err)
    if _trt_usable():
        pytest.skip("TensorRT and a GPU are present: covered by the gpu test")
    with pytest.raises(SdwbError) as err:
        build_engines(exported[0], tmp_path / "engines", fp16=True)
    assert _one_line(err).startswith("TensorRT needs an NVIDIA GPU and the tensorrt package: ")
    assert not (tmp_path / "engines").exists()


# --------------------------------------------------------------------------- CLI + backend switch


def test_cli_export_and_generate_with_backend(tiny_pipeline_dir, tmp_path):
    from typer.testing import CliRunner

    from sdwb.app.export_cli import export_app, generate_with_backend

    model = tmp_path / "variant"
    shutil.copytree(tiny_pipeline_dir, model)
    (model / "sdwb.json").write_text(json.dumps({"stage": "baseline", "parent": None}))
    out = tmp_path / "onnx"
    result = CliRunner().invoke(export_app, ["onnx", "--model", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = verify_manifest(out)
    assert manifest["source"]["variant"] == {"stage": "baseline", "parent": None}
    from sdwb.variants.manifest import source_fingerprint

    assert manifest["source"]["fingerprint"] == source_fingerprint(str(model))
    assert (out / "sdwb.json").is_file() and "sdwb.json" in manifest["files"]
    kw = dict(steps=3, seed=1, scheduler="ddim", batch=1, progress=False)
    ref = generate_with_backend("torch", model, PROMPTS[:1], **kw)
    got = generate_with_backend("onnxruntime", out, PROMPTS[:1], threads=1, **kw)
    assert _psnr(ref[0], got[0]) >= 40.0
    with pytest.raises(SdwbError, match="--backend"):
        generate_with_backend("nonesuch", out, PROMPTS[:1], **kw)
    with pytest.raises(SdwbError, match="not an ONNX export directory"):
        generate_with_backend("onnxruntime", model, PROMPTS[:1], **kw)
    args = ["onnx", "--model", str(model), "-o", str(tmp_path / "x"), "--components", "vae"]
    bad = CliRunner().invoke(export_app, args)
    assert isinstance(bad.exception, SdwbError) and "--components" in str(bad.exception)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_tensorrt_engines_generate_like_onnxruntime(exported, tmp_path):
    pytest.importorskip("tensorrt")
    from export.tensorrt import build_engines
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.backends.tensorrt import TrtRunner
    from sdwb.generate import generate

    manifest = build_engines(exported[0], tmp_path / "engines", strict_fp32=True,
                             timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    for entry in manifest["components"].values():
        assert Path(entry["file"]).name.startswith("engine_" + manifest["tensorrt"])
        assert (tmp_path / "engines" / entry["file"]).stat().st_size > 0
    runner = TrtRunner.from_engines(tmp_path / "engines")
    ort_pipe = OrtStableDiffusionPipeline.from_export(exported[0], providers=["cpu"])
    kw = dict(steps=4, seed=5, scheduler="ddim", batch=2, progress=False)
    with runner.record_timings() as log:
        got = generate(runner, PROMPTS, **kw)
    ref = generate(ort_pipe, PROMPTS, **kw)
    assert len(log["unet"]) == 4
    for a, b in zip(ref, got):
        assert _psnr(a, b) >= 30.0
