"""``tools/gpu_check.py`` (``make gpu-check``), exercised on the CPU: its dry run writes every output
file, well formed, with a status for every step; the carried wheels are installed only where the
interpreter lacks a distribution or has it older. The GPU parts themselves need a lent GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tools/ is not an installed package
    sys.path.insert(0, str(ROOT))
from tools import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run (about 50 s on 2 CPU cores), without wheels: ``(exit code, output folder, stdout)``."""
    out = tmp_path_factory.mktemp("gpu-check")
    no_wheels = tmp_path_factory.mktemp("no-wheels")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "-o", str(out),
                           "--wheels", str(no_wheels)], capture_output=True, text=True, timeout=300)
    return proc.returncode, out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_dry_run_writes_every_file_with_a_status_per_step(dry_run):
    from bench.results import load_results

    code, out, output = dry_run
    assert code == 0, output[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == {"environment.json", "log.txt", "results.json", "results.csv", "summary.md",
                     "pytest-gpu.xml", "tiny-shapes-results.json"}  # <= 8: what the device tool brings back
    env = json.loads((out / "environment.json").read_text())
    assert env["dry_run"] is True and env["torch"] and env["cpu"] and len(env["source_sha256"]) == 16
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is True
    assert set(results["steps"]) == {"wheels", *gpu_check.BY_NAME}
    for name, step in results["steps"].items():
        assert step["status"] in ("ok", "skipped", "error"), (name, step)
        assert step["status"] != "error", (name, step.get("error"))
    skipped = {n for n, s in results["steps"].items() if s["status"] == "skipped"}
    assert skipped == {"wheels", "sd15-compile", "sd15-reduce-overhead"}
    assert results["steps"]["sd15-compile"]["reason"] == gpu_check.DRY_SKIP
    assert results["steps"]["sd15-unet"]["details"]["skipped"] == {"fp16": gpu_check.DRY_SKIP,
                                                                    "fp16-cudagraph": gpu_check.DRY_SKIP}
    df, _ = load_results(out / "results.json")  # the project's results format: sdwb report reads it
    variants = set(df["variant"])
    assert {"sd15-arch-unet-fp32", "sd15-arch-unet-bf16", "sdxl-arch-unet-bf16", "tiny-shapes-b1",
            "tiny-shapes-b2", "distill-progressive", "prune-recovery"} <= variants
    unet = df[df["scenario"] == gpu_check.UNET_SCENARIO]
    assert (unet["unet_ms_per_call"] > 0).all() and unet["speedup"].notna().all()
    assert results["samples"]["sd15-arch-unet-fp32"]["unet_ms"]
    train = df[df["scenario"] == "training"]
    assert (train["optimizer_steps"] == 2).all() and (train["optimizer_steps_per_s"] > 0).all()
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run)") and "| sd15-compile | skipped |" in summary
    assert "== sd15-unet" in (out / "log.txt").read_text()


def test_without_cuda_and_without_dry_run_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "-o", str(tmp_path),
                           "--wheels", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"]["cuda"]["status"] == "error" and "--dry-run" in results["steps"]["cuda"]["error"]


def test_wheels_install_only_what_is_missing_or_older(tmp_path, monkeypatch):
    wheels = [Path(n) for n in ("a_pkg-1.0-py3-none-any.whl", "b_pkg-2.0-py3-none-any.whl",
                                "c_pkg-3.0-py3-none-any.whl")]
    have = {"a_pkg": "1.0", "b_pkg": "1.9"}.get  # a: same version, b: older, c: absent
    todo, present = gpu_check.wheels_to_install(wheels, have)
    assert [w.name for w in todo] == ["b_pkg-2.0-py3-none-any.whl", "c_pkg-3.0-py3-none-any.whl"]
    assert present == {"a_pkg": "1.0"}

    # a real (minimal) wheel, installed by pip into the scratch site, which then leads sys.path
    name, wheel_dir, site = "sdwb_gpu_check_probe", tmp_path / "whl", tmp_path / "site"
    wheel_dir.mkdir()
    info = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(wheel_dir / f"{name}-0.1-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    said = []
    result = gpu_check.install_wheels(wheel_dir, site, said.append)
    assert result["status"] == "ok" and result["details"]["installed"] == [f"{name}-0.1-py3-none-any.whl"]
    assert sys.path[0] == str(site) and (site / f"{name}.py").is_file()
    env = gpu_check.child_env(site, dry_run=True)
    assert env["PYTHONPATH"].split(":")[:2] == [str(site), str(ROOT)] and env["CUDA_VISIBLE_DEVICES"] == ""
