"""How many threads a run uses by default: the CPUs actually free to this process, not the machine's.

Why: torch (OpenMP), ONNX Runtime and OpenVINO all default to one thread per core of the machine,
and OpenMP workers busy-wait between ops. On a 2-core machine with one other busy process, two
spinning torch threads made a tiny-shapes UNet call 2.1x and a training step 3.1x slower than on
a quiet machine, while one thread was not slowed at all (reports/threads-cpu). The passive wait
policy fixes the load case but costs +52 % per quiet UNet call, so the default keeps spinning and
instead takes its thread count from what is free when the command starts:

- the CPUs the process may run on (``sched_getaffinity``: taskset, container cpusets),
- capped by the cgroup CPU quota (``cpu.max`` / ``cpu.cfs_quota_us``: docker ``--cpus``, CI runners),
- less the CPUs other processes kept busy in a short window before the work starts (``/proc/stat``
  minus this process's own CPU time), rounded so that background noise does not cost a thread.

A user's choice always wins: ``--threads N`` on a command, ``SDWB_THREADS=N``, or ``OMP_NUM_THREADS``
set before the run. The choice and its reason go into every results file's environment.

Load that arrives after the start: training loops (recovery, distillation, the builtin models)
call :func:`adapt` between steps, which re-decides from the load of the last ``ADAPT_EVERY_S``
and changes torch's thread count (only for an automatic choice). Inference and benchmarks keep
the count they started with: a benchmark must time every run at the same, recorded, count.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

THREADS_ENV = "SDWB_THREADS"
# A CPU counts as taken when other processes kept it at least this busy in the window; below it,
# background noise (a shell, a file watcher) does not cost a thread.
BUSY_THRESHOLD = 0.5
WINDOW_S = 0.25

ADAPT_EVERY_S = 2.0

_START: tuple[float, int, int] | None = None
_CHOICE: "ThreadChoice | None" = None
_ADAPT_FROM: tuple[float, int, int] | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """The default thread count of this process and why."""

    threads: int
    source: str  # "auto", "SDWB_THREADS", "OMP_NUM_THREADS"
    cpus_usable: int  # affinity, capped by the cgroup quota
    cgroup_quota: float | None
    busy_elsewhere: float | None  # CPUs other processes used in the window (auto only)
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's bandwidth limit (v2 ``cpu.max``, v1 ``cfs_quota_us``), or None."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> tuple[int, float | None]:
    """``(CPUs this process may use, cgroup quota or None)``: affinity capped by the quota."""
    quota = cgroup_quota()
    cpus = _affinity()
    if quota is not None:
        cpus = max(1, min(cpus, math.floor(quota + 1e-9)))
    return cpus, quota


def _snapshot() -> tuple[float, int, int] | None:
    """``(time, busy jiffies of the whole machine, this process's jiffies)`` or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        mine = int(own[11]) + int(own[12])  # utime + stime of every thread of this process
        return time.monotonic(), busy, mine
    except (OSError, ValueError, IndexError):
        return None


def start_window() -> None:
    """Start the load window (the CLI calls this first thing, so the window costs no wall time)."""
    global _START
    if _START is None:
        _START = _snapshot()


def _others(start: tuple[float, int, int], end: tuple[float, int, int]) -> float:
    """CPUs other processes kept busy between two snapshots (this process's own time removed)."""
    seconds = max(end[0] - start[0], 1e-6)
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / os.sysconf("SC_CLK_TCK") / seconds)


def busy_elsewhere(window_s: float = WINDOW_S) -> float | None:
    """CPUs kept busy by other processes since :func:`start_window` (waiting out ``window_s``)."""
    start_window()
    if _START is None:
        return None
    elapsed = time.monotonic() - _START[0]
    if elapsed < window_s:
        time.sleep(window_s - elapsed)
    end = _snapshot()
    return None if end is None else _others(_START, end)


def threads_for(cpus: int, busy: float | None) -> int:
    """Threads for ``cpus`` usable CPUs of which ``busy`` are kept busy by others (None: unknown)."""
    taken = 0 if busy is None else math.floor(busy + (1 - BUSY_THRESHOLD))
    return max(1, cpus - taken)


def _from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def choose() -> ThreadChoice:
    """The default thread count (decided once per process)."""
    global _CHOICE
    if _CHOICE is not None:
        return _CHOICE
    cpus, quota = usable_cpus()
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        n = _from_env(name)
        if n is not None:
            _CHOICE = ThreadChoice(n, name, cpus, quota, None, f"{name}={n}")
            return _CHOICE
    busy = busy_elsewhere()
    threads = threads_for(cpus, busy)
    where = f"{cpus} usable CPU(s)" + (f" (cgroup quota {quota:g})" if quota is not None else "")
    load = "load unknown" if busy is None else f"{busy:.2f} busy elsewhere at start"
    _CHOICE = ThreadChoice(threads, "auto", cpus, quota, None if busy is None else round(busy, 2),
                           f"{where}, {load} -> {threads}")
    return _CHOICE


def apply_default() -> ThreadChoice:
    """Make the chosen count every library's default before it loads: ``OMP_NUM_THREADS`` for
    torch's OpenMP pool (read when torch is imported), and ``torch.set_num_threads`` when torch
    is already loaded. ONNX Runtime and OpenVINO sessions take torch's count (bench.harness)."""
    choice = choose()
    os.environ.setdefault("OMP_NUM_THREADS", str(choice.threads))
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and choice.source == "auto":
        torch.set_num_threads(choice.threads)
    return choice


def adapt(say=None) -> int | None:
    """Between training steps: re-decide an automatic thread count from the load of the last
    ``ADAPT_EVERY_S`` seconds; set torch's count and return it when it changed, else None.

    Cheap: two small /proc reads (~50 us) per call, a decision at most every ``ADAPT_EVERY_S``.
    A user's fixed count is never changed. ``say(text)`` reports a change (default: a line on stderr)."""
    global _ADAPT_FROM
    if _CHOICE is None or _CHOICE.source != "auto":
        return None
    now = _snapshot()
    if now is None or (_ADAPT_FROM is not None and now[0] - _ADAPT_FROM[0] < ADAPT_EVERY_S):
        return None
    before, _ADAPT_FROM = _ADAPT_FROM, now
    if before is None:
        return None
    import torch

    busy = _others(before, now)
    target, current = threads_for(_CHOICE.cpus_usable, busy), torch.get_num_threads()
    if target == current:
        return None
    torch.set_num_threads(target)
    text = f"threads: {current} -> {target} ({busy:.1f} CPUs busy elsewhere)"
    if say is None:
        import sys

        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    else:
        say(text)
    return target


def applied() -> dict | None:
    """The choice this process made, for a results environment (None: none was made here)."""
    return None if _CHOICE is None else _CHOICE.as_dict()


def _reset_for_tests() -> None:
    global _START, _CHOICE, _ADAPT_FROM
    _START, _CHOICE, _ADAPT_FROM = None, None, None
