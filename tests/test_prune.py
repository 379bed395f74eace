"""Pruning stage: channel and block pruning, recovery by distillation, pickle-free save/load, CLI.

Everything runs on the ~0.3 M-param tiny pipeline (``sdwb.testing``) on the CPU, with a 16-image
latent pool and a handful of recovery steps: the tests check structure and properties (MACs drop,
widths, identical round trip, the distillation loss falls, resumption), not image quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch import nn

from compress.prune import prune
from compress.prune_config import load_prune_config, parse_prune_config, resolved
from sdwb.errors import SdwbError

FAST_DATA = {"latent_pool": 16}
FAST_FT = {"batch": 4, "lr": 2e-3, "warmup": 0, "precision": "fp32", "eval_batches": 1, "task_weight": 0.0}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def cfg(**kw):
    return parse_prune_config(kw, "test")


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


def images(pipe) -> np.ndarray:
    from sdwb.generate import generate

    prompts = ["a small red circle at the top on a gray background"]
    return np.stack([np.asarray(im) for im in generate(pipe, prompts, steps=3, progress=False)])


def width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    return str(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def pruned30(tiny, tmp_path_factory):
    """The tiny pipeline pruned at ratio 0.3 (magnitude, no recovery), saved as a variant."""
    return prune(tiny, cfg(ratio=0.3), tmp_path_factory.mktemp("prune") / "channels-30")


# --------------------------------------------------------------------------- configs


def test_config_errors_are_one_line_and_committed_configs_validate():
    for bad, expected in (({"ratio": 1.5}, "ratio: input should be less than 1"),
                          ({"ratio": 0}, "ratio: input should be greater than 0"),
                          ({"importance": "random"}, "importance:"),
                          ({"finetune": {"stepz": 3}}, "finetune.stepz: unknown key (allowed: steps"),
                          ({"method": "blocks", "ratio": 0.3}, "ratio: used by method 'channels' only"),
                          ({"blocks": ["mid_block"]}, "blocks: used by method 'blocks' only")):
        with pytest.raises(SdwbError) as e:
            parse_prune_config(bad, "x.yaml")
        assert one_line(e).startswith("x.yaml: ") and expected in str(e.value), (bad, str(e.value))
    with pytest.raises(SdwbError, match="all 0"):
        cfg(finetune={"steps": 5, "output_weight": 0.0, "feature_weight": 0.0, "task_weight": 0.0})
    assert "ratio" not in resolved(cfg(method="blocks"))  # the record keeps only the method's keys
    files = sorted(Path(__file__).resolve().parents[1].glob("configs/prune/*.yaml"))
    assert files, "configs/prune/*.yaml missing"
    for f in files:
        config = load_prune_config(f, ["finetune.steps=7"])
        assert config.finetune.steps == 7 and parse_prune_config(resolved(config)) == config


# --------------------------------------------------------------------------- channels


def test_channel_pruning_lowers_macs_keeps_multiples_of_8_and_runs(pruned30):
    from diffusers.models.attention_processor import Attention

    from compress.prune_channels import kept_width
    from sdwb.macs import unet_example_inputs, unet_macs
    from sdwb.testing import build_tiny_pipeline

    assert (kept_width(32, 0.3, 8, 8), kept_width(128, 0.3, 8, 8), kept_width(20, 0.3, 1, 8)) == (24, 88, 14)
    original, unet = build_tiny_pipeline(seed=0).unet, pruned30.pipeline.unet
    macs, params = pruned30.metrics["unet_gmacs"], pruned30.metrics["unet_params_m"]
    assert macs["after"] < 0.75 * macs["before"] and params["after"] < 0.75 * params["before"]
    inputs = unet_example_inputs(pruned30.pipeline)
    assert unet_macs(unet, inputs)["gmacs"] == pytest.approx(macs["after"], rel=1e-4)  # = sdwb bench's
    assert unet_macs(original, inputs)["gmacs"] == pytest.approx(macs["before"], rel=1e-4)
    before = dict(original.named_modules())
    narrower = 0
    for name, layer in unet.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            w0, w1 = width(before[name]), width(layer)
            assert w1 <= w0, name
            assert w0 % 8 or w1 % 8 == 0, f"{name}: {w0} -> {w1} is not a multiple of 8"
            narrower += w1 < w0
        elif isinstance(layer, nn.GroupNorm):
            assert layer.num_channels % layer.num_groups == 0, name
        elif isinstance(layer, Attention):  # whole heads went; the head dimension did not change
            old = before[name]
            assert layer.heads < old.heads
            assert layer.to_q.out_features // layer.heads == old.to_q.out_features // old.heads
    assert narrower >= 10
    # ignored layers (conv_in, conv_out, time embedding) keep their output widths
    assert unet.conv_in.out_channels == original.conv_in.out_channels and unet.conv_out.out_channels == 4
    assert unet.time_embedding.linear_2.out_features == original.time_embedding.linear_2.out_features
    out = unet_out(unet)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_taylor_importance_runs_and_ranks_by_gradients(tiny, pruned30):
    taylor = prune(tiny, cfg(ratio=0.3, importance="taylor", taylor={"batches": 2, "batch": 4},
                             data=FAST_DATA))
    loss = taylor.metrics["pruned"]["taylor_loss"]
    assert np.isfinite(loss) and loss > 0
    magnitude = pruned30.pipeline.unet.state_dict()
    state = taylor.pipeline.unet.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in magnitude.items()}  # same widths
    assert any(not torch.equal(state[k], magnitude[k]) for k in state)  # other channels kept
    assert all(p.grad is None and not p.requires_grad for p in taylor.pipeline.unet.parameters())
    assert torch.isfinite(unet_out(taylor.pipeline.unet)).all()


# --------------------------------------------------------------------------- save / load


def test_variant_round_trip_is_identical_and_pickle_free(pruned30, tiny):
    from sdwb.loading import load_pipeline

    out = pruned30.path
    record = json.loads((out / "sdwb.json").read_text())
    assert record["stage"] == "prune" and record["method"] == "channels" and record["config"]["ratio"] == 0.3
    assert record["parent"]["path"] == str(Path(tiny).resolve())
    assert record["metrics"]["unet_gmacs"] == pruned30.metrics["unet_gmacs"]
    assert record["libraries"]["torch-pruning"]
    shapes = record["architecture"]["shapes"]
    assert shapes == {k: list(v.shape) for k, v in pruned30.pipeline.unet.state_dict().items()}
    assert all((out / c).is_dir() for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    assert not {p.suffix for p in out.rglob("*") if p.is_file()} & PICKLE_SUFFIXES
    loaded = load_pipeline(str(out))
    assert torch.equal(unet_out(loaded.unet), unet_out(pruned30.pipeline.unet))
    np.testing.assert_array_equal(images(loaded), images(pruned30.pipeline))


def test_pruned_variant_quantizes_and_reloads(pruned30, tmp_path):
    """A variant made from a pruned one stores pruned shapes; loading finds them in its parent's record."""
    from compress.quantize import quantize
    from sdwb.loading import load_pipeline
    from sdwb.quant.config import parse_quant_config

    out = tmp_path / "bf16"
    config = parse_quant_config({"method": "torch-bf16", "guard": {"enabled": False}})
    quantize(str(pruned30.path), config, out)
    loaded = load_pipeline(str(out))
    assert loaded.unet.conv_in.weight.dtype == torch.bfloat16
    assert loaded.unet.up_blocks[0].resnets[0].conv1.out_channels < 32
    assert torch.isfinite(unet_out(loaded.unet)).all()


def test_tampered_truncated_or_mismatched_variant_is_refused(pruned30, tmp_path):
    from sdwb.loading import load_pipeline

    copy = tmp_path / "v"
    shutil.copytree(pruned30.path, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SdwbError, match="sha256 differs"):
        load_pipeline(str(copy))
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(SdwbError) as e:
        load_pipeline(str(copy))
    assert "corrupt weights" in one_line(e)
    weights.write_bytes(good)
    record = json.loads((copy / "sdwb.json").read_text())
    record["architecture"]["shapes"]["conv_in.weight"] = [8, 4, 3, 3]
    (copy / "sdwb.json").write_text(json.dumps(record))
    with pytest.raises(SdwbError) as e:
        load_pipeline(str(copy))
    assert "conv_in.weight has shape [16, 4, 3, 3], the architecture record says [8, 4, 3, 3]" in one_line(e)


# --------------------------------------------------------------------------- blocks


def test_block_removal_lowers_macs_and_round_trips(tiny, tmp_path):
    from sdwb.loading import load_pipeline
    from sdwb.variants.unet_blocks import SkippedAttention, SkippedResnet

    out = tmp_path / "blocks"
    result = prune(tiny, cfg(method="blocks"), out)
    unet = result.pipeline.unet
    assert unet.mid_block is None
    assert isinstance(unet.up_blocks[0].resnets[1], SkippedResnet)
    assert isinstance(unet.up_blocks[1].resnets[1], SkippedResnet)
    assert isinstance(unet.up_blocks[0].attentions[1], SkippedAttention)
    assert result.metrics["unet_gmacs"]["after"] < 0.85 * result.metrics["unet_gmacs"]["before"]
    record = json.loads((out / "sdwb.json").read_text())
    assert sorted(record["architecture"]["removed"]) == sorted(result.metrics["pruned"]["removed"])
    loaded = load_pipeline(str(out))
    assert loaded.unet.mid_block is None and isinstance(loaded.unet.up_blocks[1].resnets[1], SkippedResnet)
    out_a, out_b = unet_out(loaded.unet), unet_out(unet)
    assert torch.equal(out_a, out_b) and torch.isfinite(out_a).all()
    with pytest.raises(SdwbError) as e:
        prune(tiny, cfg(method="blocks", blocks=["up_blocks.0.resnets.0"]))
    assert "changes the width" in one_line(e)
    with pytest.raises(SdwbError) as e:
        prune(tiny, cfg(method="blocks", blocks=["up_blocks.9.*"]))
    assert "'up_blocks.9.*' names no removable block" in one_line(e)


# --------------------------------------------------------------------------- recovery


def test_recovery_lowers_distillation_loss_and_resumes(tiny, tmp_path, monkeypatch):
    import compress.recovery as recovery

    config = cfg(ratio=0.3, data=FAST_DATA, finetune={**FAST_FT, "steps": 8, "checkpoint_every": 4})
    real, calls = recovery.feature_loss, []

    def killed_at_step_5(*args):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return real(*args)

    out, work = tmp_path / "ft", tmp_path / "ft.work"
    monkeypatch.setattr(recovery, "feature_loss", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        prune(tiny, config, out)
    assert not out.exists()
    assert json.loads((work / "checkpoint" / "progress.json").read_text())["step"] == 4
    with pytest.raises(SdwbError, match="another config"):  # a different run never reuses this state
        prune(tiny, cfg(ratio=0.5, data=FAST_DATA, finetune={**FAST_FT, "steps": 8}), out)

    calls.clear()
    monkeypatch.setattr(recovery, "feature_loss", lambda *a: calls.append(1) or real(*a))
    result = prune(tiny, config, out)
    assert len(calls) == 4  # resumed at step 4 of 8
    rec = result.metrics["recovery"]
    assert rec["distill_mse_after"] < 0.9 * rec["distill_mse_before"], rec
    assert rec["projected_blocks"]  # pruned blocks are compared through their projections
    assert not work.exists()
    record = json.loads((out / "sdwb.json").read_text())
    assert record["metrics"]["recovery"]["steps"] == 8 and record["config"]["finetune"]["steps"] == 8


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_line_errors(tiny, pruned30, tmp_path):
    from diffusers import UNet2DModel

    from sdwb.testing import build_tiny_pipeline

    with pytest.raises(SdwbError) as e:
        prune(tiny, cfg(ignored_layers=["conv_in", "conv_inn"]), tmp_path / "a")
    assert "ignored_layers: 'conv_inn' names no module" in one_line(e)
    pipe = build_tiny_pipeline(seed=0)
    pipe.unet = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    with pytest.raises(SdwbError) as e:
        prune(pipe, cfg(), tmp_path / "b")
    assert "UNet2DModel; pruning needs a diffusers UNet2DConditionModel" in one_line(e)
    with pytest.raises(SdwbError) as e:
        prune(str(pruned30.path), cfg(), tmp_path / "c")
    assert "already pruned" in one_line(e)
    assert list(tmp_path.iterdir()) == []


def _cli(args: list[str]):
    """Run ``sdwb ARGS`` through typer's CliRunner and the root CLI's error handling."""
    from typer.testing import CliRunner

    from sdwb.app import cli

    wrapper = typer.Typer()

    @wrapper.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def sdwb(ctx: typer.Context) -> None:
        cli.main(list(ctx.args))

    return CliRunner().invoke(wrapper, args)


def test_cli_prune_then_generate_and_export_onnx(tiny, tmp_path):
    out = tmp_path / "variant"
    result = _cli(["compress", "prune", "--model", tiny, "--ratio", "0.3", "--importance", "magnitude",
                   "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "GMACs" in result.stdout and (out / "sdwb.json").is_file()
    result = _cli(["generate", "--model", str(out), "-p", "a red circle", "--steps", "2", "--device", "cpu",
                   "--no-progress", "-o", str(tmp_path / "img.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "img.png").is_file()
    onnx_dir = tmp_path / "onnx"
    result = _cli(["export", "onnx", "--model", str(out), "-o", str(onnx_dir), "--components", "unet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    checks = manifest["components"]["unet"]["validation"]
    assert checks and all(c["ok"] for c in checks)
    assert manifest["source"]["variant"]["stage"] == "prune"


@pytest.mark.parametrize("args, expected", [
    (["--ratio", "1.5"], "ratio: input should be less than 1"),
    (["--ratio", "0"], "ratio: input should be greater than 0"),
    (["--ignored-layers", "conv_in,nope"], "ignored_layers: 'nope' names no module"),
    (["--method", "blocks", "--ratio", "0.3"], "used by method 'channels' only"),
    (["--method", "blocks", "--blocks", "mid_blok"], "'mid_blok' names no removable block"),
    (["--set", "finetune.stepz=3"], "finetune.stepz: unknown key"),
])
def test_cli_bad_input_is_one_line(args, expected, tiny, tmp_path):
    result = _cli(["compress", "prune", "--model", tiny, "-o", str(tmp_path / "v"), "--no-progress", *args])
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "v").exists()


def test_prune_method_registry_matches_the_config():
    """One registry: every method the config accepts has a check and an apply, and no other."""
    import typing

    from compress.prune import METHODS
    from compress.prune_config import PruneConfig

    assert set(typing.get_args(PruneConfig.model_fields["method"].annotation)) == set(METHODS)
