"""What the automatic thread choice costs a command's start: ``sdwb config check`` timed with the
choice (a 0.25 s load window that overlaps the CLI's imports) and with it off (``SDWB_THREADS=2``),
interleaved, in fresh processes. Prints JSON (median and every sample)::

    python -m tools.startup_bench > reports/threads-cpu/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMAND = [sys.executable, "-m", "sdwb", "config", "check", "configs/recipes/demo.yaml"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=12)
    args = p.parse_args(argv)
    samples: dict[str, list[float]] = {"auto": [], "SDWB_THREADS=2": []}
    for i in range(args.runs):
        for name in list(samples) if i % 2 == 0 else list(samples)[::-1]:
            env = {k: v for k, v in os.environ.items() if k not in ("SDWB_THREADS", "OMP_NUM_THREADS")}
            if name != "auto":
                env["SDWB_THREADS"] = "2"
            start = time.perf_counter()
            subprocess.run(COMMAND, env=env, capture_output=True, check=True)
            samples[name].append(time.perf_counter() - start)
    print(json.dumps({"command": " ".join(COMMAND[2:]),
                      **{k: {"median_s": round(statistics.median(v), 3), "samples": [round(x, 3) for x in v]}
                         for k, v in samples.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
