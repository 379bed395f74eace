"""LoRA adapters (sdwb.lora, sdwb lora train / fuse, --lora): what an adapter does must survive
every route exactly where the maths says it does, and every wrong input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.prune import prune
from compress.prune_config import parse_prune_config
from sdwb.errors import SdwbError
from sdwb.lora import WEIGHTS_NAME, read_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    args = {"sample": torch.randn(2, 4, 16, 16, generator=gen), "timestep": torch.tensor([500, 20]),
            "encoder_hidden_states": torch.randn(2, 32, 32, generator=gen)}
    with torch.no_grad():
        return unet(**args).sample


def write_adapter(pipe_dir, out, *, zero_b: bool, seed: int = 0):
    """A rank-4 adapter for the tiny pipeline's attention projections, saved as diffusers does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdwb.loading import load_pipeline

    unet = load_pipeline(str(pipe_dir)).unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    state = get_peft_model_state_dict(unet)
    for key, tensor in state.items():
        if "lora_B" in key:
            tensor.zero_() if zero_b else tensor.normal_(0, 0.2)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    return str(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def zero_lora(tiny, tmp_path_factory):
    return str(write_adapter(tiny, tmp_path_factory.mktemp("lora") / "zero", zero_b=True))


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    return str(write_adapter(tiny, tmp_path_factory.mktemp("lora") / "random", zero_b=False))


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    """The tiny pipeline pruned at 0.5 (magnitude channels + heads, no recovery): its weights are slices."""
    out = tmp_path_factory.mktemp("prune") / "p50"
    prune(tiny, parse_prune_config({"ratio": 0.5}, "test"), out)
    return str(out)


# --------------------------------------------------------------------------- the kept channels


def test_recording_composes_the_kept_indices_of_every_slice():
    import torch_pruning as tp

    from sdwb.variants.kept import recording

    torch.manual_seed(0)
    parent = nn.Sequential(nn.Linear(12, 10))
    weight = parent[0].weight.detach().clone()
    with recording(parent) as kept:
        tp.prune_linear_out_channels(parent[0], [1, 2])  # rows 0, 3..9 left
        tp.prune_linear_out_channels(parent[0], [1])  # of those, the second (row 3) goes
        tp.prune_linear_in_channels(parent[0], [0, 11])
    rows, cols = [0, 4, 5, 6, 7, 8, 9], list(range(1, 11))
    assert kept == {"0": {"out": rows, "in": cols}}
    assert torch.equal(parent[0].weight, weight[rows][:, cols])
    tp.prune_linear_in_channels(parent[0], [0])  # outside the block: not recorded
    assert kept["0"]["in"] == cols


def test_prune_records_the_kept_channels_of_every_resized_linear(pruned):
    from sdwb.loading import load_pipeline
    from sdwb.variants.kept import find_kept
    from sdwb.variants.record import read_record

    kept = find_kept(read_record(pruned))
    unet = load_pipeline(pruned).unet
    resized = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n in kept}
    assert resized and any(n.endswith("to_q") for n in resized)
    for name in resized:
        layer = dict(unet.named_modules())[name]
        if "in" in kept[name]:
            assert len(kept[name]["in"]) == layer.in_features
        if "out" in kept[name]:
            assert len(kept[name]["out"]) == layer.out_features


def test_the_kept_channels_of_the_fp16_stored_tiny_shapes_are_recorded(tmp_path):
    """builtin:tiny-shapes stores fp16 weights, whose values repeat: the record must not depend on them."""
    from sdwb.loading import load_pipeline
    from sdwb.variants.kept import find_kept
    from sdwb.variants.record import read_record

    parent = dict(load_pipeline("builtin:tiny-shapes").unet.named_modules())
    prune("builtin:tiny-shapes", parse_prune_config({"ratio": 0.3}, "test"), tmp_path / "p")
    kept = find_kept(read_record(tmp_path / "p"))
    child = dict(load_pipeline(str(tmp_path / "p")).unet.named_modules())
    assert any(name.endswith("to_q") for name in kept)
    for name, rows in kept.items():
        w = parent[name].weight
        w = w[rows["out"]] if "out" in rows else w
        w = w[:, rows["in"]] if "in" in rows else w
        assert torch.equal(w, child[name].weight), name  # no recovery: the pruned weight is that slice


# --------------------------------------------------------------------------- zero B: every route exact


def test_zero_b_lora_reproduces_the_base_model_through_every_torch_route(tiny, pruned, zero_lora, tmp_path):
    from compress.lora_fuse import fuse_variant
    from compress.quantize import quantize
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import parse_quant_config

    for model in (tiny, pruned):
        base = unet_out(load_pipeline(model).unet)
        unfused = load_pipeline(model, lora=zero_lora)
        assert unfused.sdwb_lora["route"] == "unfused" and unfused.sdwb_lora["pairs_dropped"] == 0
        assert torch.equal(unet_out(unfused.unet), base)
        assert torch.equal(unet_out(load_pipeline(model, lora=zero_lora, fuse_lora=True).unet), base)
        fused_dir = tmp_path / f"fused-{len(str(model))}"
        fuse_variant(model, zero_lora, fused_dir)
        assert torch.equal(unet_out(load_pipeline(str(fused_dir)).unet), base)
    config = parse_quant_config({"method": "torch-int8-dynamic", "guard": {"prompts": 2, "steps": 3}}, "test")
    plain = quantize(tiny, config, tmp_path / "q-plain")
    fused_q = quantize(str(tmp_path / f"fused-{len(str(tiny))}"), config, tmp_path / "q-fused")
    quantized = [unet_out(load_pipeline(str(v.path)).unet) for v in (fused_q, plain)]
    assert torch.equal(quantized[0], quantized[1])


@pytest.mark.slow
def test_zero_b_lora_fused_export_matches_the_base_export(tiny, zero_lora, tiny_onnx_dir, tmp_path):
    from compress.lora_fuse import fuse_variant
    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

    fuse_variant(tiny, zero_lora, tmp_path / "fused")
    export_onnx(str(tmp_path / "fused"), tmp_path / "onnx")
    gen = torch.Generator().manual_seed(0)
    feed = {"sample": torch.randn(1, 4, 16, 16, generator=gen), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 32, 32, generator=gen)}
    outs = [OrtStableDiffusionPipeline.from_export(d, threads=1).run_component("unet", **feed)
            for d in (tiny_onnx_dir, tmp_path / "onnx")]
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- pruning: the projection


def test_projected_lora_on_the_pruned_model_equals_pruning_the_fused_weights(tiny, pruned, lora):
    from sdwb.loading import load_pipeline
    from sdwb.variants.kept import find_kept
    from sdwb.variants.record import read_record

    kept = find_kept(read_record(pruned))
    fused = dict(load_pipeline(tiny, lora=lora, fuse_lora=True).unet.named_modules())
    with_lora = load_pipeline(pruned, lora=lora)  # unfused, projected at load
    expected = load_pipeline(pruned).unet  # rebuilt: pruned shapes; weights set to prune(fused) below
    with torch.no_grad():
        for name, layer in expected.named_modules():
            if isinstance(layer, nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") \
                    and "attn" in name:
                w = fused[name].weight
                rows = kept.get(name, {})
                w = w[rows["out"]] if "out" in rows else w
                w = w[:, rows["in"]] if "in" in rows else w
                layer.weight.copy_(w)
    got, want = unet_out(with_lora.unet), unet_out(expected)
    assert not torch.equal(got, unet_out(load_pipeline(pruned).unet))  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_pruned_model_without_recorded_channels_refuses_the_adapter(pruned, lora, tmp_path):
    import shutil

    from sdwb.loading import load_pipeline
    from sdwb.variants.record import RECORD

    old = tmp_path / "old-prune"
    shutil.copytree(pruned, old)
    record = json.loads((old / RECORD).read_text())
    record["architecture"].pop("kept")
    (old / RECORD).write_text(json.dumps(record))
    with pytest.raises(SdwbError) as exc:
        load_pipeline(str(old), lora=lora)
    assert "re-run the prune" in one_line(exc)


# --------------------------------------------------------------------------- quantization, fusing


def test_fused_then_quantized_variant_reloads_and_generates(tiny, lora, tmp_path):
    from compress.lora_fuse import fuse_variant
    from compress.quantize import quantize
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import parse_quant_config

    record = fuse_variant(tiny, lora, tmp_path / "fused", scale=0.5)
    assert record["stage"] == "lora" and record["lora"]["scale"] == 0.5
    assert record["lora"]["sha256"] == read_adapter(lora).sha256
    config = parse_quant_config({"method": "torch-int8-dynamic", "guard": {"prompts": 2, "steps": 3}}, "test")
    variant = quantize(str(tmp_path / "fused"), config, tmp_path / "int8")
    pipe = load_pipeline(str(variant.path))
    image = np.asarray(generate(pipe, ["a small red circle at the top on a gray background"], steps=2,
                                progress=False)[0])
    assert image.shape == (32, 32, 3) and image.std() > 0
    with pytest.raises(SdwbError) as exc:  # the float weights are gone: fuse before quantizing
        load_pipeline(str(variant.path), lora=lora)
    assert "fuse it first" in one_line(exc)
    from bench.harness import identity_columns  # a results row names the chain that made it
    from sdwb.variants.files import weight_files
    from sdwb.variants.record import read_record

    columns = identity_columns(variant.path, weight_files(variant.path))
    stages = [part.split(" <- ")[0] for part in columns["lineage"].split(" | ")]
    assert stages == ["quantize torch-int8-dynamic", "lora fuse"] and len(columns["weights_sha256"]) == 64
    # each link names its parent's weights by the digest a bench row of the parent records
    fused = identity_columns(tmp_path / "fused", weight_files(tmp_path / "fused"))["weights_sha256"]
    base = identity_columns(Path(tiny), weight_files(Path(tiny)))["weights_sha256"]
    links = columns["lineage"].split(" | ")
    assert f"[{fused[:12]}]" in links[0] and f"[{base[:12]}]" in links[1] and fused != base
    assert read_record(variant.path)["parent"]["weights_sha256"] == fused


def test_unfused_and_fused_loading_agree_and_scale_zero_is_the_base(tiny, lora):
    from sdwb.loading import load_pipeline

    base = unet_out(load_pipeline(tiny).unet)
    unfused = unet_out(load_pipeline(tiny, lora=lora, lora_scale=0.7).unet)
    fused = unet_out(load_pipeline(tiny, lora=lora, lora_scale=0.7, fuse_lora=True).unet)
    assert not torch.allclose(unfused, base, atol=1e-4)
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-5)
    assert torch.equal(unet_out(load_pipeline(tiny, lora=lora, lora_scale=0.0).unet), base)


# --------------------------------------------------------------------------- lora train


def test_lora_train_lowers_its_loss_and_the_adapter_loads_in_plain_diffusers(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdwb.loading import load_pipeline
    from sdwb.train.lora import LoraTrainConfig, train_lora

    out = tmp_path / "trained"
    cfg = LoraTrainConfig(rank=2, steps=30, batch=8, latent_pool=32, warmup=0, lr=5e-3)
    record = train_lora(tiny, cfg, out, progress=False)
    assert (out / WEIGHTS_NAME).is_file() and not (out.with_name("trained.work")).exists()
    assert record["sha256"] == read_adapter(str(out)).sha256
    assert record["base"]["unet_weights"]  # which weights it was trained on, by hash
    plain = StableDiffusionPipeline.from_pretrained(tiny, safety_checker=None, requires_safety_checker=False)
    base = unet_out(plain.unet)
    plain.load_lora_weights(str(out))
    ours = load_pipeline(tiny, lora=str(out))
    assert not torch.allclose(unet_out(plain.unet), base, atol=1e-5)  # trained: B is no longer zero
    torch.testing.assert_close(unet_out(plain.unet), unet_out(ours.unet), rtol=1e-5, atol=1e-6)


def test_lora_train_resumes_only_a_run_of_its_own_config(tiny, tmp_path):
    from sdwb.runs import prepare_work_dir
    from sdwb.train.lora import LoraTrainConfig, train_lora

    other = LoraTrainConfig(rank=2, steps=5, batch=4, latent_pool=8)
    prepare_work_dir(tmp_path / "a.work", {"config": other.model_dump(), "source": "x"}, "LoRA training")
    with pytest.raises(SdwbError) as exc:  # an interrupted run of another config: never mixed in
        train_lora(tiny, LoraTrainConfig(rank=4, steps=5, batch=4, latent_pool=8), tmp_path / "a",
                   progress=False)
    assert "another config" in one_line(exc) and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_lora_train_loss_falls(tiny, tmp_path):
    from sdwb.train.lora import LoraTrainConfig, train_lora

    first = train_lora(tiny, LoraTrainConfig(rank=4, steps=2, batch=8, latent_pool=32, warmup=0, lr=5e-3),
                       tmp_path / "a", progress=False)
    longer = train_lora(tiny, LoraTrainConfig(rank=4, steps=60, batch=8, latent_pool=32, warmup=0, lr=5e-3),
                        tmp_path / "b", progress=False)
    assert longer["metrics"]["final_loss_smoothed"] < first["metrics"]["final_loss_smoothed"]


# --------------------------------------------------------------------------- bad input


def test_bad_adapters_are_one_line_errors(tiny, lora, tmp_path):
    from safetensors.torch import save_file

    from sdwb.loading import load_pipeline

    cases = {}
    cases["missing"] = str(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    cases["no weights file"] = str(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    cases["corrupt"] = str(tmp_path / "corrupt")
    (tmp_path / "foreign").mkdir()
    save_file({"model.layer.weight": torch.zeros(2, 2)}, tmp_path / "foreign" / WEIGHTS_NAME)
    cases["not a LoRA"] = str(tmp_path / "foreign")
    (tmp_path / "half").mkdir()
    state = read_adapter(lora).state
    save_file({k: v for k, v in state.items() if "lora_A" in k}, tmp_path / "half" / WEIGHTS_NAME)
    cases["A without B"] = str(tmp_path / "half")
    (tmp_path / "nan").mkdir()
    save_file({k: v.clone().fill_(float("nan")) for k, v in state.items()}, tmp_path / "nan" / WEIGHTS_NAME)
    cases["NaN"] = str(tmp_path / "nan")
    cases["builtin that is not a LoRA"] = "builtin:tiny-shapes"
    for what, spec in cases.items():
        with pytest.raises(SdwbError) as exc:
            load_pipeline(tiny, lora=spec)
        assert one_line(exc), what


def test_an_adapter_for_another_architecture_is_refused(lora):
    from sdwb.loading import load_pipeline

    with pytest.raises(SdwbError) as exc:
        load_pipeline("builtin:tiny-shapes", lora=lora)
    assert "another architecture" in one_line(exc) or "does not have" in one_line(exc)


def test_cli_lora_on_an_export_is_refused_before_work(tiny_onnx_dir, lora, tmp_path, capsys):
    from sdwb.app import cli

    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "-m", str(tiny_onnx_dir), "-p", "a red circle", "-o", str(out), "--lora", lora])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "fuse the LoRA" in err and not out.exists()
    assert "Traceback" not in err


# --------------------------------------------------------------------------- recipes


def test_a_recipe_lora_stage_fuses_and_its_key_follows_the_adapter(tiny, pruned, lora, zero_lora, tmp_path):
    from sdwb.app.recipe_run import plan, run_recipe
    from sdwb.app.recipe_schema import recipe_from_dict
    from sdwb.loading import load_pipeline

    def recipe(adapter: str):
        return recipe_from_dict({"name": "lora", "model": pruned, "stages": [
            {"kind": "lora", "lora": adapter, "scale": 0.5},
            {"kind": "quantize", "method": "torch-int8-dynamic", "guard": {"prompts": 1, "steps": 2}}]})

    store = tmp_path / "store"
    result = run_recipe(recipe(lora), store=store, run_root=tmp_path / "runs", progress=False)
    fused = result.stages[0].out
    record = json.loads((fused / "sdwb.json").read_text())
    assert record["stage"] == "lora" and record["lora"]["scale"] == 0.5
    want = unet_out(load_pipeline(pruned, lora=lora, lora_scale=0.5).unet)  # projected + fused = unfused
    torch.testing.assert_close(unet_out(load_pipeline(str(fused)).unet), want, rtol=1e-4, atol=1e-5)
    assert (result.stages[1].out / "sdwb.json").is_file()
    import shutil

    same_path = tmp_path / "adapter"
    shutil.copytree(lora, same_path)
    before = plan(recipe(str(same_path)), store)[0].key
    shutil.copy(Path(zero_lora) / WEIGHTS_NAME, same_path / WEIGHTS_NAME)  # new weights, same path
    assert plan(recipe(str(same_path)), store)[0].key != before  # another stage, not a cached one


# --------------------------------------------------------------------------- the table tool


def test_lora_table_measures_every_route_and_the_float_reference_retains_all(tiny, lora, tmp_path):
    from compress.lora_fuse import fuse_variant
    from tools.lora_table import main

    fuse_variant(tiny, lora, tmp_path / "fused")
    out = tmp_path / "table"
    main(["--out", str(out), "--lora", lora, "--prompts", "3", "--steps", "2", "--batch", "3",
          "--grid", "1", "--variant", f"float={tiny}",
          "--variant", f"fused-copy={tiny},fused={tmp_path / 'fused'}"])
    result = json.loads((out / "results.json").read_text())
    rows = {(r["variant"], r["with_lora"]): r for r in result["rows"]}
    assert rows[("float", True)]["route"] == "runtime" and rows[("fused-copy", True)]["route"] == "fused"
    reference = rows[("float", True)]
    assert reference["lora_retained"] == 1.0 and reference["psnr_identical_share"] == 1
    fused = rows[("fused-copy", True)]  # the fused variant draws what unfused loading draws
    assert fused["lora_retained_lo"] > 0.99 and fused["psnr_vs_float_lora"] > 40
    assert result["lora"]["sha256"] == read_adapter(lora).sha256 and len(result["models"]) == 2
    assert "| float | runtime |" in (out / "table.md").read_text() and (out / "grid.png").is_file()
