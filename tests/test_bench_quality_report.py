"""Quality metrics (bench.quality) and report rendering (bench.report) on tiny inputs, CPU only."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bench.quality import QUALITY_KEYS, cmmd, compute_quality
from bench.report import MISSING, render_report
from sdwb import shapes
from sdwb.errors import SdwbError
from sdwb.judge import AttributePredictions, ShapesJudge

N = 6


@pytest.fixture(scope="module")
def judge():
    from sdwb.testing import build_tiny_judge

    model, processor = build_tiny_judge(seed=0)
    return ShapesJudge(model, processor, name="tiny-test-judge")


@pytest.fixture(scope="module")
def samples():
    return shapes.eval_samples(N)


@pytest.fixture(scope="module")
def images(samples):
    return [s.render() for s in samples]


def _noisy(images, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in images]


# --------------------------------------------------------------------------- quality


def test_cmmd_zero_against_itself_positive_against_another_set(judge, images):
    same = compute_quality(images, None, judge=judge, reference_images=images)["cmmd"]
    assert same == pytest.approx(0.0, abs=1e-9)
    solid = [np.full((64, 64, 3), v, np.uint8) for v in (0, 60, 120, 180, 240)]
    other = compute_quality(images, None, judge=judge, reference_images=solid)["cmmd"]
    assert other > 1e-4


def test_cmmd_estimator_on_embeddings():
    torch.manual_seed(0)
    unit = lambda t: torch.nn.functional.normalize(t, dim=-1)
    a, b = unit(torch.randn(200, 16)), unit(torch.randn(200, 16))  # same distribution, independent
    c = unit(torch.randn(200, 16) + 3.0)  # a different distribution
    assert cmmd(a, a) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(a, c) > 20 * abs(cmmd(a, b, unbiased=True))
    assert cmmd(a, c) > cmmd(a, b) >= 0.0
    assert cmmd(a, c, unbiased=True) > 0.0


def test_psnr_ssim_top_for_identical_and_drop_with_noise(images):
    same = compute_quality(images, None, baseline_images=images)
    assert math.isinf(same["psnr_vs_baseline"]) and same["psnr_vs_baseline"] > 0
    assert same["ssim_vs_baseline"] == pytest.approx(1.0, abs=1e-6)
    light = compute_quality(images, None, baseline_images=_noisy(images, 8))
    heavy = compute_quality(images, None, baseline_images=_noisy(images, 40))
    assert math.isfinite(light["psnr_vs_baseline"])
    assert light["psnr_vs_baseline"] > heavy["psnr_vs_baseline"] > 0
    assert 1.0 > light["ssim_vs_baseline"] > heavy["ssim_vs_baseline"]


def test_judge_metrics_are_bounded_with_ordered_intervals(judge, images, samples):
    q = compute_quality(images, [s.caption for s in samples], judge=judge,
                        expected_attributes=[s.attributes for s in samples], n_resamples=200)
    assert set(q) == set(QUALITY_KEYS)
    for name in ("color_acc", "shape_acc", "position_acc"):
        assert 0.0 <= q[f"{name}_lo"] <= q[name] <= q[f"{name}_hi"] <= 1.0
    assert 0.0 <= q["clip_score_lo"] <= q["clip_score"] <= q["clip_score_hi"] <= 100.0
    assert q["cmmd"] is None and q["psnr_vs_baseline"] is None and q["ssim_vs_baseline"] is None


class _OracleJudge:
    """Predicts the expected attributes, except colour on every other image."""

    def classify(self, images, expected):
        correct = {k: np.ones(len(images), bool) for k in expected[0]}
        correct["color"][1::2] = False
        return AttributePredictions(predicted=list(expected), correct=correct)


def test_accuracy_with_an_oracle(images, samples):
    expected = [s.attributes for s in samples]
    q = compute_quality(images, None, judge=_OracleJudge(), expected_attributes=expected)
    assert q["shape_acc"] == q["shape_acc_lo"] == q["shape_acc_hi"] == 1.0
    assert q["color_acc"] == pytest.approx(0.5)
    assert q["color_acc_lo"] < 0.5 < q["color_acc_hi"]


def test_metrics_without_inputs_are_none(images):
    q = compute_quality(images, ["a prompt"] * N)
    assert set(q) == set(QUALITY_KEYS)
    assert all(v is None for v in q.values())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"prompts": ["p"] * (N - 1)}, "prompts"),
        ({"baseline_images": "short"}, "baseline_images"),
        ({"expected_attributes": [{"color": "red"}] * N}, "expected_attributes[0]"),
        ({"reference_images": []}, "reference_images"),
    ],
)
def test_bad_inputs_are_one_line_errors(images, kwargs, name):
    kwargs = {"prompts": None, **kwargs}
    if kwargs.get("baseline_images") == "short":
        kwargs["baseline_images"] = images[:2]
    with pytest.raises(SdwbError) as err:
        compute_quality(images, kwargs.pop("prompts"), **kwargs)
    assert name in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- report

ENV = {"cpu": "Test CPU", "cores": 2, "threads": 2, "gpu": None, "python": "3.12.0",
       "libraries": {"torch": "2.13.0", "diffusers": "0.36.0"}, "git_revision": "abc1234"}


def _row(variant, **metrics):
    row = {"variant": variant, "model": "builtin:tiny-shapes", "backend": "torch", "dtype": "fp32",
           "steps": 4, "guidance": 7.5, "batch": 1, "e2e_s_median": 1.0, "e2e_s_p10": 0.9,
           "e2e_s_p90": 1.1, "images_per_s": 1.0, "text_encoder_ms": 5.0, "unet_ms_per_call": 100.0,
           "unet_calls": 8, "vae_decode_ms": 50.0, "peak_rss_mb": 900.0, "cuda_peak_mb": None,
           "size_mb": 10.0, "params_m": 2.5, "unet_gmacs": 0.6, "device": "cpu", "threads": 2,
           "scheduler": "ddim", "n_prompts": 2, "judge": "tiny"}
    quality = {"clip_score": 30.0, "clip_score_lo": 29.0, "clip_score_hi": 31.0, "cmmd": 0.25,
               "psnr_vs_baseline": math.inf, "ssim_vs_baseline": 1.0}
    for a in ("color", "shape", "position"):
        quality.update({f"{a}_acc": 0.8, f"{a}_acc_lo": 0.7, f"{a}_acc_hi": 0.9})
    row.update(quality)
    row.update(metrics)
    return row


def _write_results(directory, rows):
    directory.mkdir(parents=True)
    images = {}
    for k, row in enumerate(rows):
        files = []
        for i in range(2):
            rel = f"images/{row['variant']}/{i}.png"
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16, 3), 40 * (k + i), np.uint8)).save(directory / rel)
            files.append(rel)
        images[row["variant"]] = files
    path = directory / "results.json"
    payload = {"environment": ENV, "command": "sdwb bench e2e.yaml -o out", "rows": rows,
               "prompts": ["a small red circle at the top on a gray background"] * 2, "images": images}
    path.write_text(json.dumps(payload))
    return path


def _md_tables(md):
    """{section title: [row dicts]} of every markdown table in the report."""
    tables, title, lines = {}, None, md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                body.append(dict(zip(header, (c.strip() for c in row.strip("|").split(" | ")))))
            tables[title] = body
    return tables


def _md_rows(md, table="Speed and quality"):
    rows = _md_tables(md)[table]
    return list(rows[0]), rows


def test_report_renders_self_contained_html_and_dashes_for_null_metrics(tmp_path):
    nulls = {k: None for k in QUALITY_KEYS}
    fast = _row("bf16-4steps", dtype="bf16", e2e_s_median=0.5, e2e_s_p10=0.45, e2e_s_p90=0.55, **nulls)
    results = _write_results(tmp_path / "machine-a", [_row("baseline", baseline=True), fast])
    md_path, html_path = render_report([results], tmp_path / "out")
    assert md_path == tmp_path / "out" / "report.md" and html_path.name == "report.html"
    page = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") >= 4  # latency, pareto, memory, image grid
    assert "Test CPU" in page and "abc1234" in page and "torch 2.13.0" in page
    assert "sdwb bench e2e.yaml -o out" in page

    md = md_path.read_text()
    _, rows = _md_rows(md)
    cost_header, cost = _md_rows(md, "Cost and details")
    assert [r["variant"] for r in rows] == ["baseline (baseline)", "bf16-4steps"]
    for col in ["CLIP score [95% CI]", "colour acc % [95% CI]", "PSNR dB"]:
        assert rows[1][col] == MISSING, col
    for col in ["CMMD", "SSIM"]:
        assert cost[1][col] == MISSING, col
    assert "CUDA peak MB" not in cost_header  # empty for every row (a CPU run): left out
    assert rows[0]["PSNR dB"] == "∞" and cost[0]["CMMD"] == "0.250"
    assert rows[1]["speed-up"] == "2.00×" and rows[0]["speed-up"] == "1.00×"
    assert rows[0]["colour acc % [95% CI]"] == "80.0 [70.0–90.0]"
    assert not any(cell in ("0", "0.00", "0.0") for row in rows + cost for cell in row.values())
    assert "bf16-4steps: 2.00× faster than baseline: quality not measured" in md


def test_a_compressed_variant_in_its_own_directory_is_compared_to_the_named_baseline(tmp_path):
    # bench writes the baseline's name on every row; a pruned/distilled variant is another model path
    rows = [_row("fp32", baseline="fp32"),
            _row("pruned", model="runs/prune/x", e2e_s_median=0.5, baseline="fp32"),
            _row("other", model="builtin:sd15-arch", e2e_s_median=4.0)]
    md_path, _ = render_report([_write_results(tmp_path / "run", rows)], tmp_path / "out")
    _, cells = _md_rows(md_path.read_text())
    assert [r["variant"] for r in cells] == ["fp32 (baseline)", "pruned", "other (baseline)"]
    assert [r["speed-up"] for r in cells] == ["1.00×", "2.00×", "1.00×"]


def test_two_results_files_merge_into_one_table(tmp_path):
    rows = [_row("int8", e2e_s_median=0.8, baseline="fp32"), _row("fp32", baseline="fp32")]
    a = _write_results(tmp_path / "machine-a", rows)
    slow = _row("baseline", e2e_s_median=3.0, e2e_s_p10=2.9, e2e_s_p90=3.2)
    b = _write_results(tmp_path / "machine-b", [slow])
    md_path, html_path = render_report([a, b.parent], tmp_path / "out")
    _, rows = _md_rows(md_path.read_text())
    assert [r["source"] for r in rows] == ["machine-a", "machine-a", "machine-b"]
    # the baseline is the row named by `baseline` (not the first one), and one per source
    assert [r["speed-up"] for r in rows] == ["1.25×", "1.00×", "1.00×"]
    assert [r["variant"] for r in rows] == ["int8", "fp32 (baseline)", "baseline (baseline)"]
    page = html_path.read_text()
    assert "machine-a" in page and "machine-b" in page
    assert page.count("<h3>Images:") == 2


def test_bad_results_files_are_one_line_errors(tmp_path):
    with pytest.raises(SdwbError, match="not found"):
        render_report([tmp_path / "nope.json"], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [ {"variant": "x"},')
    with pytest.raises(SdwbError, match="bad.json: cannot read results") as err:
        render_report([bad], tmp_path / "out")
    assert "\n" not in str(err.value)
    bad.write_text('{"rows": {"variant": "x"}}')
    with pytest.raises(SdwbError, match="not a results file"):
        render_report([bad], tmp_path / "out")
    bad.write_text('{"rows": [{"variant": "x"}], "images": ["a.png"]}')
    with pytest.raises(SdwbError, match="'images' must map"):
        render_report([bad], tmp_path / "out")
    bad.write_text('{"rows": [{"model": "no variant"}]}')
    with pytest.raises(SdwbError, match=r"rows\[0\]"):
        render_report([bad], tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_report_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from sdwb.app.report_cli import report_command

    app = typer.Typer()
    app.command()(report_command)
    results = _write_results(tmp_path / "run", [_row("baseline")])
    result = CliRunner().invoke(app, [str(results), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.html").is_file() and "report.md" in result.output
