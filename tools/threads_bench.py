"""How torch's CPU threads behave beside another busy process: the measurement behind #24's default.

Why: on a 2-core machine with one other busy process, the default 2 torch threads collapsed (a
tiny-shapes UNet call 14x slower than at 1 thread): OpenMP worker threads busy-wait ("spin") for
work, and a spinning thread that shares a core with another process steals the time the other
thread's work needs. OpenMP's own switch is the wait policy (``OMP_WAIT_POLICY=PASSIVE``: idle
workers sleep instead of spinning), read once when libgomp loads -- so every configuration runs in
a fresh process with its environment set before torch is imported.

Grid: configurations (torch threads 1 / 2 / ``auto`` = sdwb's default from :mod:`sdwb.threads`,
x the OpenMP wait: the library default, ``PASSIVE``, or a short ``GOMP_SPINCOUNT``) x machine load
(``quiet``; ``busy``: one process spinning on one core, started before the measured process;
``later``: the same process started by the measured process after it chose its threads, i.e. load
that arrives mid-run), in ``--rounds`` rounds with the order rotated, so drift spreads over every
cell. Per cell and round: the median of ``--calls`` tiny-shapes UNet calls (batch 2 = one image
under guidance, torch fp32, after 3 warm-up calls) and of ``--steps`` training steps (UNet forward +
MSE + backward + AdamW at batch 16 on random latents: the shape of prune recovery / distillation
steps; between steps :func:`sdwb.threads.adapt` runs as in sdwb's training loops, which changes
only the ``auto`` configuration's threads). Writes ``OUT/results.json`` with every sample and the
environment (CPU flags)::

    python -m tools.threads_bench -o reports/threads-cpu        # ~15 min on 2 cores
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

# configuration name -> (torch threads or "auto", extra environment)
CONFIGS = {
    "1 thread": ("1", {}),
    "2 threads": ("2", {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=10000": ("2", {"GOMP_SPINCOUNT": "10000"}),
    "2 threads, GOMP_SPINCOUNT=1000": ("2", {"GOMP_SPINCOUNT": "1000"}),
    "auto (sdwb default)": ("auto", {}),
}
LOADS = ("quiet", "busy", "later")
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "SDWB_THREADS")


def _busy() -> subprocess.Popen:
    """One process spinning on one core, as a neighbouring job would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(threads: str, calls: int, steps: int, load_later: bool = False) -> dict:
    """In this process: median UNet call and training step of tiny-shapes at ``threads``
    (a number, or ``auto``: chosen as the ``sdwb`` command does, before torch loads)."""
    choice = None
    if threads == "auto":
        from sdwb import threads as sdwb_threads

        sdwb_threads.start_window()
        choice = sdwb_threads.apply_default().as_dict()
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))
    busy = _busy() if load_later else None
    try:
        result = _timings(calls, steps)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {**result, "torch_threads": torch.get_num_threads(), "choice": choice}


def _timings(calls: int, steps: int) -> dict:
    import torch

    from sdwb.loading import load_pipeline
    from sdwb.threads import adapt as adapt_threads

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
    threads_used = []
    for i in range(steps + 1):
        adapt_threads(say=lambda _text: None)  # as sdwb's training loops do (auto choice only)
        threads_used.append(torch.get_num_threads())
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(xb, tb, encoder_hidden_states=hb).sample, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            step_s.append(time.perf_counter() - start)
    return {"unet_call_ms": 1000 * statistics.median(call_s),
            "train_step_ms": 1000 * statistics.median(step_s), "train_step_threads": threads_used[1:]}


def _cell(config: str, load: str, calls: int, steps: int) -> dict:
    threads, extra = CONFIGS[config]
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(extra)
    busy = None
    if load == "busy":
        busy = _busy()
        time.sleep(0.5)
    try:
        proc = subprocess.run([sys.executable, "-m", "tools.threads_bench", "--one", threads,
                               "--calls", str(calls), "--steps", str(steps)]
                              + (["--load-later"] if load == "later" else []),
                              capture_output=True, text=True, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"error: cell {config}/{load} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, help="output folder (results.json)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=30, help="timed UNet calls per cell and round")
    p.add_argument("--steps", type=int, default=12, help="timed training steps per cell and round")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                   help="configurations to measure (default: all): " + "; ".join(CONFIGS))
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--load-later", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.calls, args.steps, args.load_later)))
        return 0
    if args.out is None:
        p.error("-o/--out is required")
    from bench.results import environment

    env = environment()
    cells = list(itertools.product(args.configs, args.loads))
    samples: dict[str, list[dict]] = {"/".join(map(str, c)): [] for c in cells}
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for cell in order:
            key = "/".join(map(str, cell))
            samples[key].append(_cell(*cell, args.calls, args.steps))
            last = samples[key][-1]
            print(f"round {r + 1} {key}: UNet {last['unet_call_ms']:.1f} ms, "
                  f"step {last['train_step_ms']:.0f} ms, {last['torch_threads']} thread(s)",
                  file=sys.stderr, flush=True)
    metrics = ("unet_call_ms", "train_step_ms")
    summary = {key: {m: round(statistics.median(s[m] for s in runs), 2) for m in metrics}
               for key, runs in samples.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"what": "tiny-shapes UNet call (batch 2) and training step (batch 16), torch fp32, per "
                      "configuration (threads x OpenMP wait) x load (quiet / one busy process before the "
                      "start / one busy process arriving after the thread choice)",
              "configs": {name: {"threads": t, "environment": e} for name, (t, e) in CONFIGS.items()
                          if name in args.configs},
              "command": "python -m tools.threads_bench " + " ".join(argv or sys.argv[1:]),
              "environment": env, "summary_median_ms": summary, "samples": samples}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
