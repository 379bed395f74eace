"""``sdwb report`` leads with the verdict: speed-up (with its bootstrap interval where the results hold
per-run samples) and quality against the gate's limits; two tables; recipe run directories;
what a variant is (bench.variant_info). Hand-made results in tmp_path: no model is loaded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench.report import MISSING, _dodged, render_report
from sdwb.errors import SdwbError

ENV = {"cpu": "Test CPU", "torch_threads": 2, "python": "3.11.0"}
QUALITY_HEADERS = ["CLIP score [95% CI]", "Δ CLIP", "colour acc % [95% CI]", "shape acc % [95% CI]",
                   "position acc % [95% CI]", "PSNR dB"]


def _row(variant, *, e2e=1.0, clip=30.0, color=0.9, shape=0.9, position=0.9, **extra):
    row = {"variant": variant, "model": "builtin:tiny-shapes", "backend": "torch", "dtype": "fp32",
           "steps": 10, "batch": 1, "baseline": "fp32", "e2e_s_median": e2e, "e2e_s_p10": e2e * 0.95,
           "e2e_s_p90": e2e * 1.05, "unet_ms_per_call": 10.0, "unet_calls": 20, "peak_rss_mb": 450.0,
           "size_mb": 11.0, "params_m": 5.3, "clip_score": clip, "clip_score_lo": None,
           "clip_score_hi": None, "color_acc": color, "shape_acc": shape, "position_acc": position,
           "psnr_vs_baseline": 30.0}
    row.update(extra)
    return row


def _results(directory, rows, samples=None, name="results.json"):
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"complete": True, "environment": ENV, "command": "sdwb bench x.yaml", "rows": rows,
               "prompts": [], "images": {}}
    if samples is not None:
        payload["samples"] = samples
    (directory / name).write_text(json.dumps(payload))
    return directory / name


def _verdict_lines(md: str) -> dict[str, str]:
    lines = md.splitlines()
    start = lines.index("## Verdict")
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("- "):
            break  # the verdict is the list right under its heading
        out[line[2:].split(":", 1)[0]] = line
    return out


def _table(md: str, title: str) -> tuple[list[str], list[dict]]:
    lines = md.splitlines()
    i = lines.index(f"## {title}") + 2
    header = [c.strip() for c in lines[i].strip("|").split(" | ")]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")))))
    return header, rows


QUALITY_ROWS = [
    _row("fp32"),
    _row("held", e2e=0.5, clip=29.5, color=0.88),  # -0.5 CLIP, -2 points: within 1.0 / 3 points
    _row("edge", e2e=0.5, clip=29.0, shape=0.87),  # exactly at the limits: not beyond them
    _row("worse", e2e=0.25, clip=28.0, color=0.89, shape=0.8),  # -2 CLIP, -10 points shape
    _row("unmeasured", e2e=0.5, clip=None, color=None, shape=None, position=None, psnr_vs_baseline=None,
         quality_note="not applicable: builtin:sd15-arch has random weights"),
]


def test_verdict_leads_and_says_worse_held_or_not_measured(tmp_path):
    md_path, html_path = render_report([_results(tmp_path / "run", QUALITY_ROWS)], tmp_path / "out")
    md = md_path.read_text()
    assert md.splitlines()[:3] == ["# sd-workbench benchmark report", "", "## Verdict"]
    verdicts = _verdict_lines(md)
    assert list(verdicts) == ["held", "edge", "worse", "unmeasured"]  # not the baseline itself
    worse = verdicts["worse"]
    assert worse.startswith("- worse: 4.00× faster than fp32; CLIP −2.00, colour −1.0, shape −10.0, "
                            "position ±0.0 points")
    assert worse.endswith(": **worse** (CLIP and shape beyond the gate's limits)")
    for name in ("held", "edge"):
        assert verdicts[name].endswith(": quality held (no loss beyond the gate's limits)"), verdicts[name]
    assert "CLIP −1.00" in verdicts["edge"] and "shape −3.0" in verdicts["edge"]
    assert verdicts["unmeasured"].endswith("quality not measured (not applicable: builtin:sd15-arch has "
                                           "random weights)")
    assert "held" not in verdicts["unmeasured"] and "worse" not in verdicts["unmeasured"]
    assert "CLIP score at most 1 lower" in md and "at most 3 points lower" in md  # the gate's defaults
    page = html_path.read_text()
    assert page.index("<h2>Verdict</h2>") < page.index("<table")
    assert "<strong class='worse'>worse</strong> (CLIP and shape beyond the gate&#x27;s limits)" in page


def test_verdict_uses_the_thresholds_of_the_gate_config_given(tmp_path):
    gate = tmp_path / "gate.yaml"
    gate.write_text("thresholds:\n  clip_drop: 3.0\n  accuracy_drop: 12.0\n")
    md_path, _ = render_report([_results(tmp_path / "run", QUALITY_ROWS)], tmp_path / "out", gate=gate)
    md = md_path.read_text()
    assert _verdict_lines(md)["worse"].endswith("quality held (no loss beyond the gate's limits)")
    assert f"({gate})" in md and "CLIP score at most 3 lower" in md and "at most 12 points lower" in md


def _timed(seconds: float, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for v in seconds * (1 + 0.05 * rng.standard_normal(n))]


def _interval(cell: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"([0-9.]+)× \[([0-9.]+)–([0-9.]+)\]", cell)
    assert m, cell
    return float(m[1]), float(m[2]), float(m[3])


def test_speedup_interval_from_samples_contains_the_estimate_and_is_absent_without(tmp_path):
    base, fast = _timed(1.0, 8, 0), _timed(0.4, 8, 1)
    rows = [_row("fp32", e2e=float(np.median(base))), _row("int8", e2e=float(np.median(fast)))]
    with_samples = _results(tmp_path / "a", rows, {"fp32": {"e2e_s": base}, "int8": {"e2e_s": fast}})
    md = render_report([with_samples], tmp_path / "out-a")[0].read_text()
    _, table = _table(md, "Speed and quality")
    point, lo, hi = _interval(table[1]["speed-up"])
    assert lo < point < hi and point == pytest.approx(np.median(base) / np.median(fast), abs=0.005)
    assert 2.0 < lo and hi < 3.2  # 2.5x with 5 % noise and 8 runs a side
    assert f"{point:.2f}× faster [{lo:.2f}–{hi:.2f}] than fp32" in _verdict_lines(md)["int8"]
    assert table[0]["speed-up"] == "1.00×"  # the baseline against itself: no interval
    again = render_report([with_samples], tmp_path / "out-b")[0].read_text()
    assert _table(again, "Speed and quality")[1][1]["speed-up"] == table[1]["speed-up"]  # fixed seed

    for samples in (None, {"fp32": {"e2e_s": base[:3]}, "int8": {"e2e_s": fast[:3]}}):  # none / too few
        path = _results(tmp_path / f"b{samples is None}", rows, samples)
        md = render_report([path], tmp_path / f"out-{samples is None}")[0].read_text()
        cell = _table(md, "Speed and quality")[1][1]["speed-up"]
        assert re.fullmatch(r"[0-9.]+×", cell), cell
        assert "[" not in _verdict_lines(md)["int8"].split(" than ")[0]


def test_slower_variant_and_an_interval_holding_one_say_so(tmp_path):
    base, same = _timed(1.0, 8, 0), _timed(1.0, 8, 1)
    rows = [_row("fp32", e2e=float(np.median(base))), _row("twin", e2e=float(np.median(same))),
            _row("slow", e2e=2 * float(np.median(base)))]
    md = render_report([_results(tmp_path / "a", rows, {"fp32": {"e2e_s": base}, "twin": {"e2e_s": same}})],
                       tmp_path / "out")[0].read_text()
    assert "(within noise: the interval holds 1×)" in _verdict_lines(md)["twin"]
    assert _verdict_lines(md)["slow"].startswith("- slow: 2.00× slower than fp32")


def test_table_one_has_speed_and_quality_table_two_the_costs(tmp_path):
    rows = [_row("fp32", weights_dtype="fp16", size_mb=5.6),
            _row("int8", e2e=0.4, backend="onnxruntime", providers="CPUExecutionProvider", size_mb=11.3,
                 weights_dtype="fp32", method="prune channels 0.3 → ONNX → ort-int8-static (UNet)",
                 precision="UNet int8 (W8A8 static), rest fp32")]
    md = render_report([_results(tmp_path / "run", rows)], tmp_path / "out")[0].read_text()
    header, table = _table(md, "Speed and quality")
    assert header[:6] == ["variant", "what was done", "precision", "steps", "s/image median [p10–p90]",
                          "speed-up"]
    assert header[6:] == QUALITY_HEADERS and "source" not in header  # one source: no source column
    assert table[1]["what was done"] == "prune channels 0.3 → ONNX → ort-int8-static (UNet)"
    assert table[1]["precision"] == "UNet int8 (W8A8 static), rest fp32"
    assert table[0]["precision"] == "fp32"  # rows without the field: their dtype
    assert table[0]["what was done"] == "model builtin:tiny-shapes"
    assert table[1]["shape acc % [95% CI]"] == "90.0" and table[1]["Δ CLIP"] == "+0.00"
    cost_header, cost = _table(md, "Cost and details")
    assert "peak RSS MB" in cost_header and "UNet ms/call" in cost_header and "CMMD" not in cost_header
    assert [r["size MB (stored as)"] for r in cost] == ["5.60 (fp16)", "11.3 (fp32)"]
    assert cost[1]["backend / providers"] == "onnxruntime: CPUExecutionProvider"
    assert md.index("## Verdict") < md.index("## Speed and quality") < md.index("## Cost and details")


def test_numbers_on_the_pareto_plot_are_placed_apart():
    points = [(100.0, 100.0), (100.0, 100.0), (101.0, 99.0), (300.0, 100.0)]
    offsets = _dodged(points, step=11)
    spots = [(x + dx * 1.5, y + dy * 1.5) for (x, y), (dx, dy) in zip(points, offsets)]
    for i in range(len(spots)):
        for j in range(i):
            assert np.hypot(spots[i][0] - spots[j][0], spots[i][1] - spots[j][1]) >= 11


# --------------------------------------------------------------------------- recipe run directories


def _run_dir(root, stages):
    run = root / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"recipe": {"name": "demo"}, "stages": stages}))
    return run


def _invoke(args):
    import typer
    from typer.testing import CliRunner

    from sdwb.app.report_cli import report_command

    app = typer.Typer()
    app.command()(report_command)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_of_a_recipe_run_directory_finds_its_bench_results(tmp_path):
    bench = tmp_path / "runs" / "stages" / "bench-abc" / "demo"
    _results(bench, QUALITY_ROWS[:2])
    stages = [{"kind": "prune", "name": "prune", "artifact": "runs/stages/prune-x/out", "status": "ran"},
              # recorded relative to where `sdwb run` ran: the folder above runs/
              {"kind": "bench", "name": "demo", "artifact": "runs/stages/bench-abc/demo", "status": "ran"}]
    run = _run_dir(tmp_path, stages)
    result = _invoke([run])  # no -o: <run dir>/bench-report (its `report` links to the recipe's own)
    assert result.exit_code == 0, result.output
    md = (run / "bench-report" / "report.md").read_text()
    assert "held: 2.00× faster than fp32" in md and str(bench / "results.json") in md

    other = tmp_path / "runs" / "stages" / "bench-def" / "second"
    _results(other, [_row("fp32"), _row("int8", e2e=0.5)])
    stages.append({"kind": "bench", "name": "second", "artifact": str(other), "status": "ran"})
    (run / "run.json").write_text(json.dumps({"stages": stages}))
    result = _invoke([run, "-o", tmp_path / "both"])
    assert result.exit_code == 0, result.output
    _, table = _table((tmp_path / "both" / "report.md").read_text(), "Speed and quality")
    assert [r["source"] for r in table] == ["demo", "demo", "second", "second"]


def test_run_directory_without_bench_results_is_a_one_line_error(tmp_path):
    run = _run_dir(tmp_path, [{"kind": "prune", "name": "prune30", "artifact": "x", "status": "ran"}])
    result = _invoke([run, "-o", tmp_path / "out"])
    assert isinstance(result.exception, SdwbError) and "no bench stage" in str(result.exception)
    assert "prune30" in str(result.exception)
    (run / "run.json").write_text(json.dumps({"stages": [
        {"kind": "bench", "name": "demo", "artifact": str(tmp_path / "nothing"), "status": "pending"}]}))
    result = _invoke([run, "-o", tmp_path / "out"])
    message = str(result.exception)
    assert isinstance(result.exception, SdwbError) and "\n" not in message
    assert "bench stage without results: demo (pending" in message
    assert not (tmp_path / "out" / "report.md").exists()


def test_out_defaults_to_report_beside_the_results(tmp_path):
    path = _results(tmp_path / "run", [_row("fp32")])
    result = _invoke([path])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report" / "report.html").is_file()


# --------------------------------------------------------------------------- what a variant is


def _tensors(path, dtype, n=64):
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.zeros((n, n), dtype), "b": np.zeros(n, dtype)}, str(path))


def _onnx(path, initializers):
    import onnx
    from onnx import TensorProto, helper

    path.parent.mkdir(parents=True, exist_ok=True)
    inits = [helper.make_tensor(name, kind, dims, np.zeros(int(np.prod(dims))).tolist())
             for name, kind, dims in initializers]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_method_precision_and_stored_dtype_come_from_the_records_and_file_headers(tmp_path):
    from onnx import TensorProto

    from bench.variant_info import row_fields
    from sdwb.variants.files import weight_files

    base = tmp_path / "base"
    for comp in ("unet", "vae", "text_encoder"):
        _tensors(base / comp / "model.safetensors", np.float16)
    base_record = {"model": "builtin:tiny-shapes", "stage": "baseline", "parent": None, "store_dtype": "fp16"}
    (base / "sdwb.json").write_text(json.dumps(base_record))
    pruned = tmp_path / "pruned"
    _tensors(pruned / "unet" / "model.safetensors", np.float32)
    for comp in ("vae", "text_encoder"):
        _tensors(pruned / comp / "model.safetensors", np.float16)
    prune_record = {"stage": "prune", "method": "channels", "backend": "torch", "config": {"ratio": 0.3},
                    "parent": {"spec": "builtin:tiny-shapes", "path": str(base), "variant": base_record}}
    (pruned / "sdwb.json").write_text(json.dumps(prune_record))
    quant = tmp_path / "quant"
    files = [_onnx(quant / "unet" / "model.onnx",
                   [("w", TensorProto.INT8, [64, 64]), ("s", TensorProto.FLOAT, [64])]),
             _onnx(quant / "text_encoder" / "model.onnx", [("w", TensorProto.FLOAT, [32, 32])])]
    (quant / "sdwb.json").write_text(json.dumps({
        "stage": "quantize", "method": "ort-int8-static", "backend": "onnxruntime",
        "config": {"method": "ort-int8-static", "components": ["unet"]},
        "parent": {"spec": "export", "path": None, "variant": prune_record}}))
    (quant / "manifest.json").write_text(json.dumps({"format": "sdwb-onnx-export", "components": {}}))

    assert row_fields(base, weight_files(base), backend="torch", dtype="fp32") == {
        "method": "none", "precision": "fp32", "weights_dtype": "fp16"}
    assert row_fields(pruned, weight_files(pruned), backend="torch", dtype="fp32") == {
        "method": "prune channels 0.3", "precision": "fp32", "weights_dtype": "UNet fp32, rest fp16"}
    assert row_fields(quant, files, backend="onnxruntime", dtype="fp32") == {
        "method": "prune channels 0.3 → ONNX → ort-int8-static (UNet)",
        "precision": "UNet int8 (W8A8 static), rest fp32", "weights_dtype": "UNet int8, rest fp32"}
    # a torch cast with its keep-rules; an export of the pruned model; torch.compile; no record at all
    (quant / "sdwb.json").write_text(json.dumps({
        "stage": "quantize", "method": "torch-bf16", "backend": "torch",
        "config": {"components": ["unet"], "keep_fp32": ["GroupNorm", "conv_out"]}, "parent": None}))
    (quant / "manifest.json").unlink()
    assert row_fields(quant, None, backend="torch", dtype="fp32")["precision"] == \
        "UNet bf16 (GroupNorm, conv_out kept fp32), rest fp32"
    (pruned / "manifest.json").write_text(json.dumps({"format": "sdwb-onnx-export"}))
    exported = row_fields(pruned, None, backend="onnxruntime", dtype="fp32")
    assert exported["method"] == "prune channels 0.3 → ONNX"
    assert row_fields(base, None, backend="torch", dtype="bf16", compile_mode="max-autotune") == {
        "method": "torch.compile (max-autotune)", "precision": "bf16", "weights_dtype": None}
    assert row_fields(None, None, backend="torch", dtype="fp32")["method"] == "none"
    assert MISSING == "—"


def test_the_weights_each_row_measured_are_named(tmp_path):
    rows = [_row("fp32", weights_sha256="a" * 64),
            _row("int8", e2e=0.4, weights_sha256="b" * 64,
                 lineage="quantize torch-int8-dynamic <- builtin:tiny-shapes"),
            _row("arch", weights_sha256="built in code")]
    md = render_report([_results(tmp_path / "run", rows)], tmp_path / "out")[0].read_text()
    header, table = _table(md, "Weights measured")
    assert header[:3] == ["variant", "weights sha256", "made by (newest first)"]
    assert [r["weights sha256"] for r in table] == ["a" * 16, "b" * 16, "built in code"]
    assert table[1]["made by (newest first)"] == "quantize torch-int8-dynamic <- builtin:tiny-shapes"
    old = render_report([_results(tmp_path / "old", [_row("fp32")])], tmp_path / "out-old")[0].read_text()
    assert "## Weights measured" not in old  # results written before the column: no empty table
