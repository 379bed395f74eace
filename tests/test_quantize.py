"""Quantization stage: typed configs, torch and ONNX Runtime variants, calibration, guard, CLI.

Everything runs on the ~0.3 M-param tiny pipeline (``sdwb.testing``) on the CPU, with short probe
generations; GPU-only methods must refuse cleanly on a CPU (and are skipped where a GPU exists).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.quantize import quantize
from export.onnx import export_onnx
from sdwb.errors import SdwbError
from sdwb.quant.config import METHODS, load_quant_config, parse_quant_config

FAST_GUARD = {"prompts": 2, "steps": 4}
CPU_TORCH = ["torch-bf16", "torch-int8-dynamic", "torch-int8-static", "torchao-int8-weight-only"]
FAST_CALIB = {"prompts": 2, "steps": 6, "timesteps": 3}
HAS_TORCHAO = __import__("importlib").util.find_spec("torchao") is not None


def cfg(method: str, **kw):
    data = {"method": method, "guard": {**FAST_GUARD, **kw.pop("guard", {})}, **kw}
    return parse_quant_config(data, "test")


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def images(pipe, prompts=("a small red circle at the top on a gray background",), steps=3):
    from sdwb.generate import generate

    return np.stack([np.asarray(im) for im in generate(pipe, list(prompts), steps=steps, progress=False)])


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    return str(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def calib_cfg():
    return {"prompts": 3, "steps": 8, "timesteps": 5}


@pytest.fixture(scope="module")
def ort_dynamic(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "dyn"
    config = cfg("ort-int8-dynamic", components=["unet", "text_encoder"])
    return quantize(tiny, config, out, exporter=export_onnx)


@pytest.fixture(scope="module")
def ort_static(tiny, tmp_path_factory, calib_cfg):
    out = tmp_path_factory.mktemp("ort") / "static"
    return quantize(tiny, cfg("ort-int8-static", calibration=calib_cfg), out, exporter=export_onnx)


# --------------------------------------------------------------------------- configs


def test_registry_has_every_method_and_one_line_errors():
    assert set(METHODS) == {"torch-bf16", "torch-fp16", "torch-int8-dynamic", "torch-int8-static",
                            "torchao-int8-weight-only",
                            "torchao-int4-weight-only", "ort-int8-dynamic", "ort-int8-static", "ort-fp16",
                            "ov-int8-weights", "ov-int8-static", "ov-int8-hybrid"}
    with pytest.raises(SdwbError) as e:
        parse_quant_config({"method": "int3-magic"}, "x.yaml")
    assert "x.yaml: method: unknown method 'int3-magic'" in one_line(e) and "torch-bf16" in str(e.value)
    with pytest.raises(SdwbError) as e:
        parse_quant_config({"method": "torch-bf16", "keep_fp33": []}, "x.yaml")
    assert "keep_fp33: unknown key (allowed:" in one_line(e) and "keep_fp32" in str(e.value)
    with pytest.raises(SdwbError) as e:
        parse_quant_config({"method": "ort-int8-static", "calibration": {"timestep": 3}}, "x.yaml")
    assert "calibration.timestep: unknown key" in one_line(e)
    with pytest.raises(SdwbError) as e:
        parse_quant_config({"method": "torch-bf16", "components": ["unet", "safety_checker"]}, "x.yaml")
    assert "components.1" in one_line(e)
    with pytest.raises(SdwbError) as e:
        load_quant_config(None, ["guard.min_psnr=loud"], method="torch-bf16")
    assert "guard.min_psnr" in one_line(e)


def test_committed_configs_validate():
    files = sorted(Path(__file__).resolve().parents[1].glob("configs/quantize/*.yaml"))
    assert files, "configs/quantize/*.yaml missing"
    for f in files:
        assert load_quant_config(f).method in METHODS


# --------------------------------------------------------------------------- torch methods


@pytest.mark.parametrize("method", CPU_TORCH)
def test_torch_method_yields_loadable_variant(method, tiny, tmp_path):
    from sdwb.loading import load_pipeline
    from sdwb.variants.record import verify_record

    if method.startswith("torchao") and not HAS_TORCHAO:
        with pytest.raises(SdwbError, match="torchao is not installed"):
            quantize(tiny, cfg(method), tmp_path / "v")
        assert not (tmp_path / "v").exists()
        return
    out = tmp_path / "v"
    extra = {"calibration": FAST_CALIB, "attention": "bf16-sliced"} if method == "torch-int8-static" else \
        {"components": ["unet", "text_encoder", "vae_decoder"]}
    variant = quantize(tiny, cfg(method, **extra), out)
    record = json.loads((out / "sdwb.json").read_text())
    assert record["stage"] == "quantize" and record["method"] == method and record["backend"] == "torch"
    assert record["parent"]["path"] == str(Path(tiny).resolve())
    assert record["config"]["method"] == method and record["libraries"]["torch"]
    assert record["metrics"]["guard"]["psnr"] >= record["config"]["guard"]["min_psnr"]
    assert any(rel.endswith(".safetensors") for rel in record["files"])
    verify_record(out, record)
    loaded = load_pipeline(str(out))  # re-applies the recorded method
    if method == "torch-bf16":
        assert loaded.unet.conv_in.weight.dtype == torch.bfloat16
        assert loaded.unet.conv_out.weight.dtype == torch.float32  # keep-rule
        assert loaded.unet.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32
        assert loaded.text_encoder.dtype == torch.float32  # embeddings kept: latents stay fp32
    elif method == "torch-int8-static":
        from sdwb.quant.w8a8 import RANGES_FILE, W8A8

        assert (out / RANGES_FILE).is_file() and RANGES_FILE in record["files"]
        assert isinstance(loaded.unet.down_blocks[0].resnets[0].conv1, W8A8)
        assert isinstance(loaded.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, W8A8)
        assert type(loaded.unet.conv_in) is torch.nn.Conv2d and type(loaded.unet.conv_out) is torch.nn.Conv2d
        assert len(record["calibration"]["timesteps_visited"]) == 3
    else:
        attn = loaded.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
        weight = getattr(attn.to_q, "weight", None)  # torch.ao: a new module; torchao: a tensor subclass
        plain = (torch.Tensor, torch.nn.Parameter)
        assert type(attn.to_q) is not torch.nn.Linear or type(weight) not in plain
        assert loaded.unet.conv_in.weight.dtype == torch.float32  # Linear-only: convs untouched
        assert 0 < variant.metrics["summary"]["linear_weight_share"]["unet"] < 1
    # save -> load -> same images as the in-memory quantized pipeline
    np.testing.assert_array_equal(images(variant.pipeline), images(loaded))
    with pytest.raises(SdwbError, match="sets its own precision"):
        load_pipeline(str(out), dtype=torch.bfloat16)


def test_bf16_keep_rules_are_configurable(tiny):
    from sdwb.loading import load_pipeline

    pipe = load_pipeline(tiny)
    variant = quantize(pipe, cfg("torch-bf16", keep_fp32=["*.resnets.*.conv1"], guard={"enabled": False}))
    unet = variant.pipeline.unet
    assert unet.conv_out.weight.dtype == torch.bfloat16
    assert unet.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float32
    assert unet.down_blocks[0].resnets[0].conv2.weight.dtype == torch.bfloat16
    assert pipe.unet.conv_out.weight.dtype == torch.float32  # the source pipeline is not modified
    out = variant.pipeline.unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 32, 32)).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sliced_bf16_attention_matches_sdpa():
    from sdwb.quant.attention import SlicedBf16AttnProcessor
    from sdwb.testing import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0).unet
    args = (torch.randn(2, 4, 16, 16), 500, torch.randn(2, 32, 32))
    with torch.inference_mode():
        ref = unet(*args).sample
        unet.set_attn_processor(SlicedBf16AttnProcessor(slice_size=24))  # 64 tokens: uneven slices
        out = unet(*args).sample
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def test_tampered_variant_is_refused(tiny, tmp_path):
    from sdwb.loading import load_pipeline

    out = tmp_path / "v"
    quantize(tiny, cfg("torch-int8-dynamic", guard={"enabled": False}), out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SdwbError, match="sha256 differs"):
        load_pipeline(str(out))
    with pytest.raises(SdwbError, match="already quantized"):
        quantize(str(out), cfg("torch-bf16"), tmp_path / "again")


@pytest.mark.parametrize("method", ["torch-fp16", "torchao-int4-weight-only", "ort-fp16"])
def test_gpu_only_methods_refuse_on_cpu(method, tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the method may run")
    with pytest.raises(SdwbError) as e:
        quantize(tiny, cfg(method), tmp_path / "v")
    assert "not supported on this device" in one_line(e) and method in str(e.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- guard


def _broken(kind: str):
    import sdwb.quant.torch_methods as qt

    original = qt.apply_torch_method

    def apply(pipe, config, device="cpu", state=None):
        summary = original(pipe, config, device, state)
        with torch.no_grad():
            if kind == "nan":
                pipe.unet.conv_out.bias[0] = float("nan")
            else:
                pipe.unet.conv_out.weight.mul_(1e6)
        return summary

    return apply


@pytest.mark.parametrize("kind", ["nan", "scaled"])
def test_guard_refuses_broken_model_and_writes_nothing(kind, tiny, tmp_path, monkeypatch):
    import sdwb.quant.torch_methods as qt

    monkeypatch.setattr(qt, "apply_torch_method", _broken(kind))
    with pytest.raises(SdwbError) as e:
        quantize(tiny, cfg("torch-bf16"), tmp_path / "v")
    text = one_line(e)
    assert text.startswith("guard:") and "nothing was written" in text
    assert ("NaN/inf" in text) if kind == "nan" else ("dB PSNR" in text)
    assert list(tmp_path.iterdir()) == []  # no variant, no half-built temporary directory


def test_guard_psnr_floor_is_configurable(tiny, tmp_path):
    with pytest.raises(SdwbError, match="floor guard.min_psnr = 99"):
        quantize(tiny, cfg("torch-bf16", guard={"min_psnr": 99.0}), tmp_path / "v")
    assert not (tmp_path / "v").exists()


# --------------------------------------------------------------------------- calibration


def test_calibration_visits_the_trajectory_reproducibly(tiny, calib_cfg):
    from compress.calibration import record_trajectories
    from sdwb import shapes
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import CalibrationConfig

    config = CalibrationConfig(**calib_cfg)
    pipe = load_pipeline(tiny)
    a, b = record_trajectories(pipe, config), record_trajectories(pipe, config)
    assert len(a.feeds["unet"]) == 3 * 5 and len(set(a.timesteps)) == 5
    assert max(a.timesteps) > 800 and min(a.timesteps) < 200  # the whole trajectory, not one end
    assert a.step_indices[0] == 0 and a.step_indices[-1] == 7
    feed = a.feeds["unet"][0]
    assert feed["sample"].shape[0] == 2 and feed["encoder_hidden_states"].shape[0] == 2  # both CFG halves
    assert set(float(f["timestep"][0]) for f in a.feeds["unet"]) == set(a.timesteps)
    for x, y in zip(a.feeds["unet"], b.feeds["unet"]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # the shapes train stream (seeds from TRAIN_SEED_BASE), never the held-out eval seeds
    assert a.prompts == [shapes.sample_from_seed(shapes.TRAIN_SEED_BASE + i).caption for i in range(3)]
    assert shapes.TRAIN_SEED_BASE + 3 <= shapes.EVAL_SEED_BASE
    assert len(a.feeds["vae_decoder"]) == 3 and len(a.feeds["text_encoder"]) == 4


# --------------------------------------------------------------------------- ONNX Runtime


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_error(float_path: Path, quant_path: Path, feeds: dict) -> float:
    a = _session(float_path).run(None, feeds)[0]
    b = _session(quant_path).run(None, feeds)[0]
    assert np.isfinite(b).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_ort_dynamic_variant_is_a_verified_export(ort_dynamic, tiny):
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.generate import generate
    from sdwb.variants.manifest import verify_manifest

    out = ort_dynamic.path
    manifest = verify_manifest(out)
    assert manifest["quantization"]["method"] == "ort-int8-dynamic"
    unet = manifest["components"]["unet"]["quantization"]
    assert unet["quant_ops"].get("ConvInteger", 0) > 0 and unet["quant_ops"].get("MatMulInteger", 0) > 0
    assert "quantization" not in manifest["components"]["vae_decoder"]  # not asked for: stays float
    record = json.loads((out / "sdwb.json").read_text())
    assert record["backend"] == "onnxruntime" and record["metrics"]["guard"]["psnr"] >= 20
    pipe = OrtStableDiffusionPipeline.from_export(out, threads=1)
    imgs = generate(pipe, ["a large blue square on a white background"], steps=3, progress=False)
    assert np.isfinite(np.asarray(imgs[0], dtype=float)).all() and imgs[0].size == (32, 32)


def test_ort_quantized_unet_runs_with_bounded_error(ort_dynamic, ort_static, tiny, tmp_path_factory):
    """Each quantized UNet graph, run by ONNX Runtime on real trajectory inputs (other prompts than
    the calibration's), stays within a bounded relative error of the float graph."""
    from compress.calibration import record_trajectories
    from export.onnx import export_onnx
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import CalibrationConfig

    config = CalibrationConfig(prompts=1, steps=6, timesteps=3, prompt_offset=500)
    feeds = record_trajectories(load_pipeline(tiny), config).feeds["unet"]
    float_dir = tmp_path_factory.mktemp("float") / "export"
    export_onnx(tiny, float_dir, components=["unet"])
    for variant, bound in ((ort_dynamic, 0.1), (ort_static, 0.35)):
        recorded = variant.metrics["components"]["unet"]["error_vs_float"]
        assert recorded["finite"] and recorded["samples"] >= 1
        quant = variant.path / "unet/model.onnx"
        errors = [_rel_error(float_dir / "unet/model.onnx", quant, f) for f in feeds]
        assert max(errors) < bound, (variant.method, errors)


def test_generate_picks_onnxruntime_for_an_ort_variant(ort_static, tmp_path, capsys):
    img = tmp_path / "img.png"
    args = ["generate", "--model", str(ort_static.path), "-p", "a red circle", "--steps", "2"]
    code, stdout, err = _cli(args + ["--no-progress", "-o", str(img)], capsys)
    assert code == 0, err
    assert json.loads(img.with_suffix(".json").read_text())["backend"] == "onnxruntime"


def test_ort_static_is_qdq_with_exclusions_and_records_timesteps(ort_static):
    import onnx

    manifest = json.loads((ort_static.path / "manifest.json").read_text())
    info = manifest["components"]["unet"]["quantization"]
    assert info["format"] == "QDQ" and info["quant_ops"]["QuantizeLinear"] > 0
    model = onnx.load(str(ort_static.path / "unet/model.onnx"))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    excluded = set(info["excluded_nodes"])
    assert {convs[0], convs[-1]} <= excluded  # first_conv / last_conv (conv_in, conv_out)
    attention = {n for n in excluded if n.split("/")[-1].startswith("MatMul") and "/attn" in n
                 and "/to_" not in n}
    assert attention  # attention scores / attention x V: activation x activation MatMuls
    assert any(n.op_type == "Softmax" for n in model.graph.node if n.name in excluded)
    for name in excluded:  # every excluded node still reads float tensors
        assert not set(nodes[name].input) & dequantized, name
    quantized_convs = [c for c in convs if set(nodes[c].input) & dequantized]
    assert len(quantized_convs) >= len(convs) - 2
    calib = json.loads((ort_static.path / "sdwb.json").read_text())["calibration"]
    assert len(calib["timesteps_visited"]) == 5 and calib["samples"]["unet"] == 15
    assert calib["prompt_source"].startswith("shapes train stream")


def test_ort_dynamic_shrinks_unet_on_disk_3x(tmp_path):
    """A UNet whose bytes are mostly weights (the tiny one's graph structure outweighs its weights)."""
    from diffusers import UNet2DConditionModel

    from sdwb.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        ).eval().requires_grad_(False)
    config = cfg("ort-int8-dynamic", guard={"enabled": False})
    variant = quantize(pipe, config, tmp_path / "v", exporter=export_onnx)
    entry = variant.metrics["components"]["unet"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "v" / "unet").iterdir())
    assert entry["float_size_mb"] * 2**20 / on_disk >= 3.0, entry


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from sdwb.app import cli
    from sdwb.app.compress_cli import compress_app

    if not any(g.name == "compress" for g in cli.app.registered_groups):
        cli.app.add_typer(compress_app, name="compress")
    try:
        cli.main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_quantize_then_generate(tiny, tmp_path, capsys):
    out = tmp_path / "variant"
    code, stdout, err = _cli(["compress", "quantize", "--model", tiny, "--method", "torch-int8-dynamic",
                              "--set", "guard.steps=3", "-o", str(out)], capsys)
    assert code == 0, err
    assert "wrote" in stdout and (out / "sdwb.json").is_file()
    code, stdout, err = _cli(["generate", "--model", str(out), "-p", "a red circle", "--steps", "2",
                              "--device", "cpu", "--no-progress", "-o", str(tmp_path / "img.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "img.png").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--method", "int3"], "unknown method 'int3'"),
    (["--method", "torch-bf16", "--set", "guard.bogus=1"], "guard.bogus: unknown key"),
    (["--method", "torch-bf16", "--components", "unet,clip"], "--components"),
    (["--method", "torch-bf16", "--calib-prompts", "4"], "torch-bf16 does not calibrate"),
])
def test_cli_bad_input_is_one_line(args, expected, tiny, tmp_path, capsys):
    code, _, err = _cli(["compress", "quantize", "--model", tiny, "-o", str(tmp_path / "v"), *args], capsys)
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "v").exists()


# --------------------------------------------------------------------------- attention fusion


def _quantized_matmuls(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & dequantized)


@pytest.mark.parametrize(
    "exporter, fuser",
    [("torchscript", "onnxruntime.transformers.optimizer"),
     pytest.param("dynamo", "onnxscript.optimize_for_ort", marks=pytest.mark.slow)],
)
def test_attention_fusion_keeps_outputs_and_projections(exporter, fuser, tiny, tmp_path):
    """Fused graph: MultiHeadAttention only (no packed-weight Attention op the int8 pass can't reach),
    same outputs as the exported graph, from either exporter (each has its own fuser)."""
    import onnx

    from compress.ort_fusion import fuse_attention
    from export.onnx import export_onnx

    export_onnx(tiny, tmp_path / "export", components=["unet"], exporter=exporter)
    src, dst = tmp_path / "export/unet/model.onnx", tmp_path / "fused/model.onnx"
    info = fuse_attention(src, dst)
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert info["fuser"] == fuser
    assert info["multi_head_attention"] == ops.count("MultiHeadAttention") > 0
    assert "Attention" not in ops and "Softmax" not in ops  # every attention core fused
    rng = np.random.default_rng(0)
    hidden = _session(src).get_inputs()[2].shape[2]
    feeds = {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 7, hidden)).astype(np.float32),
    }
    assert _rel_error(src, dst, feeds) < 1e-4


@pytest.mark.slow
def test_ort_static_with_fused_attention_quantizes_every_projection(ort_static, tiny, tmp_path, calib_cfg):
    fused = quantize(tiny, cfg("ort-int8-static", calibration=calib_cfg, fuse_attention=True), tmp_path / "v",
                     exporter=export_onnx)
    info = fused.metrics["components"]["unet"]
    assert info["attention_fusion"]["multi_head_attention"] > 0 and info["error_vs_float"]["finite"]
    graph = fused.path / "unet/model.onnx"
    assert _quantized_matmuls(graph) >= _quantized_matmuls(ort_static.path / "unet/model.onnx") > 0
    assert not list(fused.path.glob(".fused-*"))  # the fused float scratch graph is not shipped


def test_every_registered_method_has_its_applier_and_is_in_the_union():
    """The registry is the one list: configs, union, help and appliers cannot drift apart."""
    import typing

    from compress.ort_variant import GRAPH_QUANTIZERS
    from compress.quant_ov import QUANTIZERS as OV_QUANTIZERS
    from sdwb.quant.config import METHOD_INFO, QuantConfig, methods_help
    from sdwb.quant.torch_methods import APPLIERS

    tables = {"torch": APPLIERS, "onnxruntime": GRAPH_QUANTIZERS, "openvino": OV_QUANTIZERS}
    for name in METHODS:
        assert name in tables[METHOD_INFO[name]["backend"]], f"{name}: registered without an applier"
        assert name in methods_help()
    assert set(typing.get_args(QuantConfig)) == set(METHODS.values())
    assert set(APPLIERS) | set(GRAPH_QUANTIZERS) | set(OV_QUANTIZERS) == set(METHODS)
