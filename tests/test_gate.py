"""The regression gate (``sdwb gate``): bootstrap decisions, thresholds, outputs, exit codes.

Decisions are tested on synthetic per-run timings whose truth is known (same distribution, or
30 % slower; rounds that drift together); the ``--ab`` and ``--ab-rev`` forms run the real
benchmark on the tiny pipeline, once as A/A with a wide allowance and once with a large injected
UNet slowdown, and the injection itself is checked on a real UNet call. Latency against a file is
judged only between files timed on the same CPU. No timing bound is asserted on this machine's speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch

from bench.gate import (
    GateConfig,
    bootstrap_ratio,
    compare,
    cpu_mismatch,
    load_gate_config,
    paired_rounds_ratio,
    verdict,
    write_junit,
)
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


def drifting_rounds(n: int, scale: float = 1.0, seed: int = 0) -> tuple[list, list]:
    """``n`` rounds whose speed drifts by up to 2x from round to round, shared by both sides (a busy
    or slow machine for that round), plus 3 % run-to-run noise and one spoiled baseline half."""
    rng = np.random.default_rng(seed)
    base, cand = [], []
    for i in range(n):
        drift = rng.uniform(1.0, 2.0)
        base.append([x * drift for x in timings(4, seed=seed * 100 + 2 * i)])
        cand.append([x * drift for x in timings(4, scale, seed=seed * 100 + 2 * i + 1)])
    base[0] = [x * 5 for x in base[0]]  # a neighbour's burst during one half of one round
    return base, cand


def test_paired_rounds_ratio_cancels_shared_drift_and_a_spoiled_round():
    for seed in range(5):
        ratio, lo, hi = paired_rounds_ratio(*drifting_rounds(16, seed=seed))
        assert lo < 1 < hi and abs(ratio - 1) < 0.04 and hi < 1.05
        ratio, lo, hi = paired_rounds_ratio(*drifting_rounds(16, scale=1.15, seed=seed))
        assert 1.05 < lo <= ratio <= hi and abs(ratio - 1.15) < 0.04
    # unpaired, the same numbers cannot tell a 15 % slowdown from the drift
    base, cand = drifting_rounds(16, scale=1.15)
    _, lo, _ = bootstrap_ratio(sum(base, []), sum(cand, []))
    assert lo < 1.05
    with pytest.raises(SdwbError, match="2 baseline and 3 candidate rounds"):
        paired_rounds_ratio([[0.1], [0.1]], [[0.1], [0.1], [0.1]])
    with pytest.raises(SdwbError, match="finite, positive"):
        paired_rounds_ratio([[0.1], [0.1]], [[0.1], [float("nan")]])


ZEN4 = {"cpu": "AMD EPYC", "torch_threads": 2, "git_revision": "a2ac5b5",
        "cpu_flags": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma"]}
ZEN3 = {**ZEN4, "cpu_flags": ["avx2", "fma"]}


def test_decision_rules():
    """interval-above-limit needs the whole interval past 1 + limit; significant-and-above-limit
    (asv's) a significant slowdown whose estimate is past the limit."""
    from bench.gate import _ratio_check

    def status(interval, rule):
        return _ratio_check("m", interval, 5.0, 1.0, 1.0, "", rule).status

    assert status((1.08, 1.02, 1.14), "interval-above-limit") == "inconclusive"
    assert status((1.08, 1.02, 1.14), "significant-and-above-limit") == "regression"
    assert status((1.04, 1.01, 1.07), "significant-and-above-limit") == "inconclusive"  # within 5 %
    assert status((1.08, 0.99, 1.17), "significant-and-above-limit") == "inconclusive"  # not significant
    assert status((1.10, 1.06, 1.14), "interval-above-limit") == "regression"
    assert status((1.01, 0.98, 1.04), "significant-and-above-limit") == "pass"
    with pytest.raises(SdwbError, match="statistics.rule"):
        load_gate_config(None, ["statistics.rule=whatever"])


def test_cpu_mismatch_names_what_differs():
    assert cpu_mismatch(ZEN4, dict(ZEN4)) is None
    assert cpu_mismatch(ZEN4, ZEN3) == "CPU differs: flags baseline only avx512_bf16 avx512_vnni avx512f"
    assert cpu_mismatch(ZEN4, {**ZEN4, "cpu": "Intel Xeon"}).startswith("CPU differs: AMD EPYC vs Intel")
    assert cpu_mismatch(ZEN4, {**ZEN4, "torch_threads": 1}) == "threads differ: 2 vs 1"
    assert "does not record" in cpu_mismatch({}, ZEN4)


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
    ci = load_gate_config(ROOT / "configs/gate/ci.yaml")  # CI's latency decision: --ab-rev rounds
    assert ci.measure.rounds >= 16 and ci.statistics.min_rounds <= ci.measure.rounds
    assert ci.thresholds.latency_pct <= 5 and ci.thresholds.file_latency_pct is None  # CI: reported only
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


def write_results(path: Path, rows: list[dict], samples: dict, environment: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = {"rows": rows, "samples": samples, "environment": ZEN4 if environment is None else environment}
    (path / "results.json").write_text(json.dumps(data))
    return path / "results.json"


def sdwb_exit(argv: list[str], capsys) -> tuple[int, str]:
    """Run the real entry point (``sdwb.app.cli.main``: error lines and exit codes) on ``argv``."""
    from sdwb.app.cli import main

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
    code, out = sdwb_exit(["gate", "--baseline", str(base)], capsys)
    assert code == 2 and "together" in out


def test_files_timed_on_another_cpu_are_not_compared_for_latency(tmp_path, capsys):
    """Zen 3 is 2x slower than the Zen 4 baseline on unchanged code: not a regression, and said so;
    a quality drop on the other CPU is still caught."""
    base = write_results(tmp_path / "b", [row()], {"v": {"e2e_s": timings(10, seed=1)}}, ZEN4)
    zen3 = write_results(tmp_path / "z", [row()], {"v": {"e2e_s": timings(10, 2.0, seed=2)}}, ZEN3)
    files = ["gate", "--baseline", str(base), "--candidate", str(zen3)]
    code, out = sdwb_exit([*files, "-o", str(tmp_path / "o")], capsys)
    assert code == 0, out
    assert "latency (s/image): not comparable (CPU differs: flags baseline only avx512_bf16" in out
    gate = json.loads((tmp_path / "o/gate.json").read_text())
    assert {c["metric"]: c["status"] for c in gate["checks"]}["latency (s/image)"] == "skipped"
    md = (tmp_path / "o/gate.md").read_text()
    assert "baseline file: git a2ac5b5, CPU AMD EPYC (flags: avx2 avx512_bf16" in md
    assert "candidate file: git a2ac5b5, CPU AMD EPYC (flags: avx2 fma), 2 threads" in md
    worse = write_results(tmp_path / "q", [row(shape_acc=0.70)], {"v": {"e2e_s": timings(10, 2.0)}}, ZEN3)
    code, out = sdwb_exit(["gate", "--baseline", str(base), "--candidate", str(worse)], capsys)
    assert code == 1 and "shape accuracy % -10.00 points (regression)" in out
    unknown = write_results(tmp_path / "u", [row()], {"v": {"e2e_s": timings(10, 2.0, seed=2)}}, {})
    code, out = sdwb_exit(["gate", "--baseline", str(base), "--candidate", str(unknown)], capsys)
    assert code == 0 and "not comparable (the candidate does not record its CPU" in out
    # peak RSS depends on the CPU's kernels too: +20 % on another CPU is not compared, on the same CPU it is
    samples = {"v": {"e2e_s": timings(10, seed=3)}}
    heavier = write_results(tmp_path / "m", [row(peak_rss_mb=480.0)], samples, ZEN3)
    code, out = sdwb_exit(["gate", "--baseline", str(base), "--candidate", str(heavier)], capsys)
    assert code == 0 and "peak RSS (MB): not comparable (CPU differs" in out, out
    same_cpu = write_results(tmp_path / "s", [row(peak_rss_mb=480.0)], samples, ZEN4)
    code, out = sdwb_exit(["gate", "--baseline", str(base), "--candidate", str(same_cpu)], capsys)
    assert code == 1 and "peak RSS (MB) +20.0 % (regression)" in out, out


def test_ci_reports_but_never_judges_file_latency(tmp_path, capsys):
    """Same CPU, unchanged code, another day: +74 % measured here. CI shows it and does not fail."""
    committed = ROOT / "reports/baselines/tiny-shapes-cpu.json"
    data = json.loads(committed.read_text())
    data["samples"] = {v: {k: [x * 1.74 for x in xs] for k, xs in runs.items()}
                       for v, runs in data["samples"].items()}
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(data))
    code, out = sdwb_exit(["gate", "--baseline", str(committed), "-c", str(ROOT / "configs/gate/ci.yaml"),
                           "--candidate", str(slower), "-o", str(tmp_path / "o")], capsys)
    assert code == 0, out
    assert "latency (s/image) +74.0 % [" in out and "(not gated)" in out
    gate = json.loads((tmp_path / "o/gate.json").read_text())
    latency = {c["metric"]: c for c in gate["checks"]}["latency (s/image)"]
    assert latency["status"] == "skipped" and latency["detail"].startswith("reported only")


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


def _git_head() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.slow
def test_ab_rev_times_a_revision_beside_the_working_tree(tiny_pipeline_dir, tmp_path, capsys):
    """``--ab-rev HEAD``: HEAD's code copied out of git and the working tree's, each in its own
    worker process, in paired rounds, each side's peak RSS probed in a fresh process; a huge
    injected slowdown on the head side is caught while its memory, which the slowdown does not
    touch, passes. (One run: each costs a minute; CI's own gate runs --ab-rev without injection.)"""
    head = _git_head()
    if head is None:
        pytest.skip("not a git checkout")
    common = ["--set", f"measure.model={tiny_pipeline_dir}", "--set", "measure.rounds=2",
              "--set", "measure.processes=1", "--set", "statistics.min_rounds=2", "--set", "measure.steps=2",
              "--set", "measure.repeats=2", "--set", "measure.warmup=0", "--set", "measure.n_prompts=1",
              "--set", "measure.threads=1", "--no-progress"]
    code, out = sdwb_exit(["gate", "--ab-rev", "HEAD", "-o", str(tmp_path / "slow"), "--inject-slowdown", "3",
                           "--set", "thresholds.unet_latency_pct=50", *common], capsys)
    assert code == 1 and "UNet call (ms) +" in out and "(regression)" in out, out
    gate = json.loads((tmp_path / "slow/gate.json").read_text())
    assert gate["ab_rev"]["base"] == f"HEAD = {head[:12]}"
    sides = json.loads((tmp_path / "slow/ab-rev/sides.json").read_text())
    for side in ("base", "head"):
        assert len(sides[side]["rounds"]) == 2 and all(len(r["e2e_s"]) == 2 for r in sides[side]["rounds"])
        assert sides[side]["memory"]["peak_rss_mb"] > 50  # one fresh-process probe per side, this run
        assert sides[side]["environment"]["torch_threads"] == 1 and sides[side]["environment"]["cpu_flags"]
    md = (tmp_path / "slow/gate.md").read_text()
    assert f"- base: git HEAD = {head[:12]}, CPU " in md and "- head: git " in md
    memory = {c["metric"]: c for c in gate["checks"]}["peak RSS (MB)"]
    assert memory["status"] == "pass" and memory["baseline"] == sides["base"]["memory"]["peak_rss_mb"]


def test_ab_rev_refuses_what_is_not_a_revision(tmp_path, capsys):
    if _git_head() is None:
        pytest.skip("not a git checkout")
    code, out = sdwb_exit(["gate", "--ab-rev", "no-such-rev-xyz", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "--ab-rev no-such-rev-xyz: not a commit" in out
    assert len(out.strip().splitlines()) == 1
    code, out = sdwb_exit(["gate", "--ab-rev", "HEAD", "--ab", "a", "b"], capsys)
    assert code == 2 and "not both" in out


def test_ci_gate_base_is_an_ancestor_of_head():
    import subprocess

    if _git_head() is None:
        pytest.skip("not a git checkout")
    base = subprocess.run(["bash", str(ROOT / ".ci/gate-base")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    assert base, "gate-base printed nothing"
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", base, "HEAD"], cwd=ROOT)
    assert ancestor.returncode == 0
    override = subprocess.run(["bash", str(ROOT / ".ci/gate-base")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "GATE_BASE": "abc123"}).stdout.strip()
    assert override == "abc123"
