"""Training-free acceleration (``sdwb compress cache``): DeepCache and Token Merging as variants.

What is held here: DeepCache at interval 1 is the plain model bit for bit, at interval N the deep
blocks run only every N-th step of each generation (counted with forward hooks, CFG batches of 2B)
and generations share nothing; ToMe at ratio 0 is the plain model, seeded ToMe is reproducible;
a cache variant saves, reloads with its method applied (``load_pipeline``, ``sdwb generate``),
records it, is counted honestly by the benchmark; bad configs and unsupported combinations are
one-line errors.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sdwb.cache.config import applied, apply_cache, parse_cache_config, remove_cache
from sdwb.errors import SdwbError

PROMPTS = ["a small red circle at the top on a gray background", "a large blue square on a white background"]


def sdwb(capsys, *args) -> tuple[int, str, str]:
    """Run ``sdwb ARGS`` in this process: (exit code, stdout, stderr)."""
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def images(pipe, steps=4, prompts=PROMPTS, batch=2, **kw) -> np.ndarray:
    from sdwb.generate import generate

    return np.stack([np.asarray(i) for i in generate(pipe, prompts, steps=steps, batch=batch,
                                                     progress=False, **kw)]).astype(np.float64)


def cfg(**data):
    return parse_cache_config(data)


@pytest.fixture(scope="module")
def tiny():
    from sdwb.loading import load_pipeline

    return load_pipeline("builtin:tiny-shapes")


@pytest.fixture(scope="module")
def plain(tiny):
    return images(tiny)


@pytest.fixture
def cached(tiny):
    """Apply a method to the shared tiny-shapes pipeline for one test, removed afterwards."""
    def use(**data):
        apply_cache(tiny, cfg(**data))
        return tiny

    yield use
    remove_cache(tiny)


def count_calls(module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --------------------------------------------------------------------------- DeepCache


def test_deepcache_interval_1_is_the_plain_model(cached, plain):
    pipe = cached(method="deepcache", interval=1)
    assert np.array_equal(images(pipe), plain)
    assert pipe.sdwb_cache.counts == {"full": 4, "shallow": 0}


def test_deepcache_runs_the_deep_blocks_every_nth_step_per_generation(cached, plain):
    pipe = cached(method="deepcache", interval=3)
    unet = pipe.unet
    deep = {"mid": count_calls(unet.mid_block.resnets[0]),
            "down": count_calls(unet.down_blocks[-1].resnets[0]),
            "up": count_calls(unet.up_blocks[0].resnets[0])}
    shallow = count_calls(unet.conv_in)
    batches = []
    unet.conv_in.register_forward_hook(lambda _m, args, _o: batches.append(args[0].shape[0]))
    first = images(pipe, steps=7)  # steps 0, 3, 6 full; CFG: one call of 2 x 2 latents per step
    assert {k: len(v) for k, v in deep.items()} == {"mid": 3, "down": 3, "up": 3}
    assert len(shallow) == 7 and set(batches) == {4}
    assert pipe.sdwb_cache.counts == {"full": 3, "shallow": 4}
    second = images(pipe, steps=7)  # a new generation starts full: nothing of the first is reused
    assert len(deep["mid"]) == 6 and np.array_equal(first, second)
    one_by_one = images(pipe, steps=4, batch=1)  # other latent shapes: each chunk its own schedule
    assert len(deep["mid"]) == 6 + 2 * 2 and np.isfinite(one_by_one).all()
    reused = images(pipe)  # 4 steps: full, shallow, shallow, full
    assert not np.array_equal(reused, plain)
    mse = ((reused - plain) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 20  # an approximation of the same images, not noise


def test_deepcache_deeper_branch_recomputes_more(cached, tiny):
    from sdwb.cache.deepcache import branch_count

    assert branch_count(tiny.unet) == 6  # tiny-shapes: 3 up blocks of 2 resnets
    up = tiny.unet.up_blocks
    # a reused module is still called (its cached output returned): count what runs inside it
    layers = {"up0.r0": up[0].resnets[0].conv1, "up1.r0": up[1].resnets[0].conv1,
              "up1.r1": up[1].resnets[1].conv1,
              "down1.downsampler": tiny.unet.down_blocks[1].downsamplers[0].conv}
    calls = {name: count_calls(m) for name, m in layers.items()}
    # branch 2 = the 2nd block from the top, its last layer: the up block's last resnet runs each step
    images(cached(method="deepcache", interval=2, branch=2))
    assert {k: len(v) for k, v in calls.items()} == {"up0.r0": 2, "up1.r0": 2, "up1.r1": 4,
                                                    "down1.downsampler": 2}
    remove_cache(tiny)
    for v in calls.values():
        v.clear()
    images(cached(method="deepcache", interval=2, branch=3))  # one layer deeper: both resnets of that block
    assert {k: len(v) for k, v in calls.items()} == {"up0.r0": 2, "up1.r0": 4, "up1.r1": 4,
                                                    "down1.downsampler": 2}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_deepcache_on_the_families(family):
    from sdwb.cache.deepcache import branch_count

    if family == "sdxl":
        from sdwb.sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(tiny=True)
    else:
        from sdwb.testing import build_family_pipeline

        pipe = build_family_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    kw = {"steps": 3, "prompts": PROMPTS[:1], "batch": 1}
    base = images(pipe, **kw)
    per_block = pipe.unet.config.layers_per_block + 1  # 3 on the real SD 1.x / 2.x / SDXL (DeepCache's)
    assert branch_count(pipe.unet) == per_block * len(pipe.unet.up_blocks)
    apply_cache(pipe, cfg(method="deepcache", interval=1))
    assert np.array_equal(images(pipe, **kw), base)
    remove_cache(pipe)
    apply_cache(pipe, cfg(method="deepcache", interval=2, branch=2))
    mid = count_calls(pipe.unet.mid_block)
    deep = count_calls(pipe.unet.mid_block.resnets[0])
    out = images(pipe, **kw)
    assert np.isfinite(out).all() and len(mid) == 3 and len(deep) == 2


# --------------------------------------------------------------------------- ToMe


def test_tome_ratio_0_is_the_plain_model_and_seeded_merging_is_reproducible(cached, plain, tiny):
    from sdwb.cache.tome import transformer_blocks

    assert {f for _, f in transformer_blocks(tiny.unet)} == {2, 4}  # 8x8 and 4x4 tokens at 16x16 latents
    pipe = cached(method="tomesd", ratio=0.0, max_downsample=4)
    assert np.array_equal(images(pipe), plain)
    remove_cache(pipe)
    pipe = cached(method="tomesd", ratio=0.5, max_downsample=2, use_rand=True, seed=3)
    a, b = images(pipe), images(pipe)
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


def test_tome_ratio_0_on_an_sd1_unet_with_full_resolution_attention():
    from sdwb.testing import build_family_pipeline

    pipe = build_family_pipeline("sd1")  # attention at downsample 1: 16 x 16 = 256 tokens
    pipe.set_progress_bar_config(disable=True)
    kw = {"steps": 2, "prompts": PROMPTS[:1], "batch": 1}
    base = images(pipe, **kw)
    apply_cache(pipe, cfg(method="tomesd", ratio=0.0))
    assert np.array_equal(images(pipe, **kw), base)
    remove_cache(pipe)
    apply_cache(pipe, cfg(method="tomesd", ratio=0.5, use_rand=False))
    merged = images(pipe, **kw)
    assert np.isfinite(merged).all() and not np.array_equal(merged, base)


def test_tome_refuses_unets_without_tokens_to_merge(tiny):
    from sdwb.testing import build_family_pipeline

    with pytest.raises(SdwbError, match=r"max_downsample 1: no transformer block .* downsample 2, 4"):
        apply_cache(tiny, cfg(method="tomesd", ratio=0.5))  # tiny-shapes' top level has no attention
    assert applied(tiny) is None
    plain_unet = build_family_pipeline("sd1", down_block_types=("DownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "UpBlock2D"),
                                       mid_block_type="UNetMidBlock2D")
    with pytest.raises(SdwbError, match="no transformer blocks"):
        apply_cache(plain_unet, cfg(method="tomesd", ratio=0.5, max_downsample=8))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("data, message", [
    ({"method": "deepcache", "intervall": 3}, "intervall: unknown key (allowed: method, interval, branch)"),
    ({"method": "deepcache", "interval": 0}, "interval"),
    ({"method": "deepcache", "interval": "3"}, "interval"),
    ({"method": "tomesd", "ratio": 0.8}, "ratio 0.8: at most 1 - 1/(sx*sy) = 0.75"),
    ({"method": "tomesd", "max_downsample": 3}, "max_downsample"),
    ({"method": "deepcash"}, "unknown method 'deepcash' (expected one of deepcache, tomesd)"),
    ({"interval": 3}, "method: required key is missing"),
])
def test_bad_configs_are_one_line_errors(data, message):
    with pytest.raises(SdwbError) as info:
        parse_cache_config(data, "x.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_example_configs_parse():
    from pathlib import Path

    from sdwb.cache.config import load_cache_config

    root = Path(__file__).resolve().parents[1] / "configs" / "cache"
    assert load_cache_config(root / "deepcache.yaml").interval == 3
    assert load_cache_config(root / "tomesd.yaml", ["ratio=0.25"]).ratio == 0.25


# --------------------------------------------------------------------------- variants


@pytest.fixture(scope="module")
def deepcache_dir(tmp_path_factory):
    from compress.cache import make_cache_variant

    out = tmp_path_factory.mktemp("cache") / "dc2"
    make_cache_variant("builtin:tiny-shapes", cfg(method="deepcache", interval=2), out)
    return out


def test_a_cache_variant_reloads_with_its_method_and_records_it(deepcache_dir, cached, tmp_path, capsys):
    from sdwb.loading import load_pipeline

    record = json.loads((deepcache_dir / "sdwb.json").read_text())
    assert record["stage"] == "cache" and record["method"] == "deepcache" and record["backend"] == "torch"
    assert record["config"] == {"method": "deepcache", "interval": 2, "branch": 0}
    assert record["parent"]["spec"] == "builtin:tiny-shapes" and "unet/diffusion_pytorch_model.safetensors" \
        in record["files"]
    loaded = load_pipeline(str(deepcache_dir))
    assert applied(loaded) == cfg(method="deepcache", interval=2)
    expected = images(cached(method="deepcache", interval=2), prompts=PROMPTS[:1], batch=1)
    assert np.array_equal(images(loaded, prompts=PROMPTS[:1], batch=1), expected)
    code, out, err = sdwb(capsys, "generate", "--model", deepcache_dir, "-p", PROMPTS[0], "--steps", 4,
                          "-o", tmp_path / "x.png", "--no-progress")
    assert code == 0, err
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")).astype(np.float64), expected[0])


def test_compress_cache_cli_and_its_refusals(deepcache_dir, tmp_path, capsys):
    code, out, err = sdwb(capsys, "compress", "cache", "--method", "tomesd", "--set", "max_downsample=2",
                          "-o", tmp_path / "tome")
    assert code == 0, err
    assert "tomesd: ratio 0.5, max_downsample 2" in out
    assert json.loads((tmp_path / "tome" / "sdwb.json").read_text())["config"]["max_downsample"] == 2

    def refused(*args) -> str:
        code, _, err = sdwb(capsys, *args)  # status lines ([  0 s] loading ...) may come first
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0], (code, err)
        return errors[0]

    assert "intervall: unknown key" in refused("compress", "cache", "--method", "deepcache", "--set",
                                               "intervall=2", "-o", tmp_path / "x")
    assert "give --method" in refused("compress", "cache", "-o", tmp_path / "x")
    assert "branch 6: this UNet has 6 skip branches" in refused(
        "compress", "cache", "--method", "deepcache", "--set", "branch=6", "-o", tmp_path / "x")
    assert "already a cache variant (deepcache)" in refused(
        "compress", "cache", "--model", deepcache_dir, "--method", "tomesd", "-o", tmp_path / "x")
    assert "runs on the torch backend only; --backend onnxruntime" in refused(
        "generate", "--model", deepcache_dir, "--backend", "onnxruntime", "-p", "x", "-o", tmp_path / "x.png")
    assert "1 denoising step leaves no step to reuse" in refused(
        "generate", "--model", deepcache_dir, "--steps", 1, "-p", "x", "-o", tmp_path / "x.png",
        "--no-progress")
    assert "compress the model it was made from (builtin:tiny-shapes)" in refused(
        "compress", "quantize", "--model", deepcache_dir, "--method", "torch-int8-dynamic",
        "-o", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"format": "sdwb-onnx"}))
    assert "an ONNX / OpenVINO export" in refused("compress", "cache", "--model", export,
                                                 "--method", "deepcache", "-o", tmp_path / "x")


def test_export_compile_and_bench_backends_refuse_a_cache_variant(deepcache_dir, cached):
    from export.onnx import export_onnx
    from sdwb.torch_compile import compile_unet

    with pytest.raises(SdwbError, match="export onnx takes the model it was made from"):
        export_onnx(str(deepcache_dir), deepcache_dir.parent / "onnx")
    with pytest.raises(SdwbError, match="torch.compile with a deepcache variant"):
        compile_unet(cached(method="deepcache", interval=2))
    from bench.harness import _is_export_of

    row = SimpleNamespace(variant="dc", backend="onnxruntime", dtype="fp32", model=str(deepcache_dir))
    with pytest.raises(SdwbError, match="variant dc: .* backend onnxruntime takes the model it was made"):
        _is_export_of(row)


def test_cache_of_a_quantized_variant_keeps_the_quantization(tmp_path):
    from compress.cache import make_cache_variant
    from compress.quantize import quantize
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import parse_quant_config

    q = tmp_path / "int8"
    quantize("builtin:tiny-shapes", parse_quant_config({"method": "torch-int8-dynamic",
                                                        "guard": {"enabled": False}}), q)
    out = tmp_path / "int8-dc"
    make_cache_variant(str(q), cfg(method="deepcache", interval=2), out)
    record = json.loads((out / "sdwb.json").read_text())
    assert record["parent"]["variant"]["stage"] == "quantize" and "re-applied on load" in record["weights"]
    pipe = load_pipeline(str(out))
    assert applied(pipe).interval == 2
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in pipe.unet.modules())
    assert np.isfinite(images(pipe, steps=3, prompts=PROMPTS[:1], batch=1)).all()


# --------------------------------------------------------------------------- bench


def test_bench_counts_full_and_shallow_unet_calls(cached):
    from bench.latency import RunTiming, summarize, timed_run

    pipe = cached(method="deepcache", interval=3)
    scenario = SimpleNamespace(steps=7, guidance=7.5, seed=0, scheduler="ddim", batch=2, height=None,
                               width=None, device="cpu")
    seconds, threads, calls, unet_batch = timed_run(pipe, scenario, PROMPTS)
    assert len(calls["unet"]) == 3 and len(calls["unet_shallow"]) == 4 and unet_batch == 4
    row = summarize([RunTiming("dc", 0, 0, 2, seconds, threads, calls, unet_batch)])
    assert row["unet_calls"] == 3 and row["unet_shallow_calls"] == 4
    assert row["unet_shallow_ms_per_call"] < row["unet_ms_per_call"]
    remove_cache(pipe)
    *_, calls, _ = timed_run(pipe, scenario, PROMPTS)
    row = summarize([RunTiming("plain", 0, 0, 2, 1.0, 1, calls, 4)])
    assert row["unet_calls"] == 7 and row["unet_shallow_calls"] == 0
    assert row["unet_shallow_ms_per_call"] is None


# --------------------------------------------------------------------------- recipes


def test_recipe_cache_stage_validates_resolves_and_feeds_the_next_stage(tmp_path):
    from sdwb.app.recipe_run import plan
    from sdwb.app.recipe_schema import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-shapes\nstages:\n"
                      "  - {kind: cache, method: deepcache, interval: 2}\n"
                      "  - kind: bench\n    variants: [{name: dc, model: '@input'}]\n")
    loaded = load_recipe(recipe)
    resolved = loaded.stages[0].model_dump(mode="json")
    assert resolved == {"kind": "cache", "method": "deepcache", "interval": 2, "branch": 0}
    cache, bench = plan(loaded, tmp_path / "store")
    assert bench.refs["@input"] == str(cache.out)
    with pytest.raises(SdwbError, match=r"stages\.0: intervall: unknown key") as info:
        load_recipe(recipe, ["stages.0.intervall=3"])
    assert "\n" not in str(info.value)
