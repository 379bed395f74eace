"""How often does CI's latency gate (``sdwb gate --ab-rev``) pass an A/A comparison, and catch a
15 % slower UNet?

Each trial is the command `.ci/run` makes (``make gate``'s latency part), run as a subprocess:
``sdwb gate --ab-rev BASE -c configs/gate/ci.yaml``: ``measure.rounds`` pairs of ``sdwb bench``
subprocesses, one with BASE's code (copied out of git) and one with the working tree's, order
alternating, decided on the paired ratio of each round. A/A trials use BASE = HEAD with a clean
working tree (same code both sides); slowdown trials add ``--inject-slowdown 0.15`` (the head
side's UNet calls spin 15 % longer). The kinds alternate, so a drift of the machine hits both.

    python reports/gate-cpu/measure_gate_rev.py --trials 20 -o reports/gate-cpu/trials-ab-rev.json

Run it from a clean checkout (the working tree is the head side); every trial's gate.json is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BOOT = "import sys; sys.argv[0] = 'sdwb'; from sdwb.cli import main; main()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--config", default="configs/gate/ci.yaml")
    parser.add_argument("--trials", type=int, default=20, help="trials of each kind")
    parser.add_argument("--slowdown", type=float, default=0.15)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from bench.gate import load_gate_config
    from bench.results import environment
    from sdwb.loading import spec_digest

    model = load_gate_config(Path(ROOT, args.config)).measure.model
    weights = {"model": model, "weights_sha256": spec_digest(model)}  # what every trial measured

    work = args.out.with_suffix("")
    kinds = {"aa": 0.0, "slow": args.slowdown}
    trials: list[dict] = []
    started = time.time()
    for t in range(args.trials):
        for kind, slowdown in kinds.items():
            out = work / f"{t:02d}-{kind}"
            cmd = [sys.executable, "-c", BOOT, "gate", "--ab-rev", args.base, "-c", args.config,
                   "-o", str(out), "--no-progress"]
            if slowdown:
                cmd += ["--inject-slowdown", str(slowdown)]
            t0 = time.time()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            gate = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else {}
            checks = {c["metric"]: c for c in gate.get("checks", [])}
            e2e, unet = checks.get("latency (s/image)", {}), checks.get("UNet call (ms)", {})
            trials.append({"trial": t, "kind": kind, "exit": done.returncode, "outcome": gate.get("outcome"),
                           "e2e_status": e2e.get("status"), "e2e_change": e2e.get("change"),
                           "unet_status": unet.get("status"), "unet_change": unet.get("change"),
                           "seconds": round(time.time() - t0, 1),
                           "error": done.stderr.strip().splitlines()[-1:] if done.returncode == 2 else None})
            print(f"{t:3d} {kind:4s} exit {done.returncode} e2e {e2e.get('change')} "
                  f"unet {unet.get('change')} "
                  f"{time.time() - t0:.0f}s", flush=True)
            summary = {}
            for k in kinds:
                rows = [r for r in trials if r["kind"] == k]
                summary[k] = {"trials": len(rows), "regression (exit 1)": sum(r["exit"] == 1 for r in rows),
                              "passed (exit 0)": sum(r["exit"] == 0 for r in rows),
                              "error (exit 2)": sum(r["exit"] == 2 for r in rows)}
            args.out.write_text(json.dumps({
                "command": "python " + " ".join(sys.argv), "base": args.base, "config": args.config,
                "environment": environment(), "weights": weights, "seconds": round(time.time() - started, 1),
                "mean_seconds_per_trial": round((time.time() - started) / len(trials), 1),
                "summary": summary, "trials": trials}, indent=1) + "\n")


if __name__ == "__main__":
    main()
