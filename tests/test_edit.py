"""Image editing (sdwb.edit, ``sdwb edit``): img2img and inpainting on torch and ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdwb.edit import edit, edit_runner, image_tensor
from sdwb.errors import SdwbError

PROMPT = "a small red circle at the top on a gray background"
EDIT = "a large blue square in the center on a white background"


def psnr(a, b) -> float:
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from sdwb.loading import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir))


@pytest.fixture(scope="module")
def source(pipe):
    """The image to edit: one the model made (so it is in the model's own size)."""
    from sdwb.generate import generate

    return generate(pipe, [PROMPT], steps=4, seed=3, progress=False)[0]


@pytest.fixture(scope="module")
def half_mask(source):
    w, h = source.size
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2 :] = 255  # repaint the right half
    return Image.fromarray(mask)


def test_strength_0_returns_the_vae_reconstruction(pipe, source):
    (out,) = edit(pipe, source, [EDIT], strength=0.0, steps=4, progress=False)
    with torch.inference_mode():
        mean = pipe.vae.encode(image_tensor(source)).latent_dist.mean
        decoded = pipe.vae.decode(mean).sample
    expected = ((decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(out, dtype=int) - expected.astype(int)).max() <= 1


def test_strength_1_is_text_to_image_from_the_same_seed(pipe, source):
    """diffusers' own txt2img pipeline vs the edit loop over the same modules: the same noise, the
    same steps; the text is encoded in one batch here and in two calls by diffusers (rounding)."""
    from sdwb.generate import generate

    reference = generate(pipe, [EDIT], steps=5, seed=11, progress=False)[0]
    (out,) = edit(pipe, source, [EDIT], strength=1.0, steps=5, seed=11, progress=False)
    assert psnr(out, reference) >= 40.0


def test_on_the_shipped_model_a_lower_strength_keeps_more_of_the_image():
    """builtin:tiny-shapes (trained): over 3 seeds, strength 0.3 stays closer to the input than 0.9."""
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    model = load_pipeline("builtin:tiny-shapes")
    source = generate(model, [PROMPT], steps=10, seed=0, progress=False)[0]
    change = ["a large blue square at the bottom on a gray background"] * 3  # shape, colour, place
    near = edit(model, source, change, strength=0.3, steps=10, seed=5, progress=False)
    far = edit(model, source, change, strength=0.9, steps=10, seed=5, progress=False)
    # measured: 21.7 vs 17.6 dB (same prompt as the input, strength 0.3: 41 dB)
    assert np.mean([psnr(x, source) for x in near]) > np.mean([psnr(x, source) for x in far]) + 2.0


def test_strength_runs_int_steps_times_strength_of_the_steps(pipe, source):
    runner = edit_runner(pipe)
    for strength, expected in ((0.6, 2), (0.5, 2), (1.0, 4), (0.2, 0)):
        with runner.record_timings() as log:
            edit(pipe, source, [EDIT], strength=strength, steps=4, progress=False)
        assert len(log.get("unet", [])) == expected, (strength, log.get("unet"))


def test_inpainting_leaves_the_unmasked_latents_exactly_the_inputs(pipe, source, half_mask):
    runner = edit_runner(pipe)
    (latents,) = edit(pipe, source, [EDIT], strength=0.8, mask=half_mask, steps=4, output_type="latent",
                      progress=False)
    init = runner.run_component("vae_encoder", image=image_tensor(source))
    keep = latents.shape[-1] // 2
    assert torch.equal(latents[..., :keep], init[..., :keep])
    assert not torch.allclose(latents[..., keep:], init[..., keep:], atol=1e-3)  # the masked half changed
    (image,) = edit(pipe, source, [EDIT], strength=0.8, mask=half_mask, steps=4, progress=False)
    w = source.size[0]
    assert psnr(np.asarray(image)[:, : w // 2 - 4], np.asarray(source)[:, : w // 2 - 4]) > \
        psnr(np.asarray(image)[:, w // 2 + 4 :], np.asarray(source)[:, w // 2 + 4 :])


def test_onnxruntime_and_openvino_edits_match_torch(pipe, source, half_mask, tiny_pipeline_dir, tiny_onnx_dir,
                                       tmp_path_factory):
    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

    out = tmp_path_factory.mktemp("edit") / "onnx"
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    export_onnx(str(tiny_pipeline_dir), out, components=components)
    runners = {"onnxruntime": OrtStableDiffusionPipeline.from_export(out)}
    if importlib.util.find_spec("openvino") is not None:  # the openvino extra: it reads the ONNX export
        from sdwb.backends.registry import open_exported

        runners["openvino"] = open_exported("openvino", out, threads=1)
    for name, runner in runners.items():
        for mask in (None, half_mask):
            kw = dict(strength=0.6, mask=mask, steps=5, seed=2, progress=False)
            (a,), (b,) = edit(pipe, source, [EDIT], **kw), edit(runner, source, [EDIT], **kw)
            assert psnr(a, b) >= 40.0, (name, mask)
    no_encoder = OrtStableDiffusionPipeline.from_export(tiny_onnx_dir)  # exported without vae_encoder
    with pytest.raises(SdwbError, match="vae_encoder"):
        edit(no_encoder, source, [EDIT], steps=2, progress=False)


def test_cli_edit_writes_the_image_and_its_record(tiny_pipeline_dir, source, half_mask, tmp_path, capsys):
    from sdwb.app import cli

    source.save(tmp_path / "in.png")
    half_mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["edit", "--model", str(tiny_pipeline_dir), "-i", str(tmp_path / "in.png"), "-p", EDIT,
                  "--mask", str(tmp_path / "mask.png"), "--steps", "4", "--strength", "0.5", "-o", str(out),
                  "--no-progress"])
    assert info.value.code in (0, None), capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size == source.size
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["command"] == "edit" and record["strength"] == 0.5 and record["steps"] == 4
    assert record["edits"][0]["seed"] == 0 and record["mask"].endswith("mask.png")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"--image": "missing.png"}, "--image"),
        ({"--strength": "1.5"}, "--strength 1.5"),
        ({"--strength": "-0.1"}, "--strength -0.1"),
        ({"--mask": "{small}"}, "same size"),
        ({"--image": "{odd}"}, "multiple of"),
        ({"--image": "{text}"}, "not a readable image"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(change, needle, tiny_pipeline_dir, source, tmp_path,
                                                          capsys):
    from sdwb.app import cli

    source.save(tmp_path / "in.png")
    Image.new("L", (source.size[0] // 2, source.size[1])).save(tmp_path / "small.png")
    Image.new("RGB", (source.size[0] + 3, source.size[1] + 3)).save(tmp_path / "odd.png")
    (tmp_path / "text.png").write_text("not an image")
    args = {"--model": str(tiny_pipeline_dir), "--image": str(tmp_path / "in.png"), "-p": EDIT,
            "-o": str(tmp_path / "out.png"), "--steps": "2"}
    for key, value in change.items():
        args[key] = value.format(**{name: tmp_path / f"{name}.png" for name in ("small", "odd", "text")})
    with pytest.raises(SystemExit) as info:
        cli.main(["edit", *[x for kv in args.items() for x in kv], "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert info.value.code not in (0, None) and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "out.png").exists()


def test_sdxl_edits_with_both_text_encoders_and_its_added_conditions():
    """SDXL through the same loop: strength 1 equals diffusers' SDXL text-to-image from the same seed."""
    from sdwb.generate import generate
    from sdwb.sdxl import build_sdxl_pipeline

    sdxl = build_sdxl_pipeline(seed=0, tiny=True)
    source = generate(sdxl, [PROMPT], steps=3, seed=1, progress=False)[0]
    (out,) = edit(sdxl, source, [EDIT], strength=1.0, steps=3, seed=4, progress=False)
    assert psnr(out, generate(sdxl, [EDIT], steps=3, seed=4, progress=False)[0]) >= 40.0
    (kept,) = edit(sdxl, source, [EDIT], strength=0.0, steps=3, progress=False)
    assert kept.size == source.size


def test_shapes_edit_cases_are_balanced_and_change_one_attribute():
    from sdwb.shapes_edit import JUDGED, KINDS, edit_cases

    cases = edit_cases(8)
    assert [c.kind for c in cases] == list(KINDS) * 2 and edit_cases(8) == cases  # seeded, fixed
    for c in cases:
        source = c.source.attributes
        changed = [a for a in source if source[a] != c.target[a]]
        assert changed == [c.changed] and c.changed in JUDGED and c.prompt != c.source.caption
        mask = c.mask_array()
        assert (mask.sum() > 0) == (c.kind == "inpaint") and (mask.mean() < 0.5)


def test_bench_metric_edit_scores_torch_and_an_onnx_export_of_it(tiny_pipeline_dir, tiny_onnx_dir, tmp_path,
                                                                  capsys):
    """metric edit: edit success with its interval, per kind, preserve_psnr of the inpainting case;
    the ONNX Runtime row of a torch spec is exported with the VAE encoder; an export without one is
    refused before any work."""
    import pandas as pd
    import yaml

    from sdwb.app import cli
    from sdwb.shapes_edit import KINDS

    config = tmp_path / "edit.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"steps": 4, "n_edits": 4, "edit_strength": 0.75, "threads": 1, "metrics": ["edit"]},
        "variants": [{"name": "torch", "model": str(tiny_pipeline_dir)},
                     {"name": "ort", "model": str(tiny_pipeline_dir), "backend": "onnxruntime"}],
    }))
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", str(config), "-o", str(tmp_path / "out"), "--no-progress"])
    assert info.value.code in (0, None), capsys.readouterr().err
    df = pd.read_csv(tmp_path / "out" / "results.csv").set_index("variant")
    for name in ("torch", "ort"):
        row = df.loc[name]
        assert row["n_edits"] == 4 and row["edit_strength"] == 0.75
        assert 0 < row["s_per_edit_lo"] <= row["s_per_edit"] <= row["s_per_edit_hi"]
        assert 0 <= row["edit_success_lo"] <= row["edit_success"] <= row["edit_success_hi"] <= 1
        assert all(0 <= row[f"edit_success_{k}"] <= 1 for k in KINDS) and row["preserve_psnr"] > 0
    from sdwb.variants.manifest import read_manifest

    assert "vae_encoder" in read_manifest(tmp_path / "out" / "exports" / "ort")["components"]
    from bench.report import render_report

    md, _ = render_report([tmp_path / "out"], tmp_path / "report")
    text = md.read_text()
    assert "## Editing (builtin:shapes-edit)" in text and "speed not measured than" not in text
    verdict = next(line for line in text.splitlines() if line.startswith("- ort:"))
    assert all(w in verdict for w in ("edit success", "at strength 0.75", "points vs torch")), verdict

    config.write_text(yaml.safe_dump({"defaults": {"metrics": ["edit"]},
                                      "variants": [{"name": "x", "model": str(tiny_onnx_dir),
                                                    "backend": "onnxruntime"}]}))
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", str(config), "-o", str(tmp_path / "refused"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "needs the VAE encoder" in err and len(err.splitlines()) == 1, err
