"""Verify a model directory before anything in it is loaded: the loader fails closed.

Why: ``from_pretrained`` loads whatever it finds. A byte flipped in a weight file loads silently;
a ``.bin`` beside no ``.safetensors`` is a pickle that diffusers/transformers unpickle; a symlink
can point anywhere on the machine. So :func:`verify_model` runs before every pipeline or judge
is loaded (``sdwb.loading``) and refuses, each in one line naming the file:

- a **builtin** (``sdwb/assets/<name>/``) whose files differ from its shipped
  ``sdwb-files.json`` (sha256 + size of every file; a missing, modified, truncated or unlisted file,
  or no list at all), and likewise any directory that carries such a list (a copy of a builtin).
  Builtins built in code (``sd15-arch``, ``sdxl-arch``) have no files.
- a **variant** (a directory with ``sdwb.json`` listing ``files``) whose files differ from it.
- in any directory: **pickle weights** (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.pkl``) in a
  folder with no ``.safetensors`` to load instead (the loaders pass ``use_safetensors=True``, so a
  pickle beside safetensors is never read), with the command that converts them;
  **truncated or corrupt safetensors** (the header gives every tensor's byte range: they must
  exactly cover the data, i.e. the file size must match); **symlinks leading out of the model
  directory** unless ``sdwb --follow-symlinks`` (or ``SDWB_FOLLOW_SYMLINKS=1``) is given; a
  directory or file that cannot be read (named, instead of an internal ``PermissionError``).

Hashes come from :mod:`sdwb.hash_cache`, so a model verified once is re-checked at the cost of a
``stat`` per file while it is unchanged. A plain directory has no list of hashes to check against:
its content hash is what results and stage keys record (``source_fingerprint``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from sdwb.errors import SdwbError

FILES_MANIFEST = "sdwb-files.json"  # a builtin's list of its files (tools/builtin_manifest.py writes it)
FILES_FORMAT = "sdwb-builtin-files"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FOLLOW_SYMLINKS_ENV = "SDWB_FOLLOW_SYMLINKS"
MANIFEST_TOOL = "python -m tools.builtin_manifest"


def follow_symlinks_allowed() -> bool:
    """True when ``sdwb --follow-symlinks`` or ``SDWB_FOLLOW_SYMLINKS=1`` allows links out of a model."""
    return os.environ.get(FOLLOW_SYMLINKS_ENV, "") not in ("", "0")


def check_readable(path: Path, what: str = "model directory") -> None:
    """A one-line error when ``path`` (a directory) cannot be listed and entered."""
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise SdwbError(f"{path}: permission denied: cannot read the {what} (check its permissions)")


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file by reading only its header.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    byte range, then the data; the ranges must lie in, and exactly cover, the data section, so a
    file cut short (or grown) is refused without reading its data.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size - 8} after the length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data = size - 8 - n
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not 0 <= begin <= stop <= data:
                raise ValueError(
                    f"tensor '{name}' spans bytes {begin}-{stop} of a {data}-byte data section (truncated?)"
                )
            end = max(end, stop)
        if end != data:
            raise ValueError(f"tensors cover {end} bytes but the data section has {data} (truncated or "
                             "extended?)")
    except PermissionError:
        raise SdwbError(f"{path}: permission denied: cannot read the weights") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SdwbError(f"corrupt weights: {path}: {exc}") from None


def convert_command(directory: Path, kind: str) -> str:
    """The one-off command that rewrites a directory's pickle weights as safetensors."""
    cls = "diffusers.DiffusionPipeline" if kind == "pipeline" else "transformers.AutoModel"
    module, name = cls.split(".")
    return (f"python -c \"from {module} import {name}; {name}.from_pretrained('{directory}', "
            f"use_safetensors=False).save_pretrained('{directory}-safetensors', safe_serialization=True)\"")


def _containment_root(root: Path) -> Path:
    """What a link may point into: the model directory, or for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files are links into ``../../blobs``) its repo."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def _walk(directory: Path, follow: bool):
    """``(path, is_dir)`` of everything under ``directory``; unreadable parts are one-line errors."""

    def denied(err: OSError) -> None:
        raise SdwbError(f"{err.filename or directory}: permission denied: cannot read the model directory "
                        "(check its permissions)" if isinstance(err, PermissionError) else
                        f"{err.filename or directory}: cannot read: {err.strerror or err}")

    for top, dirs, files in os.walk(directory, onerror=denied, followlinks=follow):
        base = Path(top)
        for name in sorted(dirs):
            yield base / name, True
        for name in sorted(files):
            yield base / name, False


def scan_directory(directory: Path, kind: str = "pipeline", follow_symlinks: bool | None = None) -> None:
    """The checks every model directory gets: readable, no links out, no pickle, whole safetensors."""
    directory = Path(directory)
    check_readable(directory)
    follow = follow_symlinks_allowed() if follow_symlinks is None else follow_symlinks
    root = _containment_root(Path(os.path.realpath(directory)))
    entries = list(_walk(directory, follow))
    for path, _is_dir in entries:
        if path.is_symlink() and not follow:
            target = Path(os.path.realpath(path))
            if target != root and root not in target.parents:
                raise SdwbError(
                    f"{path}: a symlink to {target}, outside the model directory {directory}; refused (pass "
                    f"`sdwb --follow-symlinks ...` or set {FOLLOW_SYMLINKS_ENV}=1 to load it)"
                )
    files = [p for p, is_dir in entries if not is_dir]
    safe_folders = {p.parent for p in files if p.suffix == ".safetensors"}
    for path in files:
        if path.suffix.lower() in PICKLE_SUFFIXES and path.parent not in safe_folders:
            raise SdwbError(
                f"{path}: pickle weights are refused (loading them can run code); convert the model to "
                f"safetensors once where you trust the file: {convert_command(directory, kind)}"
            )
        if not os.access(path, os.R_OK):
            raise SdwbError(f"{path}: permission denied: cannot read the file (check its permissions)")
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def read_files_manifest(directory: Path, name: str) -> dict:
    """The ``files`` of a builtin's ``sdwb-files.json``; missing or corrupt is a one-line error."""
    path = directory / FILES_MANIFEST
    short = name.removeprefix("builtin:")
    if not path.is_file():
        raise SdwbError(f"{name}: no {FILES_MANIFEST} in {directory}: a shipped model must list the sha256 "
                        f"of its files (after producing it, run `{MANIFEST_TOOL} {short}`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {path}: {' '.join(str(exc).split())}") from None
    files = data.get("files") if isinstance(data, dict) else None
    well_formed = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("size"), int)
        for m in files.values())
    if not well_formed or data.get("format") != FILES_FORMAT:
        raise SdwbError(f"corrupt {path}: expected {{\"format\": \"{FILES_FORMAT}\", \"files\": {{path: "
                        "{sha256, size}}}")
    return files


def _listed_files(directory: Path) -> list[str]:
    """Every file a manifest must list: all but the manifest itself and hidden files."""
    out = []
    for path, is_dir in _walk(directory, follow=False):
        rel = path.relative_to(directory).as_posix()
        if is_dir or rel == FILES_MANIFEST or any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(rel)
    return out


def verify_builtin(name: str, directory: Path) -> None:
    """A shipped builtin's files, each against the sha256 and size in its ``sdwb-files.json``."""
    from sdwb.variants.files import verify_files

    files = read_files_manifest(directory, name)
    unlisted = sorted(set(_listed_files(directory)) - set(files))
    if unlisted:
        raise SdwbError(f"{directory / unlisted[0]}: not listed in {directory / FILES_MANIFEST} (added after "
                        f"{name} was shipped; remove it, or re-run `{MANIFEST_TOOL}` if it belongs there)")
    verify_files(directory, files, directory / FILES_MANIFEST, event=f"{name} was shipped")


def _listed_name(directory: Path) -> str:
    """The model a copied ``sdwb-files.json`` names (for its error messages)."""
    try:
        name = json.loads((directory / FILES_MANIFEST).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        name = None
    return f"{name} (copied to {directory})" if isinstance(name, str) else str(directory)


def verify_model(spec: str, path: Path, kind: str = "pipeline") -> None:
    """Every check of the module docstring for the directory ``path`` that ``spec`` resolved to."""
    from sdwb.hash_cache import flush
    from sdwb.variants.record import read_record, verify_record
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin

    path = Path(path)
    try:
        scan_directory(path, kind)
        if spec.startswith(BUILTIN_PREFIX) and get_builtin(spec).asset is not None:
            verify_builtin(get_builtin(spec).name, path)
        elif (path / FILES_MANIFEST).is_file():  # a copy of a builtin carries its list: held to it too
            verify_builtin(_listed_name(path), path)
        record = read_record(path)
        if record is not None and record.get("files"):
            verify_record(path, record)
    except PermissionError as exc:
        raise SdwbError(f"{exc.filename or path}: permission denied: cannot read it (check its "
                        "permissions)") from None
    finally:
        flush()


def files_manifest(directory: Path, name: str) -> dict:
    """The ``sdwb-files.json`` of ``directory`` as it is now (what the tool writes)."""
    from sdwb.variants.files import sha256_file

    files = {rel: {"sha256": sha256_file(directory / rel), "size": (directory / rel).stat().st_size}
             for rel in sorted(_listed_files(directory))}
    return {"format": FILES_FORMAT, "version": 1, "model": name, "files": files}


def write_files_manifest(directory: Path, name: str) -> Path:
    """Write ``directory/sdwb-files.json`` (atomically) listing every file's sha256 and size."""
    from sdwb.runs import atomic_write_json

    return atomic_write_json(Path(directory) / FILES_MANIFEST, files_manifest(Path(directory), name))
