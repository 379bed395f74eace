"""The benchmark core: scenarios, interleaved latency, the memory probe, results files, run_bench.

Everything runs on the CPU with the 0.3 M-param test pipeline (``sdwb.testing``) saved to a tmp
directory and a tiny random CLIP judge; numbers are checked as properties, never just printed.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pandas as pd
import pytest
import yaml

from bench import latency, memory, results
from bench.scenario import (
    Scenario,
    bench_config_from_dict,
    load_bench_config,
    load_prompts,
    quick_config,
)
from sdwb.errors import SdwbError

HAVE_QUALITY = importlib.util.find_spec("bench.quality") is not None
QUALITY_COLUMNS = ("clip_score", "clip_score_lo", "clip_score_hi", "cmmd", "psnr_vs_baseline",
                   "ssim_vs_baseline", "color_acc", "shape_acc", "position_acc")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from sdwb.testing import build_tiny_judge

    path = tmp_path_factory.mktemp("tiny-judge")
    model, processor = build_tiny_judge(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    from sdwb.loading import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"variants": [{"name": "a", "model": "m", "dtype": "fp8"}]}, ["variants.0(a).dtype", "fp8"]),
        ({"variants": [{"name": "a", "model": "m"}], "defaults": {"stepz": 3}},
         ["defaults.stepz", "unknown key"]),
        ({"variants": [{"name": "a", "model": "m"}], "defaults": {"repeats": 0}}, ["defaults.repeats"]),
        ({"variants": [{"name": "a", "model": "m"}], "defaults": {"metrics": ["speed"]}},
         ["defaults.metrics.0", "latency"]),
        ({"defaults": {}}, ["variants", "missing"]),
        ({"variants": [{"name": "a", "model": "m"}], "baseline": "b"}, ["baseline", "'b'"]),
        ({"variants": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, ["duplicate", "a"]),
        ({"variants": [{"name": "a", "model": "m", "steps": 2}], "sweep": {"steps": [4]}},
         ["variants.0.steps", "sweep.steps"]),
        ("variants: [name: a\n", ["malformed YAML"]),
    ],
)
def test_config_errors_are_one_line_and_name_file_and_key(tmp_path, data, needles):
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(SdwbError) as info:
        load_bench_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message


def test_set_override_errors_are_marked_and_flags_win(tmp_path):
    path = write_yaml(tmp_path / "b.yaml", {"defaults": {"steps": 7},
                                            "variants": [{"name": "a", "model": "m"}]})
    with pytest.raises(SdwbError, match=r"defaults\.warmup: .*\[from --set\]"):
        load_bench_config(path, ["defaults.warmup=-1"])
    config = load_bench_config(path, ["defaults.steps=5"], {"steps": 3, "repeats": None})
    assert config.name == "b" and config.scenarios()[0].steps == 3 and config.scenarios()[0].repeats == 5


def test_variants_sweep_and_baseline_expand_in_order():
    config = bench_config_from_dict({
        "defaults": {"steps": 8, "guidance": 7.5},
        "variants": [{"name": "fp32", "model": "m"}, {"name": "bf16", "model": "m", "dtype": "bf16"}],
        "sweep": {"steps": [4, 2]},
        "baseline": "fp32",
    })
    rows = config.scenarios()
    assert [s.variant for s in rows] == ["fp32-steps4", "fp32-steps2", "bf16-steps4", "bf16-steps2"]
    assert [s.steps for s in rows] == [4, 2, 4, 2]
    assert [s.dtype for s in rows] == ["fp32", "fp32", "bf16", "bf16"]
    assert {s.baseline for s in rows} == {"fp32-steps4"}


def test_quick_config_names_variants_after_models():
    models = ["builtin:tiny-shapes", "/x/my-model/", "builtin:tiny-shapes"]
    config = quick_config(models, steps=3, repeats=None)
    rows = config.scenarios()
    assert [s.variant for s in rows] == ["tiny-shapes", "my-model", "tiny-shapes-2"]
    assert all(s.steps == 3 and s.repeats == 5 and s.backend == "torch" for s in rows)
    assert rows[0].quality_applies and not Scenario(**{**rows[0].model_dump(), "model": "builtin:sd15-arch"}
                                                    ).quality_applies
    with pytest.raises(SdwbError, match="at least one --model"):
        quick_config([])


def test_prompts_from_shapes_eval_and_from_a_file(tmp_path):
    base = quick_config(["m"], n_prompts=3).scenarios()[0]
    prompts, attributes = load_prompts(base)
    assert len(prompts) == 3 and attributes[0]["color"] in prompts[0]
    path = tmp_path / "p.txt"
    path.write_text("# comment\na cat\n\na dog\n")
    prompts, attributes = load_prompts(base.model_copy(update={"prompts": str(path)}))
    assert prompts == ["a cat", "a dog"] and attributes is None
    with pytest.raises(SdwbError, match="prompts: file not found"):
        load_prompts(base.model_copy(update={"prompts": str(tmp_path / "missing.txt")}))


# --------------------------------------------------------------------------- latency


class FakeClock:
    """Every mark advances time by a fixed step: durations are exact and known."""

    def __init__(self, step=0.5):
        self.t, self.step = 0.0, step

    def now(self):
        return self.mark()

    def mark(self):
        self.t += self.step
        return self.t

    def elapsed(self, start, end):
        return end - start

    def sync(self):
        pass


def test_component_timer_on_a_fake_clock_and_summary_statistics():
    class Module:
        def forward(self, x):
            return x

        def decode(self, x):
            return x

    class Pipe:
        text_encoder, unet, vae = Module(), Module(), Module()

    pipe = Pipe()
    with latency.ComponentTimer(pipe, FakeClock(0.25)) as timer:
        pipe.text_encoder.forward(1)
        for _ in range(3):
            pipe.unet.forward(1)
        pipe.vae.decode(1)
        calls = timer.take()
    assert calls == {"text_encoder": [0.25], "unet": [0.25] * 3, "vae_decode": [0.25]}
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__  # unwrapped

    runs = [latency.RunTiming("a", i, i, 2, e2e, 4, {"unet": [0.01, 0.03], "text_encoder": [0.002],
                                                      "vae_decode": [0.005]}, unet_batch=4)
            for i, e2e in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])]
    s = latency.summarize(runs)
    assert s["e2e_s_median"] == pytest.approx(1.5)  # seconds per image = run / 2 images
    assert s["e2e_s_p10"] == pytest.approx(0.7) and s["e2e_s_p90"] == pytest.approx(2.3)
    assert s["images_per_s"] == pytest.approx(1 / 1.5)
    assert s["unet_ms_per_call"] == pytest.approx(20.0) and s["unet_calls"] == 2
    assert s["text_encoder_ms"] == pytest.approx(2.0) and s["vae_decode_ms"] == pytest.approx(5.0)
    assert s["threads"] == 4 and s["unet_batch"] == 4 and s["timed_runs"] == 5
    assert latency.summarize([]) == {}


def test_hook_timer_reads_an_exported_pipelines_hooks():
    class Exported:  # the shape of sdwb.backends.onnxruntime.ExportedPipeline that the timer relies on
        def __init__(self):
            self.hooks, self.last_batch = [], {}

        def record_timings(self):
            raise NotImplementedError

        def run(self, name, batch, seconds):
            self.last_batch[name] = batch
            for hook in self.hooks:
                hook(name, seconds)

    pipe = Exported()
    assert latency.is_exported(pipe) and isinstance(latency.timer_for(pipe), latency.HookTimer)
    with latency.timer_for(pipe) as timer:
        pipe.run("text_encoder", 2, 0.001)
        for _ in range(3):
            pipe.run("unet", 2, 0.01)
        pipe.run("vae_decoder", 1, 0.002)
        calls = timer.take()
        assert timer.take_unet_batch() == 2
    assert calls == {"text_encoder": [0.001], "unet": [0.01] * 3, "vae_decode": [0.002]}
    assert pipe.hooks == []  # removed on exit
    assert not latency.is_exported(object())


def test_runs_are_interleaved_across_variants():
    config = bench_config_from_dict({"defaults": {"warmup": 1, "repeats": 3},
                                     "variants": [{"name": "A", "model": "m"},
                                                  {"name": "B", "model": "m", "repeats": 2}]})
    scenarios = config.scenarios()
    plan = latency.interleaved_schedule(scenarios)
    assert [(v, p) for v, p, _ in plan] == [("A", "warmup"), ("B", "warmup"), ("A", "timed"), ("B", "timed"),
                                            ("A", "timed"), ("B", "timed"), ("A", "timed")]
    seen = []

    def fake_run(pipe, scenario, prompts, threads=None):
        seen.append(scenario.variant)
        return 0.1, threads, {"unet": [0.01]}, 1

    out = latency.measure({"A": None, "B": None}, scenarios, {"A": ["p"], "B": ["q"]}, run_fn=fake_run)
    assert seen == ["A", "B", "A", "B", "A", "B", "A"]
    assert [t.order for t in out["A"]] == [0, 2, 4] and [t.order for t in out["B"]] == [1, 3]


@pytest.mark.parametrize(("guidance", "batch"), [(7.5, 1), (1.0, 2)])
def test_unet_calls_are_counted_from_the_real_pipeline(tiny_pipe, guidance, batch):
    scenario = quick_config(["m"], steps=3, guidance=guidance, batch=batch).scenarios()[0]
    seconds, threads, calls, unet_batch = latency.timed_run(tiny_pipe, scenario, ["a red circle"] * batch,
                                                            threads=1)
    cfg = guidance > 1
    assert len(calls["unet"]) == 3  # one UNet call per DDIM step; CFG halves share the call
    assert unet_batch == batch * (2 if cfg else 1)
    assert len(calls["text_encoder"]) == (2 if cfg else 1) and len(calls["vae_decode"]) == 1
    assert seconds > sum(calls["unet"]) > 0 and threads == 1
    assert "forward" not in tiny_pipe.unet.__dict__  # timers removed


# --------------------------------------------------------------------------- memory


def test_memory_probe_sees_a_deliberate_allocation(tiny_pipeline_dir):
    scenario = quick_config([str(tiny_pipeline_dir)], steps=1, threads=1).scenarios()[0]
    out = memory.run_probe(scenario, allocate_mb=256, timeout=120)
    assert out["peak_rss_mb"] > 0 and out["cuda_peak_mb"] is None
    assert out["peak_rss_mb"] >= out["rss_after_generate_mb"] + 0.9 * 256
    assert out["unet_gmacs"] > 0


def test_memory_probe_peak_is_not_the_parents(tiny_pipeline_dir):
    """Linux carries a parent's RSS high-water mark into a child's ru_maxrss across fork + exec;
    the probe reads its own (VmHWM), so a big benchmark process does not inflate every row."""
    import numpy as np

    from bench.memory_probe import current_rss_mb

    ballast = np.ones(2**28, dtype=np.float32)  # 1 GiB, touched
    parent = current_rss_mb()
    scenario = quick_config([str(tiny_pipeline_dir)], steps=1, threads=1).scenarios()[0]
    out = memory.run_probe(scenario, gmacs=False, timeout=120)
    del ballast
    assert parent > 1024 and 0 < out["peak_rss_mb"] < parent - 512


def test_memory_probe_failure_is_one_line(tmp_path):
    scenario = quick_config([str(tmp_path / "nope")], steps=1).scenarios()[0]
    with pytest.raises(SdwbError, match="model directory not found") as info:
        memory.run_probe(scenario, gmacs=False, timeout=120)
    assert "\n" not in str(info.value)


def test_gmacs_grow_with_the_unet_and_sizes_are_counted(tiny_pipe, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    small = tiny_pipe.unet
    config = {**small.config, "block_out_channels": (32, 64)}
    big = UNet2DConditionModel.from_config(config).eval()
    from sdwb.macs import unet_example_inputs, unet_macs

    inputs = unet_example_inputs(tiny_pipe)
    assert inputs["sample"].shape == (1, 4, 16, 16) and inputs["encoder_hidden_states"].shape == (1, 32, 32)
    assert unet_macs(big, inputs)["gmacs"] > 2 * unet_macs(small, inputs)["gmacs"] > 0
    counts = memory.param_counts(tiny_pipe)
    assert 0 < counts["unet_params_m"] < counts["params_m"] < 1
    size = memory.size_on_disk_mb(str(tiny_pipeline_dir))
    assert size == pytest.approx(counts["params_m"] * 1e6 * 4 / 2**20, rel=0.05)  # fp32 safetensors
    assert memory.size_on_disk_mb("builtin:sd15-arch") is None


# --------------------------------------------------------------------------- results


def _row(variant, **extra):
    return {"variant": variant, "model": "m", "backend": "torch", "dtype": "fp32", "steps": 2,
            "guidance": 7.5, "batch": 1, "e2e_s_median": 0.5, **extra}


def test_results_files_have_the_columns_and_empty_not_zero(tmp_path):
    df = results.results_frame([_row("a", clip_score=30.0, psnr_vs_baseline=math.inf), _row("b")])
    env = results.environment()
    assert env["cpu"] and env["torch_threads"] >= 1 and "hostname" not in json.dumps(env).lower()
    results.save_results(df, env, tmp_path, {"a": ["images/a/000.png"]})
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns[: len(results.REQUIRED_COLUMNS)]) == list(results.REQUIRED_COLUMNS)
    b = csv.set_index("variant").loc["b"]
    assert all(pd.isna(b[c]) for c in QUALITY_COLUMNS + ("peak_rss_mb", "cuda_peak_mb"))
    assert "\nb,m,torch,fp32,2,7.5,1,0.5,,," in (tmp_path / "results.csv").read_text()  # empty, not 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] and data["images"] == {"a": ["images/a/000.png"]}
    assert data["rows"][1]["clip_score"] is None and data["rows"][0]["psnr_vs_baseline"] == math.inf


def test_load_results_merges_files(tmp_path):
    env = results.environment()
    results.save_results(results.results_frame([_row("a"), _row("b")]), env, tmp_path / "one", {})
    results.save_results(results.results_frame([_row("c", extra_metric=1.0)]), {**env, "cpu": "other"},
                         tmp_path / "two", {"c": ["images/c/000.png"]})
    df, envs = results.load_results([tmp_path / "one" / "results.json", tmp_path / "two"])
    assert list(df["variant"]) == ["a", "b", "c"] and len(envs) == 2 and envs[1]["cpu"] == "other"
    assert df["source"].nunique() == 2 and list(df.columns[:3]) == ["variant", "model", "backend"]
    assert results.images_index(tmp_path / "two")["c"][0] == tmp_path / "two" / "images/c/000.png"
    with pytest.raises(SdwbError, match="results file not found"):
        results.load_results([tmp_path / "missing.json"])


# --------------------------------------------------------------------------- run_bench


def test_unusable_backend_fails_before_anything_is_written(tmp_path, tiny_pipeline_dir):
    """An onnxruntime row in bf16 is refused up front (exports are fp32); more in test_backends.py."""
    from bench.harness import run_bench

    config = quick_config([str(tiny_pipeline_dir)], backend="onnxruntime", dtype="bf16")
    with pytest.raises(SdwbError, match="dtype bf16 with backend onnxruntime"):
        run_bench(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_nan_output_is_a_one_line_error_naming_the_variant(tmp_path):
    import torch

    from bench.harness import run_bench
    from sdwb.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=1)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "nan-model")
    config = quick_config([str(tmp_path / "nan-model")], steps=1, repeats=1, metrics=["latency"])
    with pytest.raises(SdwbError, match="variant nan-model: generation produced NaN") as info:
        run_bench(config, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out" / "results.json").exists()


def test_interrupt_keeps_measured_rows_and_earlier_results(tmp_path, tiny_pipeline_dir, judge_dir,
                                                            monkeypatch):
    """Ctrl-C during the memory phase: rows measured so far land in results.partial.*, while the
    results, images and resolved config of an earlier complete run stay as they were."""
    from bench import harness

    out = tmp_path / "out"
    results.save_results(results.results_frame([_row("old")]), {}, out, {"old": ["images/old/000.png"]})
    (out / "images" / "old").mkdir(parents=True)
    (out / "images" / "old" / "000.png").write_bytes(b"old image")
    (out / "config.resolved.yaml").write_text("old: config\n")
    config = quick_config([str(tiny_pipeline_dir)], steps=1, n_prompts=2, repeats=2, judge=str(judge_dir),
                          metrics=["latency", "memory", "quality"])

    def interrupted_probe(scenario, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(memory, "run_probe", interrupted_probe)
    with pytest.raises(KeyboardInterrupt):
        harness.run_bench(config, out, progress=False)
    assert pd.read_csv(out / "results.csv")["variant"].tolist() == ["old"]
    assert (out / "images" / "old" / "000.png").read_bytes() == b"old image"
    assert (out / "config.resolved.yaml").read_text() == "old: config\n"
    partial = json.loads((out / "results.partial.json").read_text())
    assert not partial["complete"] and partial["rows"][0]["e2e_s_median"] > 0
    (files,) = partial["images"].values()
    assert len(files) == 2 and all((out / f).is_file() for f in files)


def test_sdwb_bench_end_to_end(tmp_path, tiny_pipeline_dir, judge_dir, monkeypatch):
    """CLI -> config -> 3 variants (fp32 baseline, bf16, one where quality does not apply)."""
    import typer
    from typer.testing import CliRunner

    import sdwb.loading
    from sdwb.app.bench_cli import bench_command
    from sdwb.loading import load_pipeline

    def fake_load(spec, **kwargs):  # builtin:sd15-arch is stood in for by the tiny pipeline (quality n/a)
        return load_pipeline(str(tiny_pipeline_dir) if spec == "builtin:sd15-arch" else spec, **kwargs)

    monkeypatch.setattr(sdwb.loading, "load_pipeline", fake_load)
    quality = ["quality"] if HAVE_QUALITY else []
    config = write_yaml(tmp_path / "e2e.yaml", {
        "defaults": {"steps": 2, "n_prompts": 2, "warmup": 1, "repeats": 2, "threads": 1,
                     "judge": str(judge_dir), "metrics": ["latency", *quality]},
        "variants": [
            {"name": "fp32", "model": str(tiny_pipeline_dir), "metrics": ["latency", "memory", *quality]},
            {"name": "bf16", "model": str(tiny_pipeline_dir), "dtype": "bf16"},
            {"name": "arch", "model": "builtin:sd15-arch"},
        ],
    })
    app = typer.Typer()
    app.command()(bench_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the sub-command name
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench-command", str(config), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "fp32" in result.output and "results.csv" in result.output
    df = pd.read_csv(out / "results.csv").set_index("variant")
    assert list(df.index) == ["fp32", "bf16", "arch"]
    assert (df["unet_calls"] == 2).all() and (df["unet_batch"] == 2).all() and (df["threads"] == 1).all()
    assert (df["e2e_s_p10"] <= df["e2e_s_median"]).all() and (df["e2e_s_median"] <= df["e2e_s_p90"]).all()
    assert df.loc["fp32", "peak_rss_mb"] > 0 and df.loc["fp32", "unet_gmacs"] > 0
    assert pd.isna(df.loc["bf16", "peak_rss_mb"])  # memory not requested for bf16
    assert df.loc["fp32", "size_mb"] > 0 and pd.isna(df.loc["arch", "size_mb"])
    assert all(pd.isna(df.loc["arch", c]) for c in QUALITY_COLUMNS)
    from sdwb.variants.files import weight_files, weights_digest  # which weights each row measured

    digest = weights_digest(tiny_pipeline_dir, weight_files(tiny_pipeline_dir))
    assert df.loc["fp32", "weights_sha256"] == df.loc["bf16", "weights_sha256"] == digest
    assert df.loc["arch", "weights_sha256"] == "built in code"
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] and not (out / "results.partial.json").exists()
    assert (out / "config.resolved.yaml").is_file() and data["environment"]["libraries"]["torch"]
    from importlib.util import find_spec  # every engine the row could have run names its version

    libs = data["environment"]["libraries"]
    assert {"onnxruntime", "openvino", "nncf", "torchao"} <= set(libs)
    assert (libs["openvino"] is not None) == (find_spec("openvino") is not None)
    if HAVE_QUALITY:
        assert "not applicable" in df.loc["arch", "quality_note"]
        # measured, not placeholders: the CLIP score inside its interval, an accuracy of 2 images
        fp32 = df.loc["fp32"]
        assert fp32["clip_score_lo"] <= fp32["clip_score"] <= fp32["clip_score_hi"]
        assert df.loc["bf16", "color_acc"] in (0.0, 0.5, 1.0)
        assert pd.isna(df.loc["fp32", "psnr_vs_baseline"]) and df.loc["bf16", "psnr_vs_baseline"] > 10
        assert data["images"]["bf16"] == ["images/bf16/000.png", "images/bf16/001.png"]
        assert all((out / p).is_file() for files in data["images"].values() for p in files)
