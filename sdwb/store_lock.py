"""Locks for the stage store and for directories under construction, and their stale leftovers.

Why: two ``sdwb run`` on one store used to train the same stage in one ``work/`` directory, the
loser failing with "already exists" after all the work, and a killed command left its
``<final>.tmp-XXXX`` directory behind forever. Two kinds of lock fix both (``filelock``: an OS
file lock, released by the kernel when its process dies, so a ``kill -9`` never leaves a lock
held):

- :func:`stage_lock`: one lock per stage key (``<store>/<kind>-<key>/.lock``). The runner takes it
  before running a stage and re-checks, under it, whether another run finished the stage
  meanwhile: a second runner waits, then reuses the first's artifact.
- :func:`claim_tmp_dir`: ``sdwb.runs.atomic_dir`` builds ``<final>.tmp-XXXX`` while holding
  ``<final>.tmp-XXXX.lock``; :func:`remove_stale_tmp` (called by the next ``atomic_dir`` of the
  same final path, and by the runner under a stage lock) removes every such directory whose lock
  no live process holds. A directory without a lock file (made before these locks) is removed
  only when older than ``unlocked_age`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

STAGE_LOCK = ".lock"
TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"
ORPHAN_LOCK_AGE = 60.0  # s: a lock file with no directory, unlocked, older than this is removed
UNLOCKED_TMP_AGE = 3600.0  # s: a tmp directory with no lock file (older code) is stale after this


@contextlib.contextmanager
def stage_lock(stage_dir: Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of one stage of the store; wait (saying so) while another run holds it."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(stage_dir / STAGE_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if say is not None:
            say(f"waiting: another run is working on {stage_dir} (its lock: {stage_dir / STAGE_LOCK})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def claim_tmp_dir(final: Path) -> tuple[Path, FileLock]:
    """A new ``<final>.tmp-XXXX`` directory (beside ``final``) and the held lock that marks it as
    being built by this process. The lock file is made first, so there is never a moment when the
    directory exists without its lock."""
    fd, lock_path = tempfile.mkstemp(prefix=f"{final.name}{TMP_MARK}", suffix=LOCK_SUFFIX, dir=final.parent)
    os.close(fd)
    lock = FileLock(lock_path)
    lock.acquire(timeout=30)
    tmp = Path(lock_path[: -len(LOCK_SUFFIX)])
    try:
        tmp.mkdir()
    except BaseException:
        release_tmp_lock(lock)
        raise
    return tmp, lock


def release_tmp_lock(lock: FileLock) -> None:
    """Release a :func:`claim_tmp_dir` lock and remove its file."""
    lock.release()
    with contextlib.suppress(OSError):
        os.unlink(lock.lock_file)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def remove_stale_tmp(final: Path, unlocked_age: float = UNLOCKED_TMP_AGE) -> list[Path]:
    """Remove ``<final>.tmp-*`` directories left by dead processes (and orphaned lock files);
    returns what was removed. A directory whose lock a live process holds is left alone."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed: list[Path] = []
    prefix = f"{final.name}{TMP_MARK}"
    for entry in sorted(final.parent.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        if entry.name.endswith(LOCK_SUFFIX) and not entry.is_dir():
            tmp = entry.with_name(entry.name[: -len(LOCK_SUFFIX)])
            if tmp.exists() or _age(entry) < ORPHAN_LOCK_AGE:
                continue  # handled with its directory, or just being created
            lock = FileLock(str(entry))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry)
            lock.release()
            continue
        if not entry.is_dir() or entry.is_symlink():
            continue
        lock_file = entry.with_name(entry.name + LOCK_SUFFIX)
        if not lock_file.exists():
            if _age(entry) >= unlocked_age:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        lock = FileLock(str(lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a live process is building it
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            release_tmp_lock(lock)
    return removed
