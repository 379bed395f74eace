"""OpenVINO as a backend, an export format and a quantizer (NNCF), on the tiny pipeline.

Images on OpenVINO (from its IR export, and from the ONNX export read directly) match torch's;
the IR export is validated against PyTorch and a tampered ``.bin`` is refused; an NNCF int8
variant is written, guarded, reloads and generates; a bench row with ``backend: openvino`` runs
from a torch spec; bad combinations are one line. Every test skips with a one-line reason when
the optional ``openvino`` package is absent. Speed is never asserted: reports/engines-cpu is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from sdwb.errors import SdwbError

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'sd-workbench[openvino]')")

PROMPTS = ["a small red circle at the top on a gray background",
           "a large blue square on the left on a white background"]


@pytest.fixture(autouse=True)
def _ov_cache_in_tmp(monkeypatch, tmp_path_factory):
    """OpenVINO's compiled-model cache in tmp (conftest's ``cli_env`` undoes what ``cli.main`` sets)."""
    monkeypatch.setenv("SDWB_OPENVINO_CACHE", str(tmp_path_factory.getbasetemp() / "ov-cache"))


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_dir):
    """The session's export of the tiny pipeline directory (read-only)."""
    return tiny_onnx_dir


@pytest.fixture(scope="module")
def ir_dir(tiny_pipeline_dir, tmp_path_factory):
    """``sdwb export openvino --model`` of the tiny pipeline (validated against PyTorch)."""
    from export.openvino import export_openvino

    out = tmp_path_factory.mktemp("ov") / "tiny-ir"
    export_openvino(str(tiny_pipeline_dir), out)
    return out


def _psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def sdwb(capsys, *args) -> tuple[int, str, str]:
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _torch_images(model_dir, **kw):
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    return generate(load_pipeline(str(model_dir)), PROMPTS, progress=False, **kw)


def test_ir_export_is_validated_against_pytorch_and_hashed(ir_dir):
    from sdwb.variants.manifest import OPENVINO_FORMAT, verify_manifest

    manifest = verify_manifest(ir_dir, OPENVINO_FORMAT)
    assert list(manifest["components"]) == ["text_encoder", "unet", "vae_decoder"]
    for name, entry in manifest["components"].items():
        assert entry["file"] == f"{name}/model.xml" and (ir_dir / name / "model.bin").is_file()
        points = {tuple(sorted(v["point"].items())) for v in entry["validation"]}
        assert len(points) == 2, name  # the opt point and a second one
        assert all(v["against"] == "pytorch" and v["ok"] for v in entry["validation"])
    assert not (ir_dir / ".onnx").exists()  # the intermediate ONNX export is not left behind


@pytest.mark.parametrize("source", ["ir", "onnx"])
def test_openvino_images_match_torch(source, ir_dir, onnx_dir, tiny_pipeline_dir):
    """Same seeds, same loop: OpenVINO (f32) makes torch's images, from IR and from ONNX."""
    from sdwb.backends.registry import open_exported
    from sdwb.generate import generate

    pipe = open_exported("openvino", ir_dir if source == "ir" else onnx_dir, threads=1)
    assert pipe.info["precision"] == "f32" and pipe.info["inference_num_threads"] == 1
    for scheduler in ("ddim", "euler"):
        ref = _torch_images(tiny_pipeline_dir, steps=3, seed=5, scheduler=scheduler)
        got = generate(pipe, PROMPTS, steps=3, seed=5, scheduler=scheduler, progress=False)
        assert all(_psnr(a, b) >= 40.0 for a, b in zip(ref, got)), scheduler
    assert pipe.compile_seconds() > 0  # compiled on first use, per shape


def test_compiled_models_are_cached_on_disk(ir_dir, tmp_path):
    from sdwb.backends.openvino import OvStableDiffusionPipeline
    from sdwb.generate import generate

    cache = tmp_path / "cache"
    first = OvStableDiffusionPipeline.from_export(ir_dir, threads=1, cache_dir=cache)
    generate(first, PROMPTS[:1], steps=1, progress=False)
    blobs = sorted(p.name for p in cache.rglob("*.blob"))
    assert blobs, "no compiled blob was cached"
    second = OvStableDiffusionPipeline.from_export(ir_dir, threads=1, cache_dir=cache)
    generate(second, PROMPTS[:1], steps=1, progress=False)
    assert sorted(p.name for p in cache.rglob("*.blob")) == blobs  # reused, nothing recompiled anew


def test_bf16_precision_is_asked_for_and_recorded(ir_dir):
    from sdwb.backends.registry import open_exported
    from sdwb.generate import generate

    pipe = open_exported("openvino", ir_dir, threads=1, dtype="bf16")
    assert pipe.info["precision"] == "bf16"
    images = generate(pipe, PROMPTS[:1], steps=2, progress=False)
    assert np.isfinite(np.asarray(images[0], dtype=np.float64)).all()
    with pytest.raises(SdwbError, match="dtype fp16 with backend openvino"):
        open_exported("openvino", ir_dir, dtype="fp16")


def test_tampered_ir_weights_are_refused(ir_dir, tmp_path):
    import shutil

    from sdwb.backends.registry import open_exported

    copy = tmp_path / "tampered"
    shutil.copytree(ir_dir, copy)
    data = bytearray((copy / "unet" / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "unet" / "model.bin").write_bytes(bytes(data))
    with pytest.raises(SdwbError, match="model.bin"):
        open_exported("openvino", copy)


def test_generate_cli_with_backend_openvino_and_bad_combinations(ir_dir, tiny_pipeline_dir, tmp_path, capsys):
    code, out, err = sdwb(capsys, "generate", "--model", ir_dir, "--backend", "openvino", "-p", PROMPTS[0],
                          "--steps", "2", "-o", tmp_path / "a.png")
    assert code == 0, err
    assert (tmp_path / "a.png").is_file()
    code, out, err = sdwb(capsys, "generate", "--model", ir_dir, "-p", PROMPTS[0], "--steps", "2",
                          "-o", tmp_path / "auto.png")  # backend auto: the manifest says openvino
    assert code == 0, err
    code, _, err = sdwb(capsys, "generate", "--model", tiny_pipeline_dir, "--backend", "openvino",
                        "-p", PROMPTS[0], "-o", tmp_path / "b.png")
    assert code == 2 and "not an OpenVINO IR or ONNX export directory" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = sdwb(capsys, "generate", "--model", ir_dir, "--backend", "onnxruntime",
                        "-p", PROMPTS[0], "-o", tmp_path / "c.png")
    assert code == 2 and "an OpenVINO IR export" in err and "Traceback" not in err


@pytest.mark.slow
def test_nncf_int8_variants_are_guarded_reload_and_generate(ir_dir, tmp_path):
    """ov-int8-weights (no calibration) and ov-int8-static (calibrated on trajectories)."""
    from compress.quantize import quantize
    from sdwb.backends.registry import open_exported
    from sdwb.generate import generate
    from sdwb.quant.config import parse_quant_config
    from sdwb.variants.manifest import OPENVINO_FORMAT, verify_manifest

    small = {"prompts": 2, "steps": 4, "timesteps": 2}
    for method, extra in (("ov-int8-weights", {}), ("ov-int8-static", {"calibration": small})):
        config = parse_quant_config({"method": method, "guard": {"prompts": 1, "steps": 3}, **extra})
        out = tmp_path / method
        variant = quantize(str(ir_dir), config, out)
        manifest = verify_manifest(out, OPENVINO_FORMAT)
        unet = manifest["components"]["unet"]["quantization"]
        assert unet["method"] == method and unet["int8_weights"] > 0 and unet["shrink"] > 1.2
        assert variant.metrics["guard"]["finite"] and variant.metrics["guard"]["psnr"] >= 20.0
        images = generate(open_exported("openvino", out, threads=1), PROMPTS[:1], steps=3, progress=False)
        assert np.isfinite(np.asarray(images[0], dtype=np.float64)).all()
    assert manifest["quantization"]["config"]["calibration"]["prompts"] == 2


@pytest.mark.slow
def test_bench_openvino_row_from_a_torch_spec(tiny_pipeline_dir, tmp_path, capsys):
    config = tmp_path / "ov.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"steps": 2, "n_prompts": 1, "warmup": 1, "repeats": 2, "threads": 1,
                     "metrics": ["latency"]},
        "variants": [
            {"name": "fp32", "model": str(tiny_pipeline_dir)},
            {"name": "ov", "model": str(tiny_pipeline_dir), "backend": "openvino"},
        ],
    }))
    out = tmp_path / "out"
    code, _, err = sdwb(capsys, "bench", config, "-o", out, "--no-progress")
    assert code == 0, err
    df = pd.read_csv(out / "results.csv").set_index("variant")
    ov = df.loc["ov"]
    assert ov["backend"] == "openvino" and ov["providers"].startswith("openvino-")
    assert ov["unet_ms_per_call"] > 0 and ov["compile_s"] > 0 and ov["export_dir"] == "exports/ov"
    assert df.loc["fp32", "unet_params_m"] == pytest.approx(ov["unet_params_m"], rel=0.02)
    # its weights_sha256 names the export it ran; source_weights_sha256 the torch model exported
    assert ov["source_weights_sha256"] == df.loc["fp32", "weights_sha256"] != ov["weights_sha256"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variants": [{"name": "ov", "model": str(tiny_pipeline_dir),
                                                 "backend": "openvino", "dtype": "fp16"}]}))
    code, _, err = sdwb(capsys, "bench", bad, "-o", tmp_path / "bad", "--no-progress")
    assert code == 2 and "dtype fp16 with backend openvino" in err


def test_bench_edit_metric_on_an_openvino_ir(ir_dir, tiny_pipeline_dir, tmp_path, capsys):
    """An IR converted from an export with the VAE encoder edits in a bench row; one without it is
    refused in one line before any work."""
    from export.onnx import export_onnx
    from export.openvino import export_openvino

    onnx = tmp_path / "onnx"
    export_onnx(str(tiny_pipeline_dir), onnx,
                components=["text_encoder", "unet", "vae_decoder", "vae_encoder"])
    export_openvino(str(onnx), tmp_path / "ir")
    config = tmp_path / "edit.yaml"
    defaults = {"steps": 3, "n_edits": 2, "edit_strength": 0.7, "threads": 1, "metrics": ["edit"]}
    config.write_text(yaml.safe_dump({"defaults": defaults, "variants": [
        {"name": "ov", "model": str(tmp_path / "ir"), "backend": "openvino"}]}))
    code, _, err = sdwb(capsys, "bench", config, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    row = pd.read_csv(tmp_path / "out" / "results.csv").set_index("variant").loc["ov"]
    assert row["n_edits"] == 2 and 0 <= row["edit_success"] <= 1 and row["s_per_edit"] > 0
    config.write_text(yaml.safe_dump({"defaults": defaults, "variants": [
        {"name": "ov", "model": str(ir_dir), "backend": "openvino"}]}))
    code, _, err = sdwb(capsys, "bench", config, "-o", tmp_path / "out2", "--no-progress")
    assert code == 2 and "needs the VAE encoder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sdxl_exports_to_openvino_and_matches_torch(tmp_path):
    """SDXL: both text encoders (hidden states + pooled), the UNet's added conditions, on OpenVINO."""
    from export.openvino import export_openvino
    from sdwb.backends.registry import open_exported
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline
    from sdwb.sdxl import build_sdxl_pipeline

    src = tmp_path / "tiny-sdxl"
    build_sdxl_pipeline(seed=0, tiny=True).save_pretrained(src, safe_serialization=True)
    manifest = export_openvino(str(src), tmp_path / "ir")
    assert list(manifest["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert manifest["pipeline"]["family"] == "sdxl"
    ref = generate(load_pipeline(str(src)), PROMPTS, steps=3, seed=2, progress=False)
    got = generate(open_exported("openvino", tmp_path / "ir", threads=1), PROMPTS, steps=3, seed=2,
                   progress=False)
    assert all(_psnr(a, b) >= 40.0 for a, b in zip(ref, got))
