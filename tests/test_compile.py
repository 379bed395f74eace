"""torch.compile on the torch backend (:mod:`sdwb.torch_compile`): ``sdwb generate --compile`` and
``compile: true`` bench rows.

What is checked: compiled images equal eager ones within PSNR >= 40 dB and a max difference of
4/255 per pixel (2 DDIM steps on ``builtin:tiny-shapes``, 64x64; inductor reorders float sums,
so bit equality is not expected); a compiled bf16 row generates finite, non-blank images; a bench
row's compile lands in ``compile_s``, not in its timed runs; and every misuse (another backend,
an unknown mode, no C++ compiler) is one line before anything is loaded.

Inductor takes 30-100 s to compile the tiny UNet on 2 CPU cores (about 15 s with a warm inductor
cache), so the compiling tests are marked ``slow``, the bench run is made once per module and
shared by its tests, and they skip with inductor's one-line reason where it cannot work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.scenario import bench_config_from_dict, quick_config
from sdwb.errors import SdwbError

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected:UserWarning")  # diffusers' lru_cache calls

MODEL = "builtin:tiny-shapes"
PROMPT = "a small red circle at the top on a gray background"
STEPS = 2
MIN_PSNR_DB, MAX_DIFF = 40.0, 4  # compiled vs eager, 8-bit images


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_close(compiled, eager) -> None:
    assert psnr(compiled, eager) >= MIN_PSNR_DB
    assert np.abs(np.asarray(compiled, dtype=int) - np.asarray(eager, dtype=int)).max() <= MAX_DIFF


@pytest.fixture(scope="module")
def inductor():
    """Skip (one line: inductor's reason) where torch.compile cannot build CPU kernels."""
    from sdwb.torch_compile import check_compile

    try:
        check_compile("cpu")
    except SdwbError as e:
        pytest.skip(str(e))


def run_sdwb(capsys, *args: str) -> tuple[int, str]:
    """Run ``sdwb ARGS`` in this process: (exit code, stderr)."""
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    return info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]


# --------------------------------------------------------------------------- refusals (fast)


def test_compile_with_another_backend_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "o.png")
    code, err = run_sdwb(capsys, "generate", "-m", MODEL, "-p", PROMPT, "-o", out, "--compile",
                     "--backend", "onnxruntime")
    assert_one_line_error(code, err, "--compile", "onnxruntime")
    code, err = run_sdwb(capsys, "generate", "-m", MODEL, "-p", PROMPT, "-o", out,
                     "--compile-mode", "max-autotune")
    assert_one_line_error(code, err, "needs --compile")
    code, err = run_sdwb(capsys, "generate", "-m", MODEL, "-p", PROMPT, "-o", out, "--compile",
                     "--compile-mode", "fast")
    assert_one_line_error(code, err, "--compile-mode fast", "max-autotune")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"variants": [{"name": "a", "model": "m", "backend": "onnxruntime", "compile": True}]},
         ["variants.a:", "backend onnxruntime"]),
        ({"defaults": {"compile": True}, "sweep": {"backend": ["torch", "onnxruntime"]},
          "variants": [{"name": "a", "model": "m"}]}, ["variants.a (row a-backendonnxruntime)"]),
        ({"defaults": {"compile": True, "compile_mode": "fast"}, "variants": [{"name": "a", "model": "m"}]},
         ["defaults.compile_mode", "max-autotune"]),
    ],
)
def test_bench_config_refuses_compile_off_torch(data, needles):
    with pytest.raises(SdwbError) as info:
        bench_config_from_dict(data)
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


def test_no_cpp_compiler_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    import sdwb.loading
    from bench.harness import run_bench

    def no_compiler():
        raise RuntimeError("no compiler")

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(sdwb.loading, "load_pipeline", no_load)
    code, err = run_sdwb(capsys, "generate", "-m", MODEL, "-p", PROMPT, "-o", str(tmp_path / "o.png"),
                     "--compile", "--device", "cpu")
    assert_one_line_error(code, err, "C++ compiler")
    with pytest.raises(SdwbError, match="variant tiny-shapes: torch.compile on the CPU needs a C.. compiler"):
        run_bench(quick_config([MODEL], compile=True, metrics=["latency"]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_memory_probe_of_a_compiled_row_compiles():
    from bench.memory import probe_command

    (compiled,) = quick_config([MODEL], compile=True, compile_mode="max-autotune").scenarios()
    (eager,) = quick_config([MODEL]).scenarios()
    cmd = probe_command(compiled)
    assert cmd[cmd.index("--compile-mode") + 1] == "max-autotune"
    assert "--compile-mode" not in probe_command(eager)


# --------------------------------------------------------------------------- compiling (slow)


@pytest.mark.slow
def test_generate_compile_matches_eager(tmp_path, capsys, inductor):
    from PIL import Image

    images = {}
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.png"
        code, err = run_sdwb(capsys, "generate", "-m", MODEL, "-p", PROMPT, "--steps", str(STEPS),
                             "--seed", "3", "--device", "cpu", "--no-progress", "-o", str(out), *flags)
        assert code == 0, err
        images[name] = np.asarray(Image.open(out))
        assert json.loads(out.with_suffix(".json").read_text())["compile"] == ("default" if flags else None)
    assert images["eager"].shape == (64, 64, 3)
    assert_close(images["compiled"], images["eager"])


@pytest.fixture(scope="module")
def compiled_bench(tmp_path_factory, inductor):
    """One bench run shared by the tests below: eager fp32 (baseline), compiled fp32, compiled bf16.

    Dynamo's in-process cache is kept: the compiled fp32 row reuses the graph the CLI test above
    compiled for the same UNet, dtype and shapes (one inductor compile less: the suite's time), and
    the bf16 row compiles its own (so one row is known to pay a real compile)."""
    import pandas as pd

    from bench.harness import run_bench
    from sdwb.testing import build_tiny_judge

    judge = tmp_path_factory.mktemp("judge")
    model, processor = build_tiny_judge(seed=0)
    model.save_pretrained(judge)
    processor.save_pretrained(judge)
    config = bench_config_from_dict({
        "defaults": {"steps": STEPS, "n_prompts": 2, "warmup": 0, "repeats": 2, "judge": str(judge),
                     "metrics": ["latency", "quality"]},
        "variants": [{"name": "eager", "model": MODEL},
                     {"name": "compiled", "model": MODEL, "compile": True},
                     {"name": "compiled-bf16", "model": MODEL, "compile": True, "dtype": "bf16"}],
    })
    out = tmp_path_factory.mktemp("bench")
    run_bench(config, out, progress=False)
    return out, pd.read_csv(out / "results.csv").set_index("variant")


def _images(out, variant: str) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted((out / "images" / variant).glob("*.png"))]


@pytest.mark.slow
def test_bench_reports_compile_apart_from_the_timed_runs(compiled_bench):
    _, df = compiled_bench
    assert not bool(df.loc["eager", "compile"]) and pd_missing(df.loc["eager", "compile_s"])
    assert pd_missing(df.loc["eager", "compile_mode"])
    for variant in ("compiled", "compiled-bf16"):
        row = df.loc[variant]
        assert bool(row["compile"]) and row["compile_mode"] == "default"
        assert row["compile_s"] > 0 and row["timed_runs"] == 2 and row["unet_ms_per_call"] > 0
    # the bf16 graph is compiled by this run (fp32's may be reused): the compile is in no timed run
    assert df.loc["compiled-bf16", "e2e_s_p90"] < df.loc["compiled-bf16", "compile_s"]


@pytest.mark.slow
def test_bench_compiled_images_match_eager(compiled_bench):
    out, df = compiled_bench
    eager, compiled = _images(out, "eager"), _images(out, "compiled")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(compiled, eager):
        assert_close(a, b)
    assert df.loc["compiled", "psnr_vs_baseline"] >= MIN_PSNR_DB


@pytest.mark.slow
def test_bench_compiled_bf16_generates_finite_images(compiled_bench):
    out, df = compiled_bench
    images = _images(out, "compiled-bf16")
    assert len(images) == 2 and df.loc["compiled-bf16", "dtype"] == "bf16"
    assert all(image.std() > 1 for image in images)  # not blank (NaN is refused by generate itself)
    assert df.loc["compiled-bf16", "psnr_vs_baseline"] >= 30  # bf16 rounding (52 dB seen), not a broken graph


def pd_missing(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
