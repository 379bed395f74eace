"""Progress bars that also work in a log file: rich on a terminal, a plain line every 10 s elsewhere.

Why: rich's bars redraw in place on a terminal, but when output goes to a file or a CI log
(``make demo > demo.log``) rich only prints when the bar is finished, so a 5-minute training
stage showed nothing at all. When the console is not a terminal, :func:`make_progress` returns
:class:`LineProgress` instead: the same calls (``add_task`` / ``update`` / ``advance``), printing
``name 120/300 (40 %) 52 s, ~78 s left  info`` whenever ``every_s`` has passed -- from a heartbeat
thread, so a line reaches the log at least that often even while one step takes longer.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

LOG_EVERY_S = 10.0


def make_progress(*columns, disable: bool = False, transient: bool = False, every_s: float = LOG_EVERY_S,
                  console=None):
    """A rich ``Progress`` on a terminal, else a :class:`LineProgress` (``disable``: silent either way)."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console()
    if disable or console.is_terminal:
        return Progress(*columns, disable=disable, transient=transient, console=console)
    return LineProgress(every_s=every_s, file=sys.stderr)  # stdout stays the command's own output


@contextlib.contextmanager
def status(message: str, console=None) -> Iterator[Callable[[str], None]]:
    """A spinner with a changing message on a terminal; elsewhere one line per message on stderr
    (``[  12 s] message``), so a log shows what a long step is doing. Yields ``update(message)``."""
    from rich.console import Console

    console = console or Console()
    if console.is_terminal:
        with console.status(message, spinner="dots") as spinner:
            yield spinner.update
        return
    start = time.monotonic()

    def line(text: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - start:5.0f} s] {text}\n")
        sys.stderr.flush()

    line(message)
    yield line


class _Task:
    def __init__(self, description: str, total: float | None, completed: float, fields: dict[str, Any]):
        self.description, self.total, self.completed, self.fields = description, total, completed, fields
        self.start = time.monotonic()
        self.start_completed = completed
        self.finished_line = False


class LineProgress:
    """Plain progress lines for logs: the subset of ``rich.progress.Progress`` sdwb uses."""

    def __init__(self, every_s: float = LOG_EVERY_S, file=None):
        self.every_s = every_s
        self.file = file or sys.stdout
        self.tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = 0.0

    # ------------------------------------------------------------------ rich's API
    def __enter__(self) -> "LineProgress":
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="sdwb-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if exc[0] is None:  # the last state of every unfinished line, once
            with self._lock:
                for task in self.tasks.values():
                    if not task.finished_line:
                        self._print(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        with self._lock:
            task_id = len(self.tasks)
            self.tasks[task_id] = _Task(description, total, completed, fields)
            return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        with self._lock:
            task = self.tasks[task_id]
            if total is not None:
                task.total = total
            if completed is not None:
                task.completed = completed
            if advance is not None:
                task.completed += advance
            if description is not None:
                task.description = description
            task.fields.update({k: v for k, v in fields.items() if k not in ("visible", "refresh")})
            self._maybe_finish(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        with self._lock:
            task = self.tasks.pop(task_id, None)
            if task is not None:
                self._maybe_finish(task)

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ lines
    def _maybe_finish(self, task: _Task) -> None:
        if task.total is not None and task.completed >= task.total and not task.finished_line:
            self._print(task)
            task.finished_line = True

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(0.5, self.every_s / 4)):
            if time.monotonic() - self._last < self.every_s:
                continue
            with self._lock:
                for task in self.tasks.values():
                    if not task.finished_line:
                        self._print(task)

    def _print(self, task: _Task) -> None:
        self._last = time.monotonic()
        self.file.write(self.line(task) + "\n")
        self.file.flush()

    @staticmethod
    def line(task: _Task) -> str:
        """``name 120/300 (40 %) 52 s, ~78 s left  info``."""
        elapsed = time.monotonic() - task.start
        done = f"{task.completed:g}"
        parts = [task.description.strip()]
        if task.total:
            parts.append(f"{done}/{task.total:g} ({100 * task.completed / task.total:.0f} %)")
        else:
            parts.append(done)
        timing = f"{elapsed:.0f} s"
        rate_done = task.completed - task.start_completed
        if task.total and rate_done > 0 and task.completed < task.total:
            left = elapsed / rate_done * (task.total - task.completed)
            timing += f", ~{left:.0f} s left"
        parts.append(timing)
        info = " ".join(str(v) for v in task.fields.values() if v not in (None, ""))
        return "  ".join([" ".join(parts[:2]), parts[2]] + ([info] if info else []))
