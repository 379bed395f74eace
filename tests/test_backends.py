"""ONNX Runtime (and TensorRT) as first-class backends of ``sdwb generate`` and ``sdwb bench``.

CPU only, on the 0.3 M-param tiny pipeline (``sdwb.testing``): images through the CLI match the
torch backend's, a bench with a torch and an onnxruntime row runs end to end (the export is made
once into ``OUT/exports/<variant>/`` and reused), and wrong backend/model combinations are one
``error:`` line. TensorRT is checked for its one-line reason only (its GPU test is in
``test_export.py``). Speed ratios are never asserted here: the committed benchmark measures them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from sdwb.errors import SdwbError

PROMPTS = ["a small red circle at the top on a gray background",
           "a large blue square on the left on a white background"]


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_dir):
    """The session's export of the tiny pipeline directory (read-only)."""
    return tiny_onnx_dir


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from sdwb.testing import build_tiny_judge

    path = tmp_path_factory.mktemp("tiny-judge")
    model, processor = build_tiny_judge(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _trt_usable() -> bool:
    import torch

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def sdwb(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``sdwb ARGS`` in this process: (exit code, stdout, stderr)."""
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


# --------------------------------------------------------------------------- sdwb generate


def test_generate_onnxruntime_matches_torch_through_the_cli(tiny_pipeline_dir, onnx_dir, tmp_path, capsys):
    common = ["-p", PROMPTS[0], "-p", PROMPTS[1], "--steps", "3", "--seed", "4", "--device", "cpu",
              "--no-progress"]
    code, _, err = sdwb(capsys, "generate", "--model", tiny_pipeline_dir, "-o", tmp_path / "torch.png",
                        *common)
    assert code == 0, err
    code, out, err = sdwb(capsys, "generate", "--backend", "onnxruntime", "--model", onnx_dir,
                          "-o", tmp_path / "ort.png", *common)
    assert code == 0, err
    assert "ort.png" in out
    from PIL import Image

    for k in range(2):
        ref = Image.open(tmp_path / f"torch-{k:03d}.png")
        got = Image.open(tmp_path / f"ort-{k:03d}.png")
        assert got.size == ref.size == (32, 32)
        assert _psnr(ref, got) >= 40.0
    meta = json.loads((tmp_path / "ort.json").read_text())
    assert meta["backend"] == "onnxruntime" and meta["model"] == str(onnx_dir)
    assert [i["seed"] for i in meta["images"]] == [4, 5]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--backend", "onnxruntime", "--model", "{tiny}"],
         ["not an ONNX export directory", "sdwb export onnx"]),
        (["--backend", "onnxruntime"],
         ["builtin:tiny-shapes", "sdwb export onnx --model builtin:tiny-shapes"]),
        (["--backend", "onnxruntime", "--model", "{onnx}", "--dtype", "bf16"], ["--dtype bf16", "fp32"]),
        (["--backend", "nonesuch", "--model", "{onnx}"], ["--backend nonesuch", "onnxruntime", "openvino"]),
        (["--backend", "openvino", "--model", "{tiny}"], ["not an OpenVINO IR or ONNX export directory"]),
        (["--backend", "tensorrt", "--model", "{onnx}"], ["TensorRT"]),
    ],
)
def test_generate_bad_backend_model_combinations_are_one_line(args, needles, tiny_pipeline_dir, onnx_dir,
                                                              tmp_path, capsys):
    args = [a.format(tiny=tiny_pipeline_dir, onnx=onnx_dir) for a in args]
    if "tensorrt" in args:
        needles = ["sdwb export tensorrt"] if _trt_usable() else ["TensorRT needs an NVIDIA GPU"]
    code, _, err = sdwb(capsys, "generate", "-p", PROMPTS[0], "-o", tmp_path / "x.png", "--steps", "1",
                        "--device", "cpu", "--no-progress", *args)
    assert code != 0
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line
    for needle in needles:
        assert needle in line
    assert not (tmp_path / "x.png").exists()


def test_generate_with_backend_refuses_a_torch_directory(tiny_pipeline_dir):
    from sdwb.app.export_cli import generate_with_backend

    with pytest.raises(SdwbError, match="run `sdwb export onnx --model") as info:
        generate_with_backend("onnxruntime", tiny_pipeline_dir, PROMPTS[:1], steps=1, progress=False)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- sdwb bench


def test_sdwb_bench_torch_and_onnxruntime_rows(tiny_pipeline_dir, judge_dir, tmp_path, capsys):
    """One config, a torch fp32 baseline and an onnxruntime row of the same model spec."""
    config = tmp_path / "ort.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"steps": 2, "n_prompts": 2, "warmup": 1, "repeats": 2, "threads": 1,
                     "judge": str(judge_dir), "metrics": ["latency", "quality"]},
        "variants": [
            {"name": "fp32", "model": str(tiny_pipeline_dir)},
            {"name": "ort", "model": str(tiny_pipeline_dir), "backend": "onnxruntime",
             "metrics": ["latency", "memory", "quality"]},
        ],
    }))
    out = tmp_path / "out"
    code, stdout, err = sdwb(capsys, "bench", config, "-o", out, "--no-progress")
    assert code == 0, err
    assert "ort" in stdout
    df = pd.read_csv(out / "results.csv").set_index("variant")
    assert list(df.index) == ["fp32", "ort"] and list(df["backend"]) == ["torch", "onnxruntime"]
    assert (df["unet_ms_per_call"] > 0).all() and (df["unet_calls"] == 2).all()
    assert (df["unet_batch"] == 2).all() and (df["threads"] == 1).all()
    assert (df["text_encoder_ms"] > 0).all() and (df["vae_decode_ms"] > 0).all()
    # diffusers encodes uncond and cond prompts in two calls; the exported loop batches them
    assert df.loc["fp32", "text_encoder_calls"] == 2 and df.loc["ort", "text_encoder_calls"] == 1
    ort = df.loc["ort"]
    assert ort["psnr_vs_baseline"] >= 40.0 and ort["ssim_vs_baseline"] > 0.98
    assert ort["providers"] == "CPUExecutionProvider" and ort["export_dir"] == "exports/ort"
    assert not ort["export_reused"] and ort["export_s"] > 0 and ort["export_peak_rss_mb"] > 100
    assert ort["peak_rss_mb"] > 0 and ort["unet_gmacs"] > 0 and pd.isna(ort["cuda_peak_mb"])
    assert ort["size_mb"] > 0 and 0 < ort["unet_params_m"] < ort["params_m"]
    assert df.loc["fp32", "unet_params_m"] == pytest.approx(ort["unet_params_m"], rel=0.02)
    from sdwb.variants.manifest import verify_manifest

    manifest = verify_manifest(out / "exports" / "ort")
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    data = json.loads((out / "results.json").read_text())
    assert data["images"]["ort"] == ["images/ort/000.png", "images/ort/001.png"]


@pytest.mark.slow
def test_bench_exports_once_and_reuses_the_export(tiny_pipeline_dir, tmp_path):
    from sdwb.backends.registry import cached_export_reason, ensure_export

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    target = tmp_path / "exports" / "ort"
    made = ensure_export(str(model), target)  # in a fresh process, as `sdwb export onnx`
    assert made["dir"] == target and made["reused"] is False
    assert made["export_s"] > 0 and made["export_peak_rss_mb"] > 100
    stamp = (target / "manifest.json").stat().st_mtime_ns
    assert ensure_export(str(model), target) == {"dir": target, "reused": True}
    assert (target / "manifest.json").stat().st_mtime_ns == stamp
    assert "batch <= 8" in cached_export_reason(target, str(model), max_batch=9)
    (target / "unet" / "model.onnx").write_bytes(b"tampered")  # a modified export is never reused
    assert "unet/model.onnx" in cached_export_reason(target, str(model), max_batch=8)
    assert ensure_export(str(model), target)["reused"] is False
    assert cached_export_reason(target, str(model), max_batch=8) is None
    (model / "README.md").write_text("retrained\n")  # the source's content changes: re-exported
    assert "changed" in cached_export_reason(target, str(model), max_batch=8)
    with pytest.raises(SdwbError, match="model directory not found") as info:  # the child's error line
        ensure_export(str(tmp_path / "missing"), tmp_path / "exports" / "none")
    assert "\n" not in str(info.value) and not (tmp_path / "exports" / "none").exists()


def _fake_engines(path):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": "sdwb-tensorrt-engines"}))
    return path


@pytest.mark.parametrize(
    ("variant", "needles"),
    [
        ({"backend": "onnxruntime", "dtype": "bf16"}, ["variant v", "dtype bf16 with backend onnxruntime"]),
        ({"backend": "onnxruntime", "model": "{engines}"}, ["variant v", "TensorRT engine directory"]),
        ({"backend": "onnxruntime", "model": "{missing}"}, ["variant v", "model directory not found"]),
        ({"backend": "tensorrt"}, ["variant v", "TensorRT"]),
    ],
)
def test_bench_bad_backend_model_combinations_fail_before_writing(variant, needles, tiny_pipeline_dir,
                                                                   tmp_path):
    from bench.harness import run_bench
    from bench.scenario import bench_config_from_dict

    spec = {"name": "v", "model": str(tiny_pipeline_dir), **variant}
    spec["model"] = spec["model"].format(engines=_fake_engines(tmp_path / "engines"),
                                         missing=tmp_path / "missing")
    if variant["backend"] == "tensorrt":
        if _trt_usable():
            pytest.skip("TensorRT and a GPU are present: a torch directory is then refused by its layout")
        needles = [*needles, "TensorRT needs an NVIDIA GPU and the tensorrt package"]
    config = bench_config_from_dict({"defaults": {"steps": 1, "metrics": ["latency"]}, "variants": [spec]})
    with pytest.raises(SdwbError) as info:
        run_bench(config, tmp_path / "out", progress=False)
    text = str(info.value)
    assert "\n" not in text and all(n in text for n in needles), text
    assert not (tmp_path / "out").exists()


def test_onnx_params_and_size_count_the_graphs(tiny_pipeline_dir, onnx_dir):
    from bench.memory import param_counts
    from sdwb.backends.registry import exported_size_mb, onnx_param_counts
    from sdwb.loading import load_pipeline
    from sdwb.variants.manifest import read_manifest

    manifest = read_manifest(onnx_dir)
    counts = onnx_param_counts(onnx_dir, manifest)
    torch_counts = param_counts(load_pipeline(str(tiny_pipeline_dir)))
    assert counts["unet_params_m"] == pytest.approx(torch_counts["unet_params_m"], rel=0.02)
    assert 0 < counts["params_m"] < torch_counts["params_m"]  # no VAE encoder in the export
    size = exported_size_mb(onnx_dir, manifest)
    weights = counts["params_m"] * 4e6 / 2**20  # fp32; the graphs' nodes add the rest
    assert weights <= size < 2 * weights
