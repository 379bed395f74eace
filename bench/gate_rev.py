"""``sdwb gate --ab-rev BASE``: time the code of git revision BASE and the working tree now, side by side.

What: BASE's tracked files are copied out of git (``git archive``) into a scratch directory. Then
one worker process per side is started: this environment's Python with that side's tree first on
``sys.path``, so it imports that side's packages and loads that side's builtin weights. The
driver sends the workers the same ``sdwb bench`` command line (latency only, a few timed runs)
in turn, B H, H B, B H, ...: each such pair is a *round*. Every ``sdwb bench`` run loads its
model, warms up and writes a ``results.json`` with per-run samples and the environment it ran
in. Each fresh pair of workers first runs one unrecorded round (a process's first ``sdwb bench``
pays for lazy imports and first allocations: 1.5-5x slower here). After ``rounds / processes``
rounds both workers are replaced by fresh processes, so per-process effects (memory layout,
thread placement) are sampled too.

Why: the two sides are different code, so they cannot share a process; and a latency comparison
means something only between measurements of one machine in one span of time (a committed file
timed on another CPU generation, or on the same machine an hour earlier, differs by 40-115 % on
unchanged code). On this machine kind a neighbour's burst lasts seconds and a whole fresh
process can run 30-50 % slower than the next, so the units are short (about a second and a half
of work each), adjacent, and paired: the decision (:func:`bench.gate.paired_rounds_ratio`) takes
each round's ratio, so a slow second slows both halves of its round or spoils one round, not the
verdict. The interface between revisions is the ``sdwb`` entry point (``sdwb.app.cli.main(argv)``,
``sdwb.cli.main`` before the application layer had its package) with ``sdwb bench``'s flags
and its ``results.json``, which both sides have had since the gate existed: an older BASE needs
no code of this module.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdwb.errors import SdwbError

# A side's worker: reads one JSON argv per line, runs that side's ``sdwb`` entry point on it in this
# process (its output sent to stderr), answers ``{"exit": code}`` on stdout. The editable install's
# import hook (which maps every sdwb module to the working tree) is removed first, and after every
# run each loaded module of the project must come from this side's tree: a side that ran the other
# side's code would be a comparison of nothing, so it is refused (exit 3), not measured.
_WORKER = """
import contextlib, json, os, sys
answer = sys.stdout
sys.argv[0] = "sdwb"
root = os.path.realpath(os.environ["SDWB_GATE_ROOT"]) + os.sep
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
try:
    from sdwb.app.cli import main
except ModuleNotFoundError:  # a revision from before sdwb/app/
    from sdwb.cli import main

def foreign():
    return sorted(name for name, mod in list(sys.modules.items())
                  if name.split(".")[0] in ("sdwb", "compress", "export", "bench")
                  and getattr(mod, "__file__", None) and not os.path.realpath(mod.__file__).startswith(root))

for line in sys.stdin:
    code = 0
    with contextlib.redirect_stdout(sys.stderr):
        try:
            main(json.loads(line))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    outside = foreign()
    if outside:
        sys.stderr.write(f"error: imported {', '.join(outside[:3])} from outside {root}\\n")
        code = 3
    answer.write(json.dumps({"exit": code}) + "\\n")
    answer.flush()
"""
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Side:
    """One revision's timings: per round, the per-run samples of ``sdwb bench`` (``e2e_s``,
    ``unet_ms``), and the environment its first subprocess recorded."""

    label: str
    revision: str
    root: Path
    rounds: list[dict[str, list[float]]] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # peak_rss_mb (cuda_peak_mb): one fresh-process probe

    def per_round(self, key: str) -> list[list[float]]:
        return [r.get(key, []) for r in self.rounds]


def resolve_revision(rev: str, repo: Path = REPO_ROOT) -> str:
    """The full commit hash of ``rev`` (a hash, ``HEAD~1``, a tag), or a one-line error."""
    if not rev or rev.startswith("-"):
        raise SdwbError(f"--ab-rev {rev!r}: expected a git revision such as HEAD~1 or a commit hash")
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise SdwbError(f"--ab-rev: git is not usable here ({e})") from None
    if done.returncode != 0:
        raise SdwbError(f"--ab-rev {rev}: not a commit of the repository at {repo}")
    return done.stdout.strip()


def checkout_revision(commit: str, dest: Path, repo: Path = REPO_ROOT) -> Path:
    """Copy the tracked files of ``commit`` into the empty directory ``dest`` (no git metadata:
    the worktree list and the index of ``repo`` are not touched)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=repo,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True)
        archive.stdout.close()
        err = archive.stderr.read().decode(errors="replace")
        archive.wait(timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        raise SdwbError(f"--ab-rev: could not copy out {commit[:12]}: {e}") from None
    if archive.returncode != 0 or untar.returncode != 0:
        why = (err or untar.stderr.decode(errors="replace")).strip().splitlines()[-1:] or ["?"]
        raise SdwbError(f"--ab-rev: could not copy out {commit[:12]}: {why[0]}")
    if not any((dest / "sdwb" / rel).is_file() for rel in ("app/cli.py", "cli.py")):
        raise SdwbError(f"--ab-rev {commit[:12]}: that revision has no sdwb command line (not an sdwb "
                        "revision)")
    return dest


def bench_argv(measure, model: str, out: Path, slowdown: float = 0.0, metrics: str = "latency") -> list[str]:
    """The ``sdwb bench`` quick-form arguments of one latency (or memory) subprocess (flags every
    revision since the gate existed understands)."""
    argv = ["bench", "--model", model, "--backend", measure.backend, "--batch", str(measure.batch),
            "--prompts", str(measure.n_prompts), "--repeats", str(measure.repeats),
            "--warmup", str(measure.warmup), "--metrics", metrics, "--no-progress", "-o", str(out)]
    for flag, value in (("--steps", measure.steps), ("--guidance", measure.guidance),
                        ("--scheduler", measure.scheduler), ("--threads", measure.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if slowdown:
        argv += ["--set", f"variants.0.unet_slowdown={slowdown}"]
    return argv


class _Worker:
    """One side's long-lived process (see the module docstring)."""

    def __init__(self, side: Side, log_path: Path):
        self.side, self.log_path = side, log_path
        self.log = open(log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(side.root), "SDWB_GATE_ROOT": str(side.root)}
        env.pop("SDWB_DEBUG", None)  # errors as one line, which is what the driver reports
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], cwd=side.root, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, argv: list[str], timeout: float) -> int:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not ready:
            raise self._failure(f"ran past {timeout:.0f} s")
        if not line:
            raise self._failure("its process ended")
        return int(json.loads(line)["exit"])

    def _failure(self, why: str) -> SdwbError:
        self.close()
        return SdwbError(f"--ab-rev: the {self.side.label} side ({self.side.revision}) failed to benchmark: "
                         f"{why}; {_last_error(self.log_path)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.SubprocessError):
                self.proc.kill()
        self.log.close()


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("error:")]
    except OSError:
        lines = []
    return lines[-1] if lines else f"see {log_path}"


def _record(side: Side, out: Path) -> None:
    try:
        data = json.loads((out / "results.json").read_text())
        samples = next(iter(data["samples"].values()))
    except (OSError, ValueError, KeyError, StopIteration, AttributeError):
        raise SdwbError(f"--ab-rev: the {side.label} side ({side.revision}) wrote no per-run samples "
                        f"in {out / 'results.json'}") from None
    side.rounds.append({k: [float(x) for x in v] for k, v in samples.items()})
    if not side.environment:
        side.environment = dict(data.get("environment") or {})
        side.environment["git_revision"] = side.revision
        threads = (data.get("rows") or [{}])[0].get("threads")
        if threads:  # the threads the timed runs used (the process default is recorded otherwise)
            side.environment["torch_threads"] = threads


def measure_revisions(base_rev: str, measure, model: str, out: Path, *, inject_slowdown: float = 0.0,
                      log: Callable[[str], None] | None = None, timeout: float = 900.0,
                      repo: Path = REPO_ROOT) -> tuple[Side, Side]:
    """``(base, head)``: ``measure.rounds`` rounds of one ``sdwb bench`` run per side, BASE's code
    and the working tree's, over ``measure.processes`` pairs of worker processes.
    ``inject_slowdown`` slows the head side's UNet calls (the gate's self-test)."""
    commit = resolve_revision(base_rev, repo)
    from bench.results import git_revision

    head_rev = git_revision(repo) or "unknown"
    scratch = Path(tempfile.mkdtemp(prefix="sdwb-gate-rev-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        base = Side("base", f"{base_rev} = {commit[:12]}", checkout_revision(commit, scratch / "tree", repo))
        head = Side("head", head_rev, repo)
        per_process = -(-measure.rounds // measure.processes)

        def bench(worker: _Worker, name: str) -> Path:
            dest = (out / name).resolve()
            shutil.rmtree(dest, ignore_errors=True)
            slow = inject_slowdown if worker.side is head else 0.0
            code = worker.run(bench_argv(measure, model, dest, slow), timeout)
            if code != 0:
                raise worker._failure(f"exit {code}")
            return dest

        r = 0
        while r < measure.rounds:
            workers = {s.label: _Worker(s, out / f"{s.label}.log") for s in (base, head)}
            try:
                for side in (base, head):  # the unrecorded first round of fresh processes
                    bench(workers[side.label], f"warmup-{side.label}")
                for _ in range(min(per_process, measure.rounds - r)):
                    for side in ((base, head) if r % 2 == 0 else (head, base)):
                        _record(side, bench(workers[side.label], f"round{r:02d}-{side.label}"))
                    if log:
                        b, h = (_median(s.rounds[-1].get("e2e_s")) for s in (base, head))
                        log(f"round {r + 1}/{measure.rounds}: median s/image base {b:.4g}, head {h:.4g}")
                    r += 1
            finally:
                for w in workers.values():
                    w.close()
        for side in (base, head):  # memory: one fresh-process probe per side, in this same run
            worker = _Worker(side, out / f"{side.label}.log")
            try:
                dest = (out / f"memory-{side.label}").resolve()
                shutil.rmtree(dest, ignore_errors=True)
                code = worker.run(bench_argv(measure, model, dest, metrics="memory"), timeout)
                if code != 0:
                    raise worker._failure(f"memory probe exit {code}")
                side.memory = _memory(side, dest)
            finally:
                worker.close()
        return base, head
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _memory(side: Side, out: Path) -> dict:
    """``{"peak_rss_mb": ..., ("cuda_peak_mb": ...)}`` of a side's memory-only bench run."""
    try:
        row = json.loads((out / "results.json").read_text())["rows"][0]
        memory = {k: float(row[k]) for k in ("peak_rss_mb", "cuda_peak_mb") if row.get(k) is not None}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        memory = {}
    if "peak_rss_mb" not in memory:
        raise SdwbError(f"--ab-rev: the {side.label} side ({side.revision}) measured no peak RSS in "
                        f"{out / 'results.json'}")
    return memory


def _median(values) -> float:
    import numpy as np

    return float(np.median(values)) if values else float("nan")


def write_sides(path: Path, base: Side, head: Side, extra: dict) -> Path:
    """Both sides' per-round samples and environments as JSON (what the decision was made on)."""
    from sdwb.runs import atomic_write_text

    def side(s: Side) -> dict:
        return {"revision": s.revision, "environment": s.environment, "rounds": s.rounds, "memory": s.memory}

    return atomic_write_text(path, json.dumps({**extra, "base": side(base), "head": side(head)}, indent=1))
