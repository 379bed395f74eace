"""The default thread count: CPUs usable by the process (affinity, cgroup quota) less the CPUs other
processes keep busy at the start (sdwb.threads), and progress lines that reach a log (sdwb.progress)."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from sdwb import threads
from sdwb.progress import LineProgress, make_progress


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    for key in (threads.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    threads._reset_for_tests()
    yield
    threads._reset_for_tests()


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(v1) == pytest.approx(3.0)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(v1) is None


def test_usable_cpus_capped_by_quota(monkeypatch):
    monkeypatch.setattr(threads, "_affinity", lambda: 8)
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 2.5)
    assert threads.usable_cpus() == (2, 2.5)
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.5)
    assert threads.usable_cpus()[0] == 1


@pytest.mark.parametrize("busy, expected",
                         [(0.0, 4), (0.3, 4), (0.6, 3), (1.0, 3), (1.7, 2), (3.9, 1), (9.0, 1)])
def test_auto_takes_away_the_cpus_busy_elsewhere(monkeypatch, busy, expected):
    monkeypatch.setattr(threads, "usable_cpus", lambda: (4, None))
    monkeypatch.setattr(threads, "busy_elsewhere", lambda window_s=threads.WINDOW_S: busy)
    choice = threads.choose()
    assert (choice.threads, choice.source) == (expected, "auto")
    assert f"-> {expected}" in choice.reason


def test_user_choice_wins(monkeypatch):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda window_s=threads.WINDOW_S: 99.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (threads.choose().threads, threads.choose().source) == (3, "OMP_NUM_THREADS")
    threads._reset_for_tests()
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert (threads.choose().threads, threads.choose().source) == (2, "SDWB_THREADS")


def test_busy_elsewhere_sees_a_spinning_process():
    """The real measurement: one other process spinning shows up as about one busy CPU."""
    if threads._snapshot() is None:
        pytest.skip("no /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        threads._reset_for_tests()
        threads.start_window()
        busy = threads.busy_elsewhere(window_s=0.6)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6


def test_own_work_is_not_counted_as_busy_elsewhere():
    """This process spins for the whole window: the machine's busy time includes it, the answer not."""
    import os

    first = threads._snapshot()
    if first is None:
        pytest.skip("no /proc/stat")
    threads.start_window()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    elsewhere = threads.busy_elsewhere(window_s=0.5)
    last = threads._snapshot()
    seconds, ticks = last[0] - first[0], os.sysconf("SC_CLK_TCK")
    machine = (last[1] - first[1]) / ticks / seconds
    own = (last[2] - first[2]) / ticks / seconds
    assert own >= 0.2  # we did spin (how much CPU we got depends on the machine's other load)
    assert elsewhere == pytest.approx(machine - own, abs=0.3)  # the answer excludes exactly our share


def test_line_progress_prints_at_least_every_interval():
    out = io.StringIO()
    with LineProgress(every_s=0.2, file=out) as bar:
        task = bar.add_task("recover", total=10, info="")
        bar.advance(task)
        time.sleep(1.0)  # one slow step: the heartbeat still prints
        bar.update(task, info="loss=0.1")
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert lines[0].startswith("recover 1/10 (10 %)")
    assert "left" in lines[0] and "loss=0.1" in lines[-1]


def test_line_progress_prints_a_finished_task_once():
    out = io.StringIO()
    with LineProgress(every_s=60, file=out) as bar:
        task = bar.add_task("images", total=3)
        for _ in range(3):
            bar.advance(task)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("images 3/3 (100 %)")


def test_make_progress_is_plain_lines_off_a_terminal():
    from rich.console import Console

    assert isinstance(make_progress(console=Console(file=io.StringIO())), LineProgress)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(make_progress(console=terminal), LineProgress)


def test_adapt_follows_load_that_arrives_after_the_start(monkeypatch):
    """Training loops call adapt(): a neighbour arriving mid-run takes a thread away, leaving gives it
    back; a user's fixed count is never touched."""
    import torch

    before = torch.get_num_threads()
    ticks = threads.os.sysconf("SC_CLK_TCK")
    clock = {"t": 100.0, "busy": 0, "mine": 0}
    monkeypatch.setattr(threads, "_snapshot", lambda: (clock["t"], clock["busy"], clock["mine"]))
    monkeypatch.setattr(threads, "usable_cpus", lambda: (2, None))
    monkeypatch.setattr(threads, "busy_elsewhere", lambda window_s=threads.WINDOW_S: 0.0)
    said = []
    try:
        assert threads.choose().threads == 2
        torch.set_num_threads(2)
        assert threads.adapt(say=said.append) is None  # first call: starts the interval

        def run(seconds: float, others: float, mine: float = 1.5):
            clock["t"] += seconds
            clock["busy"] += int((others + mine) * seconds * ticks)
            clock["mine"] += int(mine * seconds * ticks)
            return threads.adapt(say=said.append)

        assert run(0.5, others=1.0) is None  # within ADAPT_EVERY_S: not looked at yet
        assert run(threads.ADAPT_EVERY_S, others=0.8) == 1 and torch.get_num_threads() == 1
        assert run(threads.ADAPT_EVERY_S, others=1.0, mine=1.0) is None  # still busy: stays at 1
        assert run(threads.ADAPT_EVERY_S, others=0.05, mine=1.0) == 2 and torch.get_num_threads() == 2
        assert said[0].startswith("threads: 2 -> 1") and said[1].startswith("threads: 1 -> 2")
        threads._reset_for_tests()
        monkeypatch.setenv(threads.THREADS_ENV, "2")
        threads.choose()
        threads.adapt()
        assert run(threads.ADAPT_EVERY_S, others=1.9) is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
