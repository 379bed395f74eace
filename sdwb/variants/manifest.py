"""``manifest.json`` of an export directory: read, verified against its hashes, and recognised.

The manifest (written by ``export/``) lists every component's graph files, interface and
validation, and sha256 + size of every file. Readers (the ONNX Runtime and TensorRT pipelines,
the benchmark, graph-level quantization) take it from here, verified. :func:`source_fingerprint`
is what an export or a trained variant depends on, so a cached one is reused only while it
still matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdwb.errors import SdwbError
from sdwb.variants.files import hash_files, verify_files

MANIFEST = "manifest.json"
EXPORT_FORMAT = "sdwb-onnx-export"
ENGINE_FORMAT = "sdwb-tensorrt-engines"  # the manifest of a TensorRT engine directory
OPENVINO_FORMAT = "sdwb-openvino-export"  # OpenVINO IR per component (sdwb export openvino)
Dim = int | str  # a manifest dimension: an int is fixed; "axis" names a dynamic axis; "axis*k" is derived


def resolve_dim(dim: Dim, point: dict[str, int]) -> int:
    """``4`` -> 4, ``"batch"`` -> point["batch"], ``"height*8"`` -> 8 * point["height"]."""
    if isinstance(dim, int):
        return dim
    axis, _, factor = dim.partition("*")
    return point[axis] * (int(factor) if factor else 1)


def is_export_dir(path: str | Path) -> bool:
    """An ONNX export or ONNX Runtime variant: a manifest and no diffusers ``model_index.json``."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file() and not (path / "model_index.json").exists()


def manifest_format(spec: str | Path) -> str | None:
    """The ``format`` of ``spec``'s ``manifest.json``, or None when ``spec`` is no such directory."""
    path = Path(str(spec)).expanduser() / MANIFEST
    if str(spec).startswith("builtin:") or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return data.get("format", "unknown") if isinstance(data, dict) else "unknown"


def read_manifest(directory: str | Path, expected_format: str = EXPORT_FORMAT) -> dict:
    """The parsed ``manifest.json`` of an export directory (no hashing)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise SdwbError(f"export directory not found: {directory}")
    if not path.is_file():
        raise SdwbError(f"not a finished export: no {MANIFEST} in {directory} (run `sdwb export` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SdwbError(f"{path}: format {found!r}, expected {expected_format!r}")
    return manifest


def verify_manifest(directory: str | Path, expected_format: str = EXPORT_FORMAT) -> dict:
    """Re-hash every file the manifest lists; a missing, truncated or modified one is refused.

    Returns the manifest. Sizes are compared before hashes, so truncation is named as such.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, expected_format)
    verify_files(directory, manifest.get("files", {}), directory / MANIFEST, event="export")
    return manifest


def source_fingerprint(spec: str) -> str:
    """What the export of ``spec`` depends on, as one string (recorded as ``source.fingerprint``).

    A model built in code (``builtin:sd15-arch``: seeded weights) is its name plus the sdwb
    version; a directory is the sha256 over every file's relative path and sha256 (configs,
    tokenizer and weights). The benchmark reuses a cached export only while this still matches.
    """
    import sdwb
    from sdwb.loading import resolve_spec
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin

    if spec.startswith(BUILTIN_PREFIX) and get_builtin(spec).asset is None:
        return f"code:{get_builtin(spec).name}:sdwb-{sdwb.__version__}"
    root = Path(resolve_spec(spec, "pipeline"))
    h = hashlib.sha256()
    for rel, meta in hash_files(root, skip=("sdwb-files.json",)).items():  # a builtin's own list: derived
        h.update(f"{rel}\0{meta['sha256']}\n".encode())
    return "sha256:" + h.hexdigest()
