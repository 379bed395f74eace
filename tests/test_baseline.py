"""The shipped baseline: tiny-shapes loads through plain diffusers, the judge reads the domain,
`sdwb baseline train --fast` runs end to end, and damaged weights are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdwb import shapes
from sdwb.errors import SdwbError
from sdwb.zoo import assets_dir

TINY = assets_dir() / "tiny-shapes"
JUDGE = assets_dir() / "shapes-judge"
needs_assets = pytest.mark.skipif(
    not (TINY / "model_index.json").exists() or not (JUDGE / "config.json").exists(),
    reason="builtin models not shipped in this checkout",
)


def _one_attribute_changed(sample: shapes.ShapeSample, attribute: str) -> str:
    attrs = dict(sample.attributes)
    values = shapes.ATTRIBUTE_VALUES[attribute]
    attrs[attribute] = values[(values.index(attrs[attribute]) + 1) % len(values)]
    return shapes.caption_for(attrs, 0)


@needs_assets
def test_judge_prefers_the_true_caption_over_one_changed_attribute():
    from sdwb.judge import load_judge

    judge = load_judge("builtin:shapes-judge")
    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 900_000 + i) for i in range(12)]
    images = [s.render() for s in samples]
    for attribute in ("color", "shape", "position"):
        true_scores = judge.clip_scores(images, [shapes.caption_for(s.attributes, 0) for s in samples])
        wrong_scores = judge.clip_scores(images, [_one_attribute_changed(s, attribute) for s in samples])
        assert (true_scores > wrong_scores).all(), attribute


@needs_assets
def test_judge_zero_shot_accuracy_on_held_out_images():
    """The shipped judge reads colour, shape and position of held-out data-set images (the issue's
    bar is 98 / 98 / 95 % on 1080 images, reports/baseline.md; here 120 images, a small margin)."""
    from sdwb.judge import load_judge

    judge = load_judge("builtin:shapes-judge")
    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 800_000 + i) for i in range(120)]
    acc = judge.classify([s.render() for s in samples], [s.attributes for s in samples]).accuracy()
    assert acc["color"] >= 0.97 and acc["shape"] >= 0.95 and acc["position"] >= 0.95, acc


@needs_assets
def test_shipped_vae_keeps_colours_and_shapes():
    """The judge reads the shipped VAE's reconstructions as well as the originals (the first shipped
    VAE merged six colours into two, which capped the whole model's colour accuracy at ~35 %)."""
    from diffusers import AutoencoderKL

    from sdwb.judge import load_judge
    from sdwb.train.vae import images_to_vae_input

    vae = AutoencoderKL.from_pretrained(TINY / "vae", torch_dtype=torch.float32).eval()
    samples = [shapes.sample_from_seed(shapes.EVAL_SEED_BASE + 810_000 + i) for i in range(48)]
    x = images_to_vae_input(np.stack([s.render() for s in samples]))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    images = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    judge = load_judge("builtin:shapes-judge")
    acc = judge.classify(list(images), [s.attributes for s in samples]).accuracy()
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.9 and acc["position"] >= 0.95, acc


@needs_assets
def test_tiny_shapes_loads_with_plain_diffusers_and_is_deterministic():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None

    def run(seed: int) -> np.ndarray:
        out = pipe(
            "a large blue square on the left on a white background",
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        return out.images[0]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (64, 64, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01


@needs_assets
def test_tiny_shapes_has_the_sd_component_classes_and_no_shared_weights_with_the_judge():
    from safetensors.torch import load_file

    index = json.loads((TINY / "model_index.json").read_text())
    assert index["unet"][1] == "UNet2DConditionModel"
    assert index["vae"][1] == "AutoencoderKL"
    assert index["text_encoder"][1] == "CLIPTextModel"
    assert index["tokenizer"][1] == "CLIPTokenizer"
    te = load_file(TINY / "text_encoder" / "model.safetensors")
    judge = load_file(JUDGE / "model.safetensors")
    te_key = next(k for k in te if k.endswith("embeddings.token_embedding.weight"))
    te_emb = te[te_key].float()
    judge_emb = judge["text_model.embeddings.token_embedding.weight"].float()
    assert te_emb.shape[0] == judge_emb.shape[0]  # same vocabulary ...
    assert not torch.allclose(
        te_emb[:, : min(te_emb.shape[1], judge_emb.shape[1])],
        judge_emb[:, : min(te_emb.shape[1], judge_emb.shape[1])],
    )  # ... own weights


@needs_assets
def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for d in (TINY, JUDGE) for p in d.rglob("*.safetensors"))
    assert total <= 20 * 1024 * 1024, total


@needs_assets
def test_truncated_unet_weights_are_refused_with_a_one_line_error(tmp_path):
    from sdwb.loading import load_pipeline

    copy = tmp_path / "tiny"
    shutil.copytree(TINY, copy)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SdwbError) as err:
        load_pipeline(str(copy))
    message = str(err.value)
    assert "\n" not in message and "unet" in message


@pytest.mark.slow
def test_baseline_train_fast_runs_end_to_end_and_writes_a_loadable_pipeline(tmp_path):
    from typer.testing import CliRunner

    from sdwb.app.cli import app
    from sdwb.loading import load_pipeline

    out = tmp_path / "train"
    result = CliRunner().invoke(app, ["baseline", "train", "--fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())
    for key in ("judge", "vae", "eval", "timings_s"):
        assert key in summary
    ev = summary["eval"]  # accuracies are fractions of the scored images, inside their intervals
    correct = ev["color_acc"] * ev["prompts"]
    assert ev["prompts"] > 0 and abs(correct - round(correct)) < 0.01
    assert ev["color_acc_lo"] <= ev["color_acc"] <= ev["color_acc_hi"]
    assert ev["clip_score_lo"] <= ev["clip_score"] <= ev["clip_score_hi"]
    pipe = load_pipeline(str(out / "tiny-shapes"))
    assert pipe.unet.dtype == torch.float32
    assert (out / "shapes-judge" / "config.json").exists()
    assert (out / "grid.png").exists()
    # a second run finds every stage finished and only re-evaluates
    mtime = (out / "tiny-shapes" / "sdwb.json").stat().st_mtime
    result = CliRunner().invoke(app, ["baseline", "train", "--fast", "--out", str(out), "--no-eval"])
    assert result.exit_code == 0, result.output
    assert (out / "tiny-shapes" / "sdwb.json").stat().st_mtime == mtime


def test_training_resumes_from_its_checkpoint(tmp_path):
    """A stage killed after its checkpoint continues from that step, not from zero."""
    from sdwb.train.common import make_accelerator
    from sdwb.train.config import fast_config
    from sdwb.train.vae import train_vae

    cfg = fast_config()
    cfg.vae.steps = 4
    cfg.checkpoint_every = 2
    work = tmp_path / "vae"
    work.mkdir()
    train_vae(cfg, work, make_accelerator(cpu=True), progress=False)
    progress = json.loads((work / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == 4
    cfg.vae.steps = 6
    train_vae(cfg, work, make_accelerator(cpu=True), progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1  # the second run did not start again at step 0
    assert json.loads((work / "checkpoint" / "progress.json").read_text())["step"] == 6


def test_bad_training_config_is_a_one_line_error(tmp_path):
    from sdwb.train.config import load_train_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  stepz: 3\n")
    with pytest.raises(SdwbError) as err:
        load_train_config(bad)
    assert "unet.stepz" in str(err.value) and "\n" not in str(err.value)


def test_baseline_eval_unknown_scheduler_is_a_one_line_error(capsys):
    from sdwb.app import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["baseline", "eval", "--scheduler", "ddpm-ish", "--prompts", "2"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and err.count("\n") == 1 and "ddim, euler, dpmpp, lcm" in err, err


def test_domain_tokenizer_makes_every_word_one_token(tmp_path):
    from sdwb.tokenizer import save_tokenizer

    tok = save_tokenizer(tmp_path / "tok")
    for word in shapes.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    assert tok.model_max_length == 32


def test_committed_training_config_is_the_default_one():
    """configs/baseline/tiny-shapes.yaml documents the run that produced the shipped weights."""
    from sdwb.train.config import BaselineTrainConfig, load_train_config

    path = Path(__file__).resolve().parents[1] / "configs" / "baseline" / "tiny-shapes.yaml"
    assert load_train_config(path) == BaselineTrainConfig()


def test_foreground_mask_marks_exactly_the_shape_pixels():
    from sdwb.train.vae import foreground_mask

    images, _, samples = shapes.train_batch(7, 6)
    mask = foreground_mask(images, samples)
    assert mask.shape == (6, 1, 64, 64)
    for img, s, m in zip(images, samples, mask[:, 0].numpy()):
        background = np.array(shapes.BACKGROUNDS[s.background])
        assert (np.abs(img[m == 0].astype(int) - background).max(axis=-1) <= 8).all()
        assert 0.01 < m.mean() < 0.3  # a small or large shape, never the whole image


def test_minimal_pairs_change_only_the_shape():
    from sdwb.train.judge import with_minimal_pairs

    samples = [shapes.sample_from_seed(i) for i in range(16)]
    out = with_minimal_pairs(samples, 0.5)
    assert out[:12] == samples[:12]  # 4 twins of the first 4 replace the last 4
    for original, twin in zip(samples[:4], reversed(out[12:])):
        assert twin.shape != original.shape
        assert {k: v for k, v in twin.attributes.items() if k != "shape"} == {
            k: v for k, v in original.attributes.items() if k != "shape"
        }
        same = twin.render() == original.render()
        assert same.mean() > 0.8 and not same.all()  # same jitter and colours, different outline
    assert with_minimal_pairs(samples, 0.0) == samples


@needs_assets
def test_shipped_tiny_shapes_still_meets_its_generation_bars_on_a_quick_prompt_set():
    """The shipped model, as a user runs it (DDIM 25, guidance 7.5, the first 54 held-out prompts,
    seeds 0..53), judged by the shipped judge: colour and position >= 90 %, shape >= 80 %. A change
    that degrades generation (weights, scheduler, conditioning, loading) fails here, not in a report
    weeks later. One image is 1.9 points; the full bars (270 prompts, DDIM 50) are reports/baseline.md."""
    from sdwb.generate import generate
    from sdwb.judge import load_judge
    from sdwb.loading import load_pipeline

    samples = shapes.eval_samples(54)
    pipe = load_pipeline("builtin:tiny-shapes")
    images = generate(pipe, [s.caption for s in samples], steps=25, guidance=7.5, seed=0, batch=6,
                      progress=False)
    acc = load_judge("builtin:shapes-judge").classify(images, [s.attributes for s in samples]).accuracy()
    assert acc["color"] >= 0.9 and acc["position"] >= 0.9 and acc["shape"] >= 0.8, acc
