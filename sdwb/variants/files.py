"""Hashes of a variant's files, their verification, and the library versions a record keeps.

One function of each: :func:`hash_files` is what ``sdwb.json`` and ``manifest.json`` list,
:func:`verify_files` refuses a missing, truncated (size first, so it is named as such) or
modified file, :func:`library_versions` is what every record says it was made with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from sdwb.errors import SdwbError
from sdwb.hash_cache import flush as flush_hash_cache
from sdwb.hash_cache import sha256_cached, sha256_file  # noqa: F401  (the one hasher, re-exported)

MB = 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".data", ".plan")
LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
             "torchao", "tensorrt", "numpy")


def hash_files(root: Path, skip: Sequence[str] = ()) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``root`` except ``skip``."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    }


def verify_files(directory: Path, files: dict, listed_in: Path, *, event: str) -> None:
    """Refuse a file of ``files`` (``{rel: {"sha256", "size"}}``, as listed in ``listed_in``) that is
    missing, of another size (checked first, so truncation is named) or of another sha256.
    ``event`` is what wrote the list ("export", "the variant was written"). Hashes are reused while
    a file is unchanged (:mod:`sdwb.hash_cache`), so verifying again costs a ``stat`` per file."""
    if not isinstance(files, dict):
        raise SdwbError(f"corrupt {listed_in}: 'files' is not an object")
    for rel, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or "sha256" not in meta:
            raise SdwbError(f"corrupt {listed_in}: files.{rel}: expected {{sha256, size}}")
        path = directory / rel
        if not path.is_file():
            raise SdwbError(f"{path}: missing (listed in {listed_in})")
        size = path.stat().st_size
        if size != meta["size"]:
            raise SdwbError(f"{path}: {size} bytes, {listed_in.name} says {meta['size']} (truncated or "
                            f"modified after {event})")
        if sha256_cached(path) != meta["sha256"]:
            raise SdwbError(f"{path}: sha256 differs from {listed_in} (modified after {event})")
    flush_hash_cache()  # what was verified, remembered for the next process


def library_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of sdwb and of every installed library a variant or export depends on."""
    import importlib.metadata as md

    import sdwb

    out = {"sdwb": sdwb.__version__}
    for dist in (*LIBRARIES, *extra):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def weight_files(directory: Path) -> list[Path]:
    """Weight files of a model directory; per folder safetensors win over other formats."""
    files: list[Path] = []
    folders = sorted({p.parent for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()})
    for folder in folders:
        here = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        safe = [p for p in here if p.suffix == ".safetensors"]
        files += safe or here
    return files


def weights_mb(path: Path) -> float:
    """MB of the weight files under ``path`` (what "size on disk" means in records and results)."""
    return sum(f.stat().st_size for f in weight_files(path)) / MB


def weights_digest(root: Path, files: Iterable[Path]) -> str:
    """One sha256 naming a model's weights: over the sorted ``relative path:sha256`` lines of
    ``files`` (cached per file, :mod:`sdwb.hash_cache`), so two results name the same weights exactly
    when their files are byte for byte the same."""
    return _digest((f.relative_to(root).as_posix(), sha256_cached(f)) for f in sorted(Path(f) for f in files))


BUILT_IN_CODE = "built in code"  # the digest recorded for a builtin made in code (no weight files)


def record_digest(record: dict) -> str | None:
    """The same digest from a variant record's own ``files`` hashes (no file is read), or None."""
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    return _digest((name, files[name].get("sha256") if isinstance(files[name], dict) else files[name])
                   for name in sorted(files))


def _digest(named_hashes: Iterable[tuple[str, str]]) -> str:
    """sha256 over the ``name:sha256`` lines, in the order given."""
    import hashlib

    digest = hashlib.sha256()
    for name, sha in named_hashes:
        digest.update(f"{name}:{sha}\n".encode())
    return digest.hexdigest()
