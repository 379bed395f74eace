"""What a new user sees (#24): captioned grids, eval scores in a file, no third-party noise."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest


def _main(args: list[str]) -> int:
    from sdwb.app import cli

    try:
        cli.main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# --------------------------------------------------------------------------- captions


def test_captions_wrap_at_spaces_and_keep_the_seed_line():
    from sdwb.generate import wrap_caption

    lines = wrap_caption("a small red circle at the top", 12, len)
    assert lines == ["a small red", "circle at", "the top"]
    assert wrap_caption("abcdefghijklmnop", 6, len) == ["abcdef", "ghijkl", "mnop"]  # one long word: split
    cut = wrap_caption("one two three four five six seven eight\nseed 7", 9, len, max_lines=3)
    assert cut == ["one two", "three...", "seed 7"] and all(len(line) <= 9 for line in cut)


def test_captioned_grid_has_text_under_each_image():
    from PIL import Image

    from sdwb.generate import captioned_grid

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    images = [Image.new("RGB", (48, 48), c) for c in colours]
    captions = ["a red square", "a green square on a white background, a long caption", "blue\nseed 2"]
    grid = np.asarray(captioned_grid(images, captions, columns=3))
    assert grid.shape[0] > 48 + 10 and grid.shape[1] >= 3 * 48  # images plus a caption band
    for colour in colours:  # each image pasted whole in the top band, with dark text under it
        xs = np.where((grid[:48] == colour).all(axis=-1).all(axis=0))[0]
        assert len(xs) == 48, colour
        under = grid[48:, xs[0]:xs[-1] + 1]
        assert (under < 100).all(axis=-1).any(), f"no caption under {colour}"
    with pytest.raises(ValueError):
        captioned_grid(images, captions[:2], columns=3)


# --------------------------------------------------------------------------- baseline eval


def test_baseline_eval_writes_its_json_beside_the_grid(tmp_path, capsys):
    grid = tmp_path / "new" / "eval-grid.png"  # the directory does not exist yet
    code = _main(["baseline", "eval", "--prompts", "2", "--steps", "2", "--grid", str(grid)])
    out, err = capsys.readouterr()
    assert code == 0, err
    written = tmp_path / "new" / "eval-grid.json"
    data = json.loads(written.read_text())
    assert data["prompts"] == 2 and data["steps"] == 2 and data["model"] == "builtin:tiny-shapes"
    assert data["shape_acc"] in (0.0, 0.5, 1.0) and grid.is_file()  # a share of 2 judged images
    assert f"wrote {written}" in err
    assert json.loads(out[out.index("{"):]) == data  # stdout shows the same scores
    explicit = tmp_path / "scores.json"
    code = _main(["baseline", "eval", "--prompts", "1", "--steps", "1", "--json", str(explicit)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(explicit.read_text())["prompts"] == 1 and f"wrote {explicit}" in err


def test_baseline_eval_bad_json_path_fails_before_loading(tmp_path, capsys):
    code = _main(["baseline", "eval", "--json", str(tmp_path / "scores.txt")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and "scores.txt" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- third-party noise


def _matmul_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_ort_quantizer_preprocessing_advice_is_dropped(tmp_path, caplog, capfd):
    from onnxruntime.quantization import quantize_dynamic

    from compress.quant_ort import _ort_quantizer_quiet, quantize_dynamic_file
    from sdwb.quant.config import parse_quant_config

    src = _matmul_model(tmp_path / "f.onnx")
    caplog.set_level(logging.WARNING)
    quantize_dynamic(src, tmp_path / "raw.onnx")  # ONNX Runtime itself gives the advice ...
    assert "pre-processing" in caplog.text
    caplog.clear()
    quantize_dynamic_file(src, tmp_path / "q.onnx", parse_quant_config({"method": "ort-int8-dynamic"}, "t"))
    with _ort_quantizer_quiet():  # ... sdwb drops that message only
        logging.getLogger().warning("another warning")
    assert "pre-processing" not in caplog.text and "pre-processing" not in capfd.readouterr().err
    assert "another warning" in caplog.text and (tmp_path / "q.onnx").is_file()


def test_nncf_draws_no_progress_bars_in_a_registered_quantizer():
    pytest.importorskip("nncf")
    from nncf.common.logging.track_progress import track

    from compress.quant_ov import QUANTIZERS, no_nncf_progress_bars, quantizes

    assert track(range(2), description="x").progress.disable is False  # NNCF's default: drawn
    with no_nncf_progress_bars():
        assert track(range(2), description="x").progress.disable is True

    @quantizes("test-only-method")
    def probe(model, config, name, feeds):
        return track(range(2), description="x").progress.disable

    try:
        assert QUANTIZERS["test-only-method"](None, None, "unet", []) is True
    finally:
        QUANTIZERS.pop("test-only-method", None)
    assert track(range(2), description="x").progress.disable is False  # restored afterwards


def test_load_pipeline_draws_no_library_progress_bars(tiny_pipeline_dir, capfd):
    from diffusers.utils import logging as diffusers_logging

    from sdwb.loading import load_pipeline

    diffusers_logging.enable_progress_bar()  # as a fresh process starts
    pipe = load_pipeline(str(tiny_pipeline_dir))
    assert "Loading pipeline components" not in capfd.readouterr().err
    assert not diffusers_logging.is_progress_bar_enabled()
    assert pipe._progress_bar_config.get("disable") is True  # no denoising bar of its own either
