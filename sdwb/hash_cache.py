"""sha256 of files, remembered by identity (path, size, mtime, ctime, inode) so re-checks are cheap.

Why: every model the workbench loads is verified against a list of sha256 (a builtin's
``sdwb-files.json``, a variant's ``sdwb.json``, an export's ``manifest.json``). Hashing tens of MB
on every ``sdwb generate`` (and in every fresh memory-probe process of ``sdwb bench``) would cost
more than the check is worth, so a hash is reused while the file's identity is unchanged: same
real path, size, ``st_mtime_ns``, ``st_ctime_ns``, inode and device. Any write to the file changes
its ctime (which, unlike mtime, cannot be set back by ``touch``), so a modified file is always
re-hashed. As git does for its index ("racy git"), a file changed within ``RACY_NS`` of being
hashed is never remembered: a write in the same clock tick as the hash could keep every field.

Where: in memory for the process, and in ``$SDWB_CACHE_DIR/sha256.json`` (default
``$XDG_CACHE_HOME/sdwb`` or ``~/.cache/sdwb``) across processes. The file is a cache only: a
missing, unreadable, corrupt or unwritable one just means hashing again. ``SDWB_HASH_CACHE=0``
turns the on-disk part off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (the workbench's one file hasher; ``sdwb.variants.files`` re-exports it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


CACHE_FILE = "sha256.json"
MAX_ENTRIES = 4096
RACY_NS = 2_000_000_000  # a file changed less than 2 s before it was hashed is hashed again next time

_memory: dict[str, list] = {}
_disk: dict[str, list] | None = None  # loaded on first use
_dirty = False


def cache_dir() -> Path:
    """Where the on-disk cache lives (read from the environment now, not at import)."""
    if os.environ.get("SDWB_CACHE_DIR"):
        return Path(os.environ["SDWB_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sdwb"


def _disk_enabled() -> bool:
    return os.environ.get("SDWB_HASH_CACHE", "1") != "0"


def _identity(path: Path) -> tuple[str, list]:
    st = os.stat(path)
    return os.path.realpath(path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _load_disk() -> dict[str, list]:
    global _disk
    if _disk is None:
        _disk = {}
        if _disk_enabled():
            try:
                data = json.loads((cache_dir() / CACHE_FILE).read_text())
                if isinstance(data, dict):
                    _disk = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 6}
            except (OSError, ValueError):
                pass
    return _disk


def sha256_cached(path: str | Path) -> str:
    """sha256 of ``path``, from the cache while the file's identity is unchanged, else computed."""
    global _dirty
    key, ident = _identity(Path(path))
    for store in (_memory, _load_disk()):
        entry = store.get(key)
        if entry is not None and entry[:5] == ident:
            _memory[key] = entry
            return entry[5]
    started = time.time_ns()
    digest = sha256_file(Path(path))
    if started - max(ident[1], ident[2]) < RACY_NS:
        return digest  # changed just now: its identity may not yet tell the next change apart
    entry = [*ident, digest]
    _memory[key] = entry
    if _disk_enabled():
        _load_disk()[key] = entry
        _dirty = True
    return digest


def flush() -> None:
    """Write the on-disk cache if it gained entries (atomically; failures are ignored)."""
    global _dirty
    if not _dirty or not _disk_enabled():
        return
    _dirty = False
    disk = _load_disk()
    while len(disk) > MAX_ENTRIES:  # oldest first (insertion order)
        disk.pop(next(iter(disk)))
    try:
        from sdwb.runs import atomic_write_text

        atomic_write_text(cache_dir() / CACHE_FILE, json.dumps(disk))
    except OSError:
        pass


def reset() -> None:
    """Forget everything held in memory (tests; a changed ``SDWB_CACHE_DIR``)."""
    global _disk, _dirty
    _memory.clear()
    _disk, _dirty = None, False
