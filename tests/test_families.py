"""SD families: SDXL end to end (load, generate with every scheduler, bench, torch and ONNX Runtime
quantization, channel and block pruning with recovery, progressive and LCM distillation, ONNX
export run by ONNX Runtime with torch's images); TensorRT, which SDXL does not support yet, is
refused in one line; other pipeline classes are refused naming the supported ones;
``builtin:sdxl-arch`` is SDXL base 1.0's published architecture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from sdwb.errors import SdwbError
from sdwb.families import FAMILIES, VERBS, family_from_configs, support_table
from sdwb.generate import SCHEDULERS, generate
from sdwb.loading import load_pipeline, require_family, spec_family

PROMPT = "a small red circle at the top on a gray background"


def sdwb(capsys, *args) -> tuple[int, str, str]:
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline (two text encoders, text_time added conditions) saved in diffusers layout."""
    from sdwb.sdxl import build_sdxl_pipeline

    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    build_sdxl_pipeline(seed=0, tiny=True).save_pretrained(path, safe_serialization=True)
    return path


def test_sdxl_arch_has_the_published_parameter_counts():
    from sdwb.sdxl import SDXL_PARAMS, sdxl_configs, sdxl_param_counts

    counts = sdxl_param_counts(meta=True)
    assert {k: counts[k] for k in SDXL_PARAMS} == SDXL_PARAMS
    assert counts["unet"] == 2_567_463_684  # SDXL base 1.0's UNet
    cfg = sdxl_configs()
    assert cfg["unet"]["transformer_layers_per_block"] == [1, 2, 10] and cfg["vae"]["force_upcast"]
    assert spec_family("builtin:sdxl-arch") is FAMILIES["sdxl"]


def test_sdxl_pipeline_loads_with_both_text_encoders_and_generates_with_every_scheduler(sdxl_dir):
    pipe = load_pipeline(str(sdxl_dir))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.text_encoder_2 is not None
    assert spec_family(str(sdxl_dir)) is FAMILIES["sdxl"]
    seen = {}
    for name in SCHEDULERS:
        if name == "lcm":
            continue  # for consistency-distilled students only
        (image,) = generate(pipe, [PROMPT], steps=3, seed=1, scheduler=name, progress=False)
        arr = np.asarray(image, dtype=np.float32)
        assert image.size == (32, 32) and np.isfinite(arr).all()
        seen[name] = arr
    assert len(seen) >= 3
    again = np.asarray(generate(pipe, [PROMPT], steps=3, seed=1, scheduler="ddim", progress=False)[0])
    assert np.array_equal(again, seen["ddim"].astype(np.uint8))  # seeded: reproducible
    assert not np.array_equal(seen["ddim"], seen["euler"])  # the scheduler really changed


def test_sdxl_generate_and_bench_through_the_cli(sdxl_dir, tmp_path, capsys):
    code, out, err = sdwb(capsys, "generate", "--model", sdxl_dir, "-p", PROMPT, "--steps", "2",
                          "-o", tmp_path / "x.png", "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "x.png").is_file()
    code, out, err = sdwb(capsys, "bench", "--model", sdxl_dir, "--steps", "2", "--prompts", "1",
                          "--repeats", "2", "--warmup", "1", "--threads", "1", "--metrics", "latency",
                          "-o", tmp_path / "bench", "--no-progress")
    assert code == 0, err
    row = pd.read_csv(tmp_path / "bench" / "results.csv").iloc[0]
    assert row["e2e_s_median"] > 0 and row["unet_calls"] == 2
    assert row["text_encoder_calls"] >= 2  # both text encoders are timed as text-encoder calls


@pytest.mark.parametrize("method", ["torch-bf16", "torch-int8-dynamic", "torch-int8-static"])
def test_sdxl_torch_quantized_variants_reload_and_generate(sdxl_dir, tmp_path, method):
    from compress.quantize import quantize
    from sdwb.quant.config import parse_quant_config

    data = {"method": method, "guard": {"min_psnr": 5.0, "steps": 3}}
    if method == "torch-int8-static":  # calibration records SDXL's added conditions as well
        data["calibration"] = {"prompts": 2, "steps": 3, "timesteps": "all"}
    if method == "torch-bf16":
        data["components"] = ["unet", "text_encoder"]  # both text encoders
    variant = quantize(str(sdxl_dir), parse_quant_config(data), tmp_path / "v")
    pipe = load_pipeline(str(variant.path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    if method == "torch-bf16":
        import torch

        assert pipe.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    (image,) = generate(pipe, [PROMPT], steps=3, progress=False)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_sdxl_export_runs_on_onnx_runtime_with_the_torch_images(sdxl_dir, tmp_path):
    """Both text encoders (penultimate hidden states + pooled), the UNet with text_embeds and
    time_ids, the VAE: exported, validated, and the ONNX Runtime loop makes torch's images."""
    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

    manifest = export_onnx(str(sdxl_dir), tmp_path / "onnx")
    assert list(manifest["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    assert manifest["pipeline"]["family"] == "sdxl"
    unet_inputs = [i["name"] for i in manifest["components"]["unet"]["inputs"]]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    outputs = [o["name"] for o in manifest["components"]["text_encoder_2"]["outputs"]]
    assert outputs == ["hidden_states", "text_embeds"]
    assert all(v["ok"] for c in manifest["components"].values() for v in c["validation"])
    ort_pipe = OrtStableDiffusionPipeline.from_export(tmp_path / "onnx")
    torch_pipe = load_pipeline(str(sdxl_dir))
    prompts = [PROMPT, "a large blue square on the left"]
    for scheduler in ("ddim", "euler"):
        ref = generate(torch_pipe, prompts, steps=3, seed=2, scheduler=scheduler, progress=False)
        got = generate(ort_pipe, prompts, steps=3, seed=2, scheduler=scheduler, progress=False)
        for a, b in zip(ref, got):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            mse = float(((a - b) ** 2).mean())
            assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40.0, (scheduler, mse)


@pytest.mark.slow
def test_sdxl_ort_int8_static_variant_calibrates_with_added_conditions(sdxl_dir, tmp_path):
    from compress.quantize import quantize
    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.quant.config import parse_quant_config

    config = parse_quant_config({"method": "ort-int8-static", "guard": {"min_psnr": 5.0, "steps": 3},
                                 "calibration": {"prompts": 2, "steps": 3}})
    variant = quantize(str(sdxl_dir), config, tmp_path / "int8", exporter=export_onnx)
    assert variant.record["metrics"]["components"]["unet"]["quant_ops"]["QuantizeLinear"] > 0
    (image,) = generate(OrtStableDiffusionPipeline.from_export(tmp_path / "int8"), [PROMPT], steps=3,
                        progress=False)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


@pytest.mark.parametrize("method", ["channels", "blocks"])
def test_sdxl_prune_with_recovery_reloads_generates_and_has_fewer_macs(sdxl_dir, tmp_path, method):
    """Channels (Taylor importance: gradients through SDXL's added conditions) and BK-SDM blocks,
    each with two recovery steps: the conditioning of the training batches is SDXL's."""
    from compress.prune import prune
    from compress.prune_config import parse_prune_config
    from sdwb.macs import unet_example_inputs, unet_macs

    data = {"method": method, "finetune": {"steps": 2, "batch": 2}, "data": {"latent_pool": 8}}
    if method == "channels":
        data["importance"] = "taylor"
        data["taylor"] = {"batches": 1, "batch": 2}
    pruned = prune(str(sdxl_dir), parse_prune_config(data), tmp_path / "pruned")
    base, small = load_pipeline(str(sdxl_dir)), load_pipeline(str(pruned.path))
    assert type(small).__name__ == "StableDiffusionXLPipeline"
    before = unet_macs(base.unet, unet_example_inputs(base))
    after = unet_macs(small.unet, unet_example_inputs(small))
    assert after["gmacs"] < before["gmacs"] and after["params_m"] < before["params_m"]
    (image,) = generate(small, [PROMPT], steps=3, progress=False)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_sdxl_distillation_loss_goes_down_with_sdxl_conditioning(sdxl_dir):
    """One progressive round's loss on a fixed batch, conditioned as StableDiffusionXLPipeline
    conditions (pooled embeds, time ids, zero unconditional branch), falls."""
    import copy

    import torch

    from compress.ddim_targets import ddim_grid, student_scheduler_config
    from compress.distill import RoundPlan
    from compress.progressive import round_loss
    from sdwb.conditioning import TextConditioner, expand

    pipe = load_pipeline(str(sdxl_dir))
    conditioner = TextConditioner(pipe)
    ids = conditioner._tokenize(pipe.tokenizer, [PROMPT, "a large blue square on the left"] * 2)
    cond = conditioner(ids)
    uncond = expand(conditioner(conditioner.empty_ids[None]), 4)
    assert float(uncond["encoder_hidden_states"].abs().max()) == 0.0  # force_zeros_for_empty_prompt
    assert cond["added_cond_kwargs"]["time_ids"].shape == (4, 6)
    config = student_scheduler_config(pipe.scheduler.config)
    plan = RoundPlan(ddim_grid(config, 8), ddim_grid(config, 4), 3.0, "epsilon", "truncated-snr")
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    j = torch.tensor([0, 1, 2, 3])
    student = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(12):
        loss, _ = round_loss(student, pipe.unet, x0, noise, j, cond, uncond, plan)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", ["progressive", "lcm"])
def test_sdxl_student_is_written_reloads_and_generates(sdxl_dir, tmp_path, method):
    from compress.distill import distill
    from compress.distill_config import parse_distill_config

    settings = {"budget": 2, "batch": 2, "latent_pool": 8, "checkpoint_every": 2, "warmup": 1,
                "method": method, "teacher_steps": 4 if method == "progressive" else 10, "student_steps": 2}
    student = distill(str(sdxl_dir), parse_distill_config(settings), tmp_path / "student", progress=False)
    assert all(r["loss_first"] > 0 for r in student.rounds)
    pipe = load_pipeline(str(student.path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.text_encoder_2 is not None
    (image,) = generate(pipe, [PROMPT], progress=False)  # the student's own steps / scheduler
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_tensorrt_refuses_an_sdxl_export_in_one_line(sdxl_dir, tmp_path):
    """TensorRT runners take one output per engine: SDXL's second text encoder has two."""
    from sdwb.families import FAMILIES, check_verb

    with pytest.raises(SdwbError, match="export tensorrt: not supported for SDXL"):
        check_verb(FAMILIES["sdxl"], "export tensorrt")


@pytest.mark.parametrize("cls", ["StableDiffusion3Pipeline", "FluxPipeline",
                                 "StableDiffusionControlNetPipeline"])
def test_other_pipeline_classes_are_refused_naming_the_supported_ones(sdxl_dir, tmp_path, cls, capsys):
    other = tmp_path / "other"
    shutil.copytree(sdxl_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = cls
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SdwbError, match=f"unsupported pipeline: .*{cls}; supported: StableDiffusionPipeline"):
        load_pipeline(str(other))
    code, _, err = sdwb(capsys, "generate", "--model", other, "-p", PROMPT, "-o", tmp_path / "x.png")
    assert code != 0 and "StableDiffusionXLPipeline (SDXL)" in err and "Traceback" not in err


def test_family_table_and_detection():
    from sdwb.sd15 import sd15_configs

    assert family_from_configs("StableDiffusionPipeline", sd15_configs()["unet"]) is FAMILIES["sd1"]
    sd21 = {"cross_attention_dim": 1024, "use_linear_projection": True, "attention_head_dim": [5, 10, 20, 20]}
    assert family_from_configs("StableDiffusionPipeline", sd21) is FAMILIES["sd2"]
    assert family_from_configs("StableDiffusionXLPipeline", {"cross_attention_dim": 2048}) is FAMILIES["sdxl"]
    rows = {r["family"]: r for r in support_table()}
    assert all(rows["SD 1.x"][v] and rows["SD 2.x"][v] for v in VERBS)
    assert all(rows["SDXL"][v] for v in VERBS if v not in ("export tensorrt", "lora train"))
    assert not rows["SDXL"]["lora train"]
    assert not rows["SDXL"]["export tensorrt"]
    assert require_family("builtin:sd15-arch", "export tensorrt") is FAMILIES["sd1"]
    with pytest.raises(SdwbError, match="export tensorrt: not supported for SDXL"):
        require_family("builtin:sdxl-arch", "export tensorrt")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd1_and_sd2_pipelines_end_to_end(family, tmp_path, capsys):
    """SD 1.x / 2.x in miniature with their own switches (SD 2.x: per-block heads, linear
    projections, attention upcast, v-prediction) and 32 GroupNorm groups: detected as their family,
    exported and run by ONNX Runtime with torch's images, torch-bf16 and ort-int8-static variants
    reload and generate, one distillation round runs, bench writes a row."""
    from compress.distill import distill
    from compress.distill_config import parse_distill_config
    from compress.quantize import quantize
    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.quant.config import parse_quant_config
    from sdwb.testing import build_family_pipeline

    model = tmp_path / family
    build_family_pipeline(family, seed=1).save_pretrained(model, safe_serialization=True)
    assert spec_family(str(model)) is FAMILIES[family]
    torch_pipe = load_pipeline(str(model))
    assert torch_pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    export_onnx(str(model), tmp_path / "onnx")
    ort_pipe = OrtStableDiffusionPipeline.from_export(tmp_path / "onnx")
    ref = generate(torch_pipe, [PROMPT], steps=3, seed=5, progress=False)[0]
    got = generate(ort_pipe, [PROMPT], steps=3, seed=5, progress=False)[0]
    mse = float(((np.asarray(ref, dtype=np.float64) - np.asarray(got, dtype=np.float64)) ** 2).mean())
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40.0, mse

    guard = {"min_psnr": 5.0, "steps": 3}
    bf16_config = parse_quant_config({"method": "torch-bf16", "guard": guard})
    int8_config = parse_quant_config({"method": "ort-int8-static", "guard": guard,
                                      "calibration": {"prompts": 2, "steps": 3}})
    bf16 = quantize(str(model), bf16_config, tmp_path / "bf16")
    int8 = quantize(str(tmp_path / "onnx"), int8_config, tmp_path / "int8")
    for pipe in (load_pipeline(str(bf16.path)), OrtStableDiffusionPipeline.from_export(int8.path)):
        (image,) = generate(pipe, [PROMPT], steps=3, progress=False)
        assert np.isfinite(np.asarray(image, dtype=np.float32)).all()

    settings = {"budget": 2, "batch": 2, "latent_pool": 8, "checkpoint_every": 2, "warmup": 1,
                "teacher_steps": 4, "student_steps": 2}
    student = distill(str(model), parse_distill_config(settings), tmp_path / "student", progress=False)
    assert len(student.rounds) == 1 and student.rounds[0]["loss_first"] > 0
    code, _, err = sdwb(capsys, "bench", "--model", student.path, "--steps", "2", "--prompts", "1",
                        "--repeats", "1", "--warmup", "0", "--threads", "1", "--metrics", "latency",
                        "-o", tmp_path / "bench", "--no-progress")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "bench" / "results.csv").iloc[0]["unet_calls"] == 2
