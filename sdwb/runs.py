"""Run directories and atomic writes.

Why: a crash, a full disk or Ctrl-C must never leave a half-written artifact that looks complete,
nor damage one written before. Files are written to a temporary name in the same directory and
moved into place with ``os.replace`` (atomic on POSIX); whole directories are built under
``<final>.tmp-XXXX`` and renamed into place only when everything in them succeeded.

Runs live under ``runs/<name>-<hash8>/`` where the hash is the short hash of the resolved recipe
(``sdwb.app.recipe_schema.config_hash``), so the same recipe always maps to the same directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sdwb.errors import SdwbError

RESOLVED_CONFIG = "config.resolved.yaml"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_dir(name: str, recipe_hash: str, root: str | Path = "runs") -> Path:
    """``<root>/<name>-<first 8 characters of recipe_hash>`` (not created)."""
    if not _SAFE_NAME.match(name):
        raise SdwbError(f"run name {name!r}: expected letters, digits, '.', '_' or '-' only")
    if not re.fullmatch(r"[0-9a-f]{8,}", recipe_hash):
        raise SdwbError(f"recipe hash {recipe_hash!r}: expected at least 8 hex digits")
    return Path(root) / f"{name}-{recipe_hash[:8]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file beside it, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save_image(image, path: str | Path) -> Path:
    """Save a PIL image atomically; the format follows the file suffix (``.png``, ``.jpg``)."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    image.save(buf, format=fmt)
    return atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(final_path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``final_path`` on success.

    Yields the temporary directory (``<final>.tmp-XXXX``, same parent so the rename is atomic).
    On any exception (Ctrl-C included) the temporary directory is removed and the exception
    re-raised, so nothing half-built is left under ``final_path``. An existing ``final_path`` is
    an error unless ``overwrite``: then it is replaced only after the new one is complete.

    The temporary directory is claimed with a lock held while it is built
    (:mod:`sdwb.store_lock`); ``<final>.tmp-*`` directories whose lock no live process holds
    (a ``kill -9``) are removed here first.
    """
    from sdwb.store_lock import claim_tmp_dir, release_tmp_lock, remove_stale_tmp

    final = Path(final_path)
    if final.exists() and not overwrite:
        raise SdwbError(f"{final}: already exists (refusing to overwrite a finished artifact)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SdwbError(f"{final}: cannot create it: a file is in the way of its parent directory") from None
    remove_stale_tmp(final)
    tmp, owner = claim_tmp_dir(final)
    try:
        yield tmp
        if final.exists():  # overwrite: move the old one aside, swap in the new one, then delete
            old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_tmp_lock(owner)


WORK_RUN_FILE = "run.json"


def prepare_work_dir(work: str | Path, identity: dict, kind: str) -> None:
    """Create a resumable work directory, or check that it holds a run of exactly ``identity``.

    ``identity`` (e.g. the resolved config and the source model's fingerprint) is written to
    ``work/run.json`` on creation; a later run resumes only when it matches, so checkpoints of
    another config or model are never mixed in. ``kind`` names the run in the errors
    ("pruning", "distillation").
    """
    work = Path(work)
    run_file = work / WORK_RUN_FILE
    if run_file.is_file():
        try:
            found = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise SdwbError(f"corrupt {run_file}: {exc} (delete {work} to start over)") from None
        if found != identity:
            what = "config" if found.get("config") != identity.get("config") else "source model"
            raise SdwbError(f"{work}: holds a {kind} run with another {what}; give the same settings to "
                            f"resume it, or delete {work} (or pass another --work-dir) to start over")
        return
    if work.exists() and any(work.iterdir()):
        raise SdwbError(f"{work}: exists and is not a {kind} work directory (no {WORK_RUN_FILE})")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, identity)


def write_resolved_config(directory: str | Path, recipe_dict: dict) -> Path:
    """Write ``config.resolved.yaml`` (the recipe with all defaults filled in) into ``directory``."""
    text = yaml.safe_dump(recipe_dict, sort_keys=False, default_flow_style=False)
    return atomic_write_text(Path(directory) / RESOLVED_CONFIG, text)


def check_writable_file(path: str | Path, suffixes: tuple[str, ...] | None = None) -> Path:
    """Validate an output file path before any work: right suffix, parent creatable and writable.

    Creates the parent directory. Raises ``SdwbError`` naming the path otherwise.
    """
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise SdwbError(f"{path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise SdwbError(f"{path}: is a directory, expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdwbError(f"{path}: cannot create directory {path.parent}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SdwbError(f"{path}: not writable")
    _probe_write(path.parent, str(path))
    return path


def _probe_write(directory: Path, label: str) -> None:
    """Create and remove a file in ``directory``: catches what ``os.access`` cannot (a read-only
    filesystem, a full quota; root passes every ``os.access``)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdwb-write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SdwbError(f"{label}: cannot write into {directory}: {e.strerror or e}") from None


def check_writable_dir(path: str | Path, label: str = "output") -> Path:
    """Validate an output directory before any work (loading a model, training): not a file, its
    nearest directory creatable and writable. Creates the parent, never ``path`` itself.

    ``label`` names the input in the error (``--output runs/x``, ``--store runs/stages``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SdwbError(f"{label}: exists and is not a directory")
    where = path if path.is_dir() else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdwbError(f"{label}: cannot create directory {where}: {e.strerror or e}") from None
    if not os.access(where, os.W_OK | os.X_OK):
        raise SdwbError(f"{label}: not writable ({where})")
    _probe_write(where, label)
    return path
