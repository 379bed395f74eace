"""How often does ``sdwb gate --ab`` pass an A/A comparison, and catch a 15 % slower UNet?

Each trial is one ``--ab`` measurement exactly as the command makes it (the two-variant bench
config of ``bench.gate.ab_bench_config`` from ``configs/gate/default.yaml``'s ``measure:``,
warm-up and timed runs interleaved A B A B by ``bench.latency.measure``) and one decision by
``bench.gate.compare``. A/A trials and injected-slowdown trials (the candidate's UNet calls spun
15 % longer, ``--inject-slowdown 0.15``) alternate, so a drift of the machine hits both kinds.
The pipeline is loaded once (the command loads a spec once too), so a trial is its timed runs only.

    python reports/gate-cpu/measure_gate.py --trials 40 -o reports/gate-cpu/trials.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-shapes")
    parser.add_argument("--config", default="configs/gate/default.yaml")
    parser.add_argument("--trials", type=int, default=40, help="trials of each kind")
    parser.add_argument("--slowdown", type=float, default=0.15)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()

    from bench.gate import ab_bench_config, compare, load_gate_config
    from bench.harness import preflight
    from bench.latency import measure, run_samples
    from bench.results import environment
    from bench.scenario import load_prompts
    from sdwb.loading import load_pipeline

    cfg = load_gate_config(args.config)
    pipe = load_pipeline(args.model)
    kinds = {"aa": 0.0, "slow": args.slowdown}
    scenarios = {k: preflight(ab_bench_config(args.model, args.model, cfg.measure,
                                              inject_slowdown=s).scenarios()) for k, s in kinds.items()}
    prompts = {v.variant: load_prompts(v)[0] for v in scenarios["aa"]}
    trials: list[dict] = []
    started = time.time()
    for t in range(args.trials):
        for kind in kinds:
            timings = measure({"baseline": pipe, "candidate": pipe}, scenarios[kind], prompts)
            samples = {v: run_samples(runs) for v, runs in timings.items()}
            checks = compare({}, samples["baseline"], {}, samples["candidate"], cfg)
            latency = next(c for c in checks if c.metric.startswith("latency"))
            ratio = np.median(samples["candidate"]["e2e_s"]) / np.median(samples["baseline"]["e2e_s"])
            unet = np.median(samples["candidate"]["unet_ms"]) / np.median(samples["baseline"]["unet_ms"])
            trials.append({"trial": t, "kind": kind, "status": latency.status, "change": latency.change,
                           "e2e_ratio": float(ratio), "unet_ratio": float(unet)})
            print(f"{t:3d} {kind:4s} {latency.status:12s} {latency.change}  unet x{unet:.3f}", flush=True)
    summary = {}
    for kind in kinds:
        rows = [r for r in trials if r["kind"] == kind]
        caught = sum(r["status"] == "regression" for r in rows)
        summary[kind] = {"trials": len(rows), "regression": caught, "passed": len(rows) - caught,
                         "median_e2e_ratio": float(np.median([r["e2e_ratio"] for r in rows])),
                         "median_unet_ratio": float(np.median([r["unet_ratio"] for r in rows]))}
    payload = {"command": "python reports/gate-cpu/measure_gate.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
               "config": cfg.model_dump(mode="json"), "threads": torch.get_num_threads(),
               "seconds": round(time.time() - started, 1), "summary": summary, "trials": trials,
               "environment": environment()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
