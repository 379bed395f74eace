"""Distilled tiny VAE decoder (``sdwb compress decoder``, :mod:`compress.tiny_decoder`).

Runs on the ~0.3 M-param tiny pipeline (``sdwb.testing``, 32x32 images, f=2 VAE) with a few
optimizer steps; asserts properties (the held-out loss goes down, the variant loads through plain
diffusers and through sdwb, the ONNX vae_decoder matches torch, bad input is one line), never
that a few steps make a good decoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.tiny_decoder import build_tiny_vae, decode, distill_decoder, load_decoder_config
from sdwb.errors import SdwbError

PROMPT = "a small red circle at the top on a gray background"
FAST = ["steps=40", "batch=8", "latent_pool=32", "generated=8", "sample_steps=2", "held_out=4",
        "timing_runs=2", "checkpoint_every=20", "warmup=2", "channels=8", "lr=0.005"]


@pytest.fixture(scope="module")
def variant(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder") / "tiny-vae"
    cfg = load_decoder_config(None, FAST)
    result = distill_decoder(str(tiny_pipeline_dir), cfg, out, progress=False)
    return out, result


def test_training_lowers_the_held_out_loss_and_records_the_variant(variant):
    out, result = variant
    train = result.metrics["train"]
    assert train["held_out_loss_after"] < 0.7 * train["held_out_loss_before"], train
    record = json.loads((out / "sdwb.json").read_text())
    assert (record["stage"], record["method"], record["backend"]) == ("decoder", "taesd", "torch")
    assert record["vae"]["encoder"] == "untrained" and record["vae"]["replaces"] == "AutoencoderKL"
    fid = record["metrics"]["fidelity"]
    assert set(fid) == {"encoded", "generated"} and all(np.isfinite(v["psnr"]) for v in fid.values())
    times = record["metrics"]["decode_ms_per_image"]
    assert set(times["full"]) == set(times["tiny"]) == {"batch_1", "batch_8"}
    assert record["metrics"]["decoder_params"]["tiny"] < record["metrics"]["decoder_params"]["full"]
    assert not out.with_name(out.name + ".work").exists()  # removed on success
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 1.0


def test_plain_diffusers_and_sdwb_load_it_and_generate_finite_images(variant):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    out, result = variant
    plain = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(plain.vae, AutoencoderTiny)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(decode(plain.vae, z), decode(result.pipeline.vae, z), atol=1e-5)
        images = plain(PROMPT, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    vae = AutoencoderTiny.from_pretrained(out / "vae")
    assert vae.config.decoder_block_out_channels == [8, 8]
    pipe = load_pipeline(str(out))
    assert isinstance(pipe.vae, AutoencoderTiny)
    (image,) = generate(pipe, [PROMPT], steps=2, progress=False)
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all() and image.size == (32, 32)


def test_onnx_vae_decoder_matches_torch_and_vae_encoder_is_refused(variant, tmp_path):
    import onnxruntime as ort

    from export.onnx import export_onnx

    out, result = variant
    manifest = export_onnx(str(out), tmp_path / "onnx", components=["vae_decoder"])
    assert manifest["components"]["vae_decoder"]["validation"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "vae_decoder" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    (onnx_image,) = session.run(None, {"latent": z.numpy()})
    with torch.no_grad():
        torch_image = decode(result.pipeline.vae, z).numpy()
    assert np.abs(onnx_image - torch_image).max() < 1e-3
    with pytest.raises(SdwbError, match="vae_encoder"):
        export_onnx(str(out), tmp_path / "enc", components=["vae_encoder"])


def test_the_variant_is_refused_as_a_prune_or_distill_source(variant, tmp_path):
    from compress.distill import distill
    from compress.distill_config import parse_distill_config
    from compress.prune import prune
    from compress.prune_config import load_prune_config

    out, _ = variant
    with pytest.raises(SdwbError, match="tiny decoder"):
        prune(str(out), load_prune_config(None, None, ratio=0.3), tmp_path / "p", progress=False)
    with pytest.raises(SdwbError, match="tiny decoder"):
        distill(str(out), parse_distill_config({"teacher_steps": 8, "student_steps": 4}), tmp_path / "d",
                progress=False)
    with pytest.raises(SdwbError, match="already has a distilled tiny decoder"):
        distill_decoder(str(out), load_decoder_config(None, FAST), tmp_path / "t", progress=False)


def test_a_killed_run_resumes_from_its_checkpoint(tiny_pipeline_dir, tmp_path, monkeypatch):
    from sdwb.train import common

    cfg = load_decoder_config(None, [*FAST, "steps=6", "checkpoint_every=3", "timing_runs=0"])
    work, real = tmp_path / "work", common.run_loop

    def killed_at_step_4(**kw):
        inner = kw["step_fn"]

        def step_fn(step):
            if step == 4:
                raise KeyboardInterrupt
            return inner(step)

        return real(**{**kw, "step_fn": step_fn})

    monkeypatch.setattr(common, "run_loop", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        distill_decoder(str(tiny_pipeline_dir), cfg, tmp_path / "v", work_dir=work, progress=False)
    monkeypatch.setattr(common, "run_loop", real)
    assert json.loads((work / "checkpoint" / "progress.json").read_text())["step"] == 3
    assert (work / "pairs.safetensors").is_file() and not (tmp_path / "v").exists()
    logged = len((work / "train_log.jsonl").read_text().splitlines())
    result = distill_decoder(str(tiny_pipeline_dir), cfg, tmp_path / "v", work_dir=work, progress=False,
                             keep_work=True)
    steps = [json.loads(line)["step"] for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert steps[logged:] == [5]  # resumed at step 3 (logged: the last step), not from 0
    assert result.path.is_dir()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "channel=8"], "unknown key"),
        (["--steps", "0"], "steps"),
        (["--set", "blocks=[1,1,1,1,1]"], "blocks"),
        (["--set", "l1_weight=0", "--set", "l2_weight=0"], "nothing to train"),
    ],
)
def test_cli_bad_input_is_one_line_error(tiny_pipeline_dir, tmp_path, capsys, args, expected):
    from sdwb.app import cli

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", "decoder", "--model", str(tiny_pipeline_dir), "-o", str(out), "--no-progress",
                  *args])
    err = capsys.readouterr().err
    assert info.value.code != 0
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not out.with_name("never.work").exists()


def test_student_matches_the_vae_levels(tiny_pipeline_dir):
    from sdwb.loading import load_pipeline

    vae = load_pipeline(str(tiny_pipeline_dir)).vae
    tiny = build_tiny_vae(vae, load_decoder_config(None, ["channels=8"]))
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert decode(tiny, z).shape == decode(vae, z).shape


def test_shipped_decoder_config_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "decoder" / "vae-decoder.yaml"
    cfg = load_decoder_config(path)
    assert cfg.steps >= 100


def test_a_recipe_decoder_stage_trains_it_and_exports_without_an_encoder(tiny_pipeline_dir, tmp_path):
    """``kind: decoder`` in a recipe is ``sdwb compress decoder``: the next stage (export) gets the
    tiny-decoder variant, whose VAE has no encoder to export; a re-run reuses the finished stages."""
    from sdwb.app.recipe_run import plan, run_recipe
    from sdwb.app.recipe_schema import recipe_from_dict

    overrides = dict(item.split("=") for item in FAST)
    stage = {"kind": "decoder", **{k: (float(v) if "." in v else int(v)) for k, v in overrides.items()}}
    recipe = recipe_from_dict({"name": "tiny-vae", "model": str(tiny_pipeline_dir), "stages": [
        stage, {"kind": "export", "components": ["text_encoder", "unet", "vae_decoder"]}]})
    store = tmp_path / "store"
    result = run_recipe(recipe, store=store, run_root=tmp_path / "runs", progress=False)
    decoded, exported = (s.out for s in result.stages)
    assert json.loads((decoded / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert "vae_decoder" in manifest["components"] and "vae_encoder" not in manifest["components"]
    assert all(p.done for p in plan(recipe, store))  # nothing left to run: a re-run trains nothing
    bad = {**stage, "blocks": [1]}  # one entry for a 2-level VAE: refused before any work
    with pytest.raises(SdwbError):
        run_recipe(recipe_from_dict({"name": "bad", "model": str(tiny_pipeline_dir), "stages": [bad]}),
                   store=store, run_root=tmp_path / "runs", progress=False)
