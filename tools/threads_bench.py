"""How torch's CPU threads behave beside another busy process: the measurement behind #24's default.

Why: on a 2-core machine with one other busy process, the default 2 torch threads collapsed (a
tiny-shapes UNet call 14x slower than at 1 thread): OpenMP worker threads busy-wait ("spin") for
work, and a spinning thread that shares a core with another process steals the time the other
thread's work needs. OpenMP's own switch is the wait policy (``OMP_WAIT_POLICY=PASSIVE``: idle
workers sleep instead of spinning), read once when libgomp loads -- so every configuration runs in
a fresh process with its environment set before torch is imported.

Grid: wait policy (the library default, ``PASSIVE``) x torch threads (1, 2) x machine (quiet; one
busy process spinning on one core, started before and stopped after the measurement), in
``--rounds`` rounds with the order rotated, so drift spreads over every cell. Per cell and round:
the median of ``--calls`` tiny-shapes UNet calls (batch 2 = one image under guidance, torch fp32,
after 3 warm-up calls) and of ``--steps`` training steps (UNet forward + MSE + backward + AdamW at
batch 16 on random latents: the shape of prune recovery / distillation steps). Writes
``OUT/results.json`` with every sample and the environment (CPU flags)::

    python -m tools.threads_bench -o reports/threads-cpu        # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("default", "passive")
THREADS = (1, 2)
LOADS = ("quiet", "busy")


def measure(threads: int, calls: int, steps: int) -> dict:
    """In this process: median UNet call and training step of tiny-shapes at ``threads``."""
    import torch

    from sdwb.loading import load_pipeline

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = load_pipeline("builtin:tiny-shapes").unet
    side = unet.config.sample_size
    hidden = unet.config.cross_attention_dim
    x = torch.randn(2, 4, side, side)
    h = torch.randn(2, 77, hidden)
    t = torch.tensor(500.0)
    call_s = []
    with torch.inference_mode():
        for i in range(calls + 3):
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=h)
            if i >= 3:
                call_s.append(time.perf_counter() - start)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    xb, hb = torch.randn(16, 4, side, side), torch.randn(16, 77, hidden)
    tb, target = torch.randint(0, 1000, (16,)), torch.randn(16, 4, side, side)
    step_s = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(xb, tb, encoder_hidden_states=hb).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            step_s.append(time.perf_counter() - start)
    return {"unet_call_ms": 1000 * statistics.median(call_s),
            "train_step_ms": 1000 * statistics.median(step_s), "torch_threads": torch.get_num_threads()}


def _cell(policy: str, threads: int, load: str, calls: int, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    busy = None
    if load == "busy":  # one process spinning on one core, as a neighbouring job would
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    try:
        proc = subprocess.run([sys.executable, "-m", "tools.threads_bench", "--one", str(threads),
                               "--calls", str(calls), "--steps", str(steps)],
                              capture_output=True, text=True, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"error: cell {policy}/{threads}/{load} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, help="output folder (results.json)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=30, help="timed UNet calls per cell and round")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per cell and round")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.calls, args.steps)))
        return 0
    if args.out is None:
        p.error("-o/--out is required")
    from bench.results import environment

    env = environment()
    cells = list(itertools.product(POLICIES, THREADS, LOADS))
    samples: dict[str, list[dict]] = {"/".join(map(str, c)): [] for c in cells}
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for cell in order:
            key = "/".join(map(str, cell))
            samples[key].append(_cell(*cell, args.calls, args.steps))
            last = samples[key][-1]
            print(f"round {r + 1} {key}: UNet {last['unet_call_ms']:.1f} ms, "
                  f"step {last['train_step_ms']:.0f} ms", file=sys.stderr, flush=True)
    metrics = ("unet_call_ms", "train_step_ms")
    summary = {key: {m: round(statistics.median(s[m] for s in runs), 2) for m in metrics}
               for key, runs in samples.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"what": "tiny-shapes UNet call (batch 2) and training step (batch 16), torch fp32, per OpenMP "
                      "wait policy x torch threads x quiet / one busy process",
              "command": "python -m tools.threads_bench " + " ".join(argv or sys.argv[1:]),
              "environment": env, "summary_median_ms": summary, "samples": samples}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
