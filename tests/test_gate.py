"""The regression gate (``sdwb gate``): bootstrap decisions, thresholds, outputs, exit codes.

Decisions are tested on synthetic per-run timings whose truth is known (same distribution, or
30 % slower); the ``--ab`` form runs the real benchmark on the tiny pipeline, once as A/A with a
wide allowance and once with a large injected UNet slowdown, and the injection itself is checked
on a real UNet call. No timing bound is asserted on this machine's speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch

from bench.gate import GateConfig, bootstrap_ratio, compare, load_gate_config, verdict, write_junit
from bench.latency import ComponentTimer
from sdwb.errors import SdwbError

ROOT = Path(__file__).resolve().parents[1]


def timings(n: int, scale: float = 1.0, seed: int = 0, noise: float = 0.03) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(0.1 * scale * (1 + noise * rng.standard_normal(n)))


def row(**kw) -> dict:
    # as sdwb bench writes them: CLIP score 0-100, accuracies as fractions
    base = {"variant": "v", "peak_rss_mb": 400.0, "clip_score": 90.0, "color_acc": 1.0, "shape_acc": 0.80,
            "position_acc": 1.0}
    return {**base, **kw}


def test_bootstrap_interval_covers_one_for_same_and_excludes_it_for_slower():
    ratio, lo, hi = bootstrap_ratio(timings(20, seed=1), timings(20, seed=2))
    assert lo < 1 < hi and abs(ratio - 1) < 0.05
    ratio, lo, hi = bootstrap_ratio(timings(20, seed=1), timings(20, scale=1.3, seed=2))
    assert 1.2 < lo <= ratio <= hi and abs(ratio - 1.3) < 0.05
    with pytest.raises(SdwbError, match="at least 2 runs"):
        bootstrap_ratio([0.1], [0.1, 0.2])


def test_compare_flags_each_metric_beyond_its_threshold():
    cfg = GateConfig()
    same = compare(row(), {"e2e_s": timings(15, seed=1)}, row(), {"e2e_s": timings(15, seed=2)}, cfg)
    assert verdict(same) == "passed"
    assert {c.metric: c.status for c in same}["latency (s/image)"] in ("pass", "inconclusive")

    slow = compare(row(), {"e2e_s": timings(15, seed=1)}, row(), {"e2e_s": timings(15, 1.3, seed=2)}, cfg)
    assert {c.metric: c.status for c in slow}["latency (s/image)"] == "regression"
    assert verdict(slow) == "regression"

    worse_row = row(shape_acc=0.74, color_acc=0.98, peak_rss_mb=480.0, clip_score=89.5)
    worse = compare(row(), {}, worse_row, {}, cfg)
    status = {c.metric: c.status for c in worse}
    assert status["shape accuracy %"] == "regression"  # -6 points > 3 allowed
    assert status["colour accuracy %"] == "pass"  # -2 points within 3
    assert status["peak RSS (MB)"] == "regression"  # +20 % > 10 allowed
    assert status["CLIP score"] == "pass"  # -0.5 within 1.0
    assert status["latency (s/image)"] == "skipped"  # no per-run samples: not decided on one number

    with pytest.raises(SdwbError, match="needs at least 5 each"):
        compare(row(), {"e2e_s": timings(3)}, row(), {"e2e_s": timings(3)}, cfg)


def test_junit_and_config_errors():
    cfg = GateConfig()
    checks = compare(row(), {}, row(color_acc=0.90), {}, cfg)
    path = write_junit(Path(pytest.importorskip("tempfile").mkdtemp()) / "g.xml", "suite", checks)
    suite = ET.parse(path).getroot()
    assert suite.get("failures") == "1" and int(suite.get("tests")) == len(checks)
    assert suite.find("testcase[@name='colour accuracy %']/failure") is not None

    assert load_gate_config(ROOT / "configs/gate/default.yaml").thresholds.latency_pct == 5.0
    assert load_gate_config(ROOT / "configs/gate/ci.yaml").measure.repeats >= 5
    with pytest.raises(SdwbError, match="thresholds.latency_pctt: unknown key"):
        load_gate_config(None, ["thresholds.latency_pctt=3"])


class SleepyUNet(torch.nn.Module):
    """A UNet stand-in whose call takes at least 20 ms (sleep: immune to CPU load)."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_injected_slowdown_lengthens_the_unet_call():
    class Pipe:  # only the timer's injection is under test
        unet = SleepyUNet()

    pipe, x = Pipe(), torch.zeros(1)
    plain, slowed = [], []
    for slowdown, out in ((0.0, plain), (1.0, slowed)) * 3:
        with ComponentTimer(pipe, unet_slowdown=slowdown) as timer:
            pipe.unet.forward(x)
        out.append(timer.take()["unet"][0])
    assert min(plain) >= 0.02 and min(slowed) >= 0.04  # +100 %: the call's own time again, spun
    assert not hasattr(pipe.unet.forward, "__wrapped__") and "forward" not in pipe.unet.__dict__  # unwrapped


def write_results(path: Path, rows: list[dict], samples: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"rows": rows, "samples": samples}))
    return path / "results.json"


def sdwb_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Run the real entry point (``sdwb.cli.main``: error lines and exit codes) on ``argv``."""
    from sdwb.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def test_cli_files_form_exit_codes_and_outputs(tmp_path, capsys):
    base = write_results(tmp_path / "b", [row()], {"v": {"e2e_s": timings(10, seed=1)}})
    same = write_results(tmp_path / "s", [row()], {"v": {"e2e_s": timings(10, seed=2)}})
    slow = write_results(tmp_path / "w", [row()], {"v": {"e2e_s": timings(10, 1.5, seed=2)}})
    files = ["gate", "--baseline", str(base), "--candidate"]
    code, out = sdwb_exit([*files, str(same), "-o", str(tmp_path / "o1")], capsys)
    assert code == 0, out
    assert "passed" in (tmp_path / "o1/gate.md").read_text()
    code, out = sdwb_exit([*files, str(slow), "-o", str(tmp_path / "o2")], capsys)
    assert code == 1 and "REGRESSION" in out
    assert ET.parse(tmp_path / "o2/gate.junit.xml").getroot().get("failures") == "1"
    code, out = sdwb_exit([*files, str(tmp_path / "none.json")], capsys)
    assert code == 2 and "results file not found" in out and len(out.strip().splitlines()) == 1
    code, out = sdwb_exit(["gate", "--ab", "a", "b", "--baseline", str(base)], capsys)
    assert code == 2 and "not both" in out


def test_committed_baseline_gates_itself_and_a_worse_copy(tmp_path, capsys):
    committed = ROOT / "reports/baselines/tiny-shapes-cpu.json"
    data = json.loads(committed.read_text())
    gate = ["gate", "--baseline", str(committed), "-c", str(ROOT / "configs/gate/ci.yaml"), "--candidate"]
    code, out = sdwb_exit([*gate, str(committed), "-o", str(tmp_path / "same")], capsys)
    assert code == 0, out
    data["rows"][0]["shape_acc"] -= 0.05  # five points, in the units results.json stores
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(data))
    code, out = sdwb_exit([*gate, str(worse), "-o", str(tmp_path / "worse")], capsys)
    assert code == 1 and "shape accuracy % -5.00 points (regression)" in out


def test_ab_measures_both_and_catches_an_injected_slowdown(tiny_pipeline_dir, tmp_path, capsys):
    model = str(tiny_pipeline_dir)
    common = ["--set", "measure.steps=2", "--set", "measure.repeats=6", "--set", "measure.warmup=1",
              "--set", "measure.n_prompts=1", "--set", "measure.threads=1", "--no-progress"]
    code, out = sdwb_exit(["gate", "--ab", model, model, "-o", str(tmp_path / "aa"),
                           "--set", "thresholds.latency_pct=100", *common], capsys)
    assert code == 0, out
    results = json.loads((tmp_path / "aa/bench/results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"baseline", "candidate"}
    assert len(results["samples"]["candidate"]["e2e_s"]) == 6

    code, out = sdwb_exit(["gate", "--ab", model, model, "-o", str(tmp_path / "slow"),
                           "--inject-slowdown", "3", "--set", "thresholds.unet_latency_pct=50", *common],
                          capsys)
    assert code == 1, out
    md = (tmp_path / "slow/gate.md").read_text()
    assert "UNet call (ms)" in md and "REGRESSION" in md and "300%" in md
