"""What only a CUDA GPU can check (#28): low-precision images, the benchmark's CUDA clocks and memory,
torchao int8, torch.compile with CUDA graphs, and training steps on CUDA.

Every test here is marked ``gpu`` (``tests/conftest.py`` skips them without CUDA, so on the CPU
machines they are collected and skipped); ``make gpu-check`` runs them on a lent GPU machine
(``pytest -m gpu``). Each is small: the tiny-shapes model, a few steps, seconds.

Tolerances (PSNR of 8-bit images, :func:`compress.guard.psnr`, capped at 100 dB): on this 2-core
CPU, tiny-shapes in bf16 gave images 52.5 dB from fp32 (DDIM 10, guidance 7.5, two prompts;
53.3 dB at DDIM 50 in ``reports/tiny-shapes-cpu``), while the same prompts from another seed's
noise are 21.5 dB from them. The floors, fp16 >= 35 dB and bf16 >= 30 dB (fp16 keeps 3 more
mantissa bits than bf16), leave ~20 dB for the GPU kernels rounding otherwise (flash attention,
cuDNN convolutions) and still fail anything that changes the image, as another seed does.
"""

from __future__ import annotations

import math

import pytest
import torch

from compress.guard import psnr

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:Dynamo detected:UserWarning")]

MODEL = "builtin:tiny-shapes"
PROMPTS = ["a small red circle at the top on a gray background",
           "a large blue square on the left on a white background"]
GEN = dict(steps=10, guidance=7.5, seed=0, scheduler="ddim", batch=2, progress=False)
MIN_PSNR_DB = {torch.float16: 35.0, torch.bfloat16: 30.0}  # vs fp32 on CUDA: see the module doc
TORCHAO_MIN_PSNR_DB = 20.0  # the quantize guard's default floor (sdwb.quant.registry.GuardConfig.min_psnr)


def _generate(dtype=torch.float32, pipe=None):
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    pipe = pipe or load_pipeline(MODEL, device="cuda", dtype=dtype)
    return generate(pipe, PROMPTS, **GEN)


@pytest.fixture(scope="module")
def fp32_images():
    return _generate()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_generate_matches_fp32(dtype, fp32_images):
    images = _generate(dtype)
    assert psnr(images, fp32_images) >= MIN_PSNR_DB[dtype]


def test_bench_on_cuda_reports_cuda_peak_and_event_latency(tmp_path, monkeypatch):
    """``sdwb bench --device cuda``: UNet calls timed by CUDA events, ``cuda_peak_mb`` from the probe."""
    from bench import latency
    from bench.harness import run_bench
    from bench.scenario import quick_config

    marks = []
    real = latency.CudaClock.mark
    monkeypatch.setattr(latency.CudaClock, "mark", lambda self: marks.append(1) or real(self))
    config = quick_config([MODEL], device="cuda", steps=4, n_prompts=2, warmup=1, repeats=2,
                          metrics=["latency", "memory"])
    row = run_bench(config, tmp_path, progress=False).iloc[0]
    assert row["device"] == "cuda" and row["cuda_peak_mb"] > 0
    assert row["unet_calls"] == 4 and 0 < row["unet_ms_per_call"] < 1000
    assert row["e2e_s_median"] > 0 and math.isfinite(row["images_per_s"])
    assert len(marks) >= 2 * 2 * 4  # a start and an end event per timed UNet call, at least


def test_torchao_int8_weight_only_on_cuda(fp32_images):
    pytest.importorskip("torchao")
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import parse_quant_config
    from sdwb.quant.torch_methods import apply_torch_method

    pipe = load_pipeline(MODEL, device="cuda")
    summary = apply_torch_method(pipe, parse_quant_config({"method": "torchao-int8-weight-only"}), "cuda")
    assert summary["quantized_linear_layers"] > 0
    assert psnr(_generate(pipe=pipe), fp32_images) >= TORCHAO_MIN_PSNR_DB


def test_compile_reduce_overhead_matches_eager():
    """torch.compile mode reduce-overhead (inductor kernels replayed from CUDA graphs) gives the
    eager UNet's output, also on the replays after the graph was recorded."""
    from sdwb.errors import SdwbError
    from sdwb.testing import build_tiny_pipeline
    from sdwb.torch_compile import check_compile, compile_unet

    try:
        check_compile("cuda")
    except SdwbError as e:
        pytest.skip(str(e))
    pipe = build_tiny_pipeline(seed=0).to("cuda")
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 16, 16, generator=gen).cuda(),
              "timestep": torch.tensor(500.0).cuda(),
              "encoder_hidden_states": torch.randn(2, 32, 32, generator=gen).cuda()}
    with torch.inference_mode():
        eager = pipe.unet(**inputs).sample.clone()
        compiled = compile_unet(pipe, "reduce-overhead").unet
        outs = [compiled(**inputs).sample.clone() for _ in range(4)]  # records on an early call, then replays
    scale = eager.abs().max()
    for out in outs:  # fp32 (cuDNN's convolutions in TF32 by default, both sides): ~1e-3 at most
        assert (out - eager).abs().max() <= 1e-2 * scale


def test_distillation_steps_on_cuda(tmp_path):
    from compress.distill import distill
    from compress.distill_config import parse_distill_config

    torch.cuda.reset_peak_memory_stats()
    config = parse_distill_config({"teacher_steps": 8, "student_steps": 4, "guidance_distill": True,
                                   "budget": 6, "batch": 8, "latent_pool": 16, "warmup": 1}, "test")
    result = distill(MODEL, config, work_dir=tmp_path / "work", progress=False)
    rnd = result.rounds[0]
    assert rnd["optimizer_steps"] == 6
    assert math.isfinite(rnd["loss_first"]) and math.isfinite(rnd["loss_last"])
    assert torch.cuda.max_memory_allocated() > 0  # accelerate put the training on the GPU


def test_prune_recovery_steps_on_cuda():
    from compress.prune import prune
    from compress.prune_config import parse_prune_config

    torch.cuda.reset_peak_memory_stats()
    config = parse_prune_config({"ratio": 0.3, "data": {"latent_pool": 16},
                                 "finetune": {"steps": 8, "batch": 4, "lr": 2e-3, "warmup": 0,
                                              "eval_batches": 1, "task_weight": 0.0}}, "test")
    rec = prune(MODEL, config).metrics["recovery"]
    assert math.isfinite(rec["distill_mse_after"])
    assert rec["distill_mse_after"] < rec["distill_mse_before"]  # tests/test_prune.py asks < 0.9x on a CPU
    assert torch.cuda.max_memory_allocated() > 0
