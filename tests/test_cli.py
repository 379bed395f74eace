"""The ``sdwb`` CLI: commands work, and bad input is one ``error:`` line with no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "configs" / "recipes" / "baseline.yaml"
BUILTINS = ("builtin:tiny-shapes", "builtin:shapes-judge", "builtin:sd15-arch", "builtin:tiny-shapes-4step",
            "builtin:sdxl-arch", "builtin:tiny-shapes-lora-ring")


def sdwb(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m sdwb ARGS`` in a fresh process (as a user would)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    full_env.pop("SDWB_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sdwb", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def cli(*args: str) -> subprocess.CompletedProcess:
    """``sdwb ARGS`` through the real entry point (``sdwb.app.cli.main``: its error lines and exit
    codes) in this process: ~2 s cheaper per call than a fresh interpreter. The tests that are about
    the process itself (help, version, usage errors, a missing model) use :func:`sdwb`."""
    import contextlib
    import io

    from sdwb.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["sdwb", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_help_and_version():
    result = sdwb("--help")
    assert result.returncode == 0
    for command in ("models", "generate", "data", "config"):
        assert command in result.stdout
    result = sdwb("--version")
    assert result.returncode == 0 and result.stdout.startswith("sdwb 0.")


def test_models_lists_the_builtins():
    result = cli("models")
    assert result.returncode == 0, result.stderr
    for name in BUILTINS:
        assert name in result.stdout
    rows = {r["name"]: r for r in json.loads(cli("models", "--json").stdout)}
    assert set(rows) == set(BUILTINS)
    assert rows["builtin:sd15-arch"]["available"] is True
    assert rows["builtin:sd15-arch"]["quality_metrics"] is False
    assert rows["builtin:tiny-shapes"]["quality_metrics"] is True
    assert rows["builtin:sdxl-arch"]["family"] == "SDXL" and rows["builtin:sd15-arch"]["family"] == "SD 1.x"
    assert "Stable Diffusion families" in result.stdout and "SDXL" in result.stdout


def test_config_check_prints_resolved_recipe():
    result = cli("config", "check", str(BASELINE), "--set", "bench.steps=4", "-s", "generate.seed=7")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert data["bench"]["steps"] == 4 and data["generate"]["seed"] == 7
    assert data["generate"]["height"] is None  # defaults are filled in
    assert "config hash" in result.stdout.splitlines()[0]


def test_config_check_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbench:\n  steps: four\n")
    result = cli("config", "check", str(bad))
    assert result.returncode == 2
    assert_one_line_error(result, str(bad), "bench.steps", "integer")
    bad.write_text("bench:\n  stepz: 4\n")
    assert_one_line_error(cli("config", "check", str(bad)), "bench.stepz", "unknown key")
    bad.write_text("bench: [1,\n")
    assert_one_line_error(cli("config", "check", str(bad)), "malformed YAML", f"{bad}:")
    assert_one_line_error(cli("config", "check", str(tmp_path / "missing.yaml")), "missing.yaml")
    assert_one_line_error(cli("config", "check", str(BASELINE), "--set", "bench.steps"), "KEY=VALUE")


def test_data_preview_writes_png_and_json(tmp_path):
    out = tmp_path / "sub" / "grid.png"
    result = cli("data", "preview", "-n", "6", "--seed", "3", "--columns", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (3 * 256, 2 * 200)
        pixels = np.asarray(img)
    assert pixels.std() > 10  # not a blank image
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [s["seed"] for s in meta["samples"]] == [3, 4, 5, 6, 7, 8]


def test_data_preview_bad_inputs(tmp_path):
    assert_one_line_error(cli("data", "preview", "-n", "0", "-o", str(tmp_path / "g.png")), "--count")
    (tmp_path / "afile").write_text("")
    assert_one_line_error(cli("data", "preview", "-o", str(tmp_path / "afile" / "g.png")), "afile")
    assert_one_line_error(cli("data", "preview", "-o", str(tmp_path / "g.gif")), ".png")


def test_generate_missing_model_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    out = str(tmp_path / "o.png")
    result = sdwb("generate", "--model", str(missing), "--prompt", "a red circle", "-o", out)
    assert_one_line_error(result, str(missing))
    assert not (tmp_path / "o.png").exists()


def test_generate_bad_options_fail_before_loading(tmp_path):
    out = str(tmp_path / "o.png")
    result = cli("generate", "-p", "x", "-o", out, "--backend", "onnxruntime")
    assert_one_line_error(result, "sdwb export onnx")
    assert_one_line_error(cli("generate", "-p", "x", "-o", out, "--scheduler", "pndm"), "generate.scheduler")
    assert_one_line_error(cli("generate", "-p", "x", "-o", out, "--steps", "0"), "generate.steps")
    assert_one_line_error(cli("generate", "-p", "x", "-o", str(tmp_path / "o.txt")), "o.txt")


def test_internal_errors_are_one_line_unless_debug(monkeypatch, capsys):
    from sdwb import zoo
    from sdwb.app import cli

    def boom():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(zoo, "list_models", boom)
    with pytest.raises(SystemExit) as info:
        cli.main(["models"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: internal: RuntimeError: boom second line") and "\n" not in err
    monkeypatch.setenv("SDWB_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["models"])


def test_generate_end_to_end_on_a_tiny_pipeline(tmp_path, monkeypatch, capsys):
    """A diffusers-layout directory written here goes through the real loader and generator."""
    from sdwb.app import cli
    from sdwb.testing import build_tiny_pipeline

    model_dir = tmp_path / "tiny"
    build_tiny_pipeline(seed=0).save_pretrained(model_dir)
    out = tmp_path / "out" / "img.png"
    try:  # success returns (or exits 0, as typer's standalone mode did)
        cli.main(["generate", "--model", str(model_dir), "-p", "a small red circle at the top on a gray "
                  "background", "--batch", "2", "--steps", "2", "--seed", "5", "--no-progress",
                  "--device", "cpu", "-s", "generate.guidance=2", "-o", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    from PIL import Image

    singles = [np.asarray(Image.open(out.with_name(f"img-{k:03d}.png"))) for k in range(2)]
    assert singles[0].shape == (32, 32, 3)
    assert not np.array_equal(singles[0], singles[1])  # seeds 5 and 6 give different noise
    with Image.open(out) as image:
        grid = np.asarray(image.convert("RGB"))
    assert grid.shape[0] > 32 and grid.shape[1] >= 64  # the images plus a caption band under them
    starts = [next(x for x in range(grid.shape[1] - 31) if np.array_equal(grid[:32, x:x + 32], single))
              for single in singles]  # each image pasted as generated, left to right
    assert starts[0] < starts[1]
    for x in starts:  # its caption (prompt + seed) is drawn in dark text under it
        assert (grid[32:, x:x + 32] < 100).all(axis=-1).any(), "no caption under an image"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [i["seed"] for i in meta["images"]] == [5, 6]
    assert meta["config"]["generate"]["steps"] == 2 and meta["config"]["generate"]["guidance"] == 2.0
    assert meta["config"]["model"] == str(model_dir) and len(meta["config_hash"]) == 12


def test_usage_errors_are_one_line():
    """typer's own usage errors (missing argument, unknown option) print one ``error:`` line, exit 2."""
    missing = sdwb("report")
    assert missing.returncode == 2
    assert_one_line_error(missing, "Missing argument", "sdwb report --help")
    unknown = sdwb("bench", "--no-such-flag")
    assert unknown.returncode == 2
    assert_one_line_error(unknown, "--no-such-flag")


def test_help_fits_80_columns():
    """Help is plain click text wrapped at the terminal width: no line over 80 columns, no box."""
    result = sdwb("compress", "quantize", "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert "╭" not in result.stdout and "…" not in result.stdout
    assert "torchao-int8-weight-only" in result.stdout.replace("\n", "").replace(" ", "")
