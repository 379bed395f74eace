"""``sdwb.json``: what a variant is, where it came from, and how to read it back.

A variant record holds: format, stage (prune / distill / quantize), method, backend, the parent
(spec, path and the parent's own record, so chains stay traceable), the resolved config, metrics
at creation, library versions, and sha256 + size of every other file. A stage's record may add its
own keys (``architecture`` of a pruned UNet, ``inference`` defaults of a distilled student).

Everything that reads records goes through here: :func:`read_record` (one parse, one-line
errors), :func:`ancestry` (the record and its ancestors, for what a parent decided: the pruned
architecture, the inference defaults), :func:`verify_record` (files against their hashes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from sdwb.errors import SdwbError
from sdwb.variants.files import library_versions, verify_files, weight_files, weights_digest

RECORD = "sdwb.json"
FORMAT = "sdwb-variant"
MAX_DEPTH = 32  # a chain longer than this is a loop in a hand-edited record


def read_record(directory: str | Path) -> dict | None:
    """The parsed ``sdwb.json`` of ``directory``, or None when it has none."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {path}: {exc}") from None
    if not isinstance(record, dict):
        raise SdwbError(f"corrupt {path}: expected a JSON object")
    _check_chain(record, path)
    return record


def _check_chain(record: dict, path: Path) -> None:
    """Refuse a record whose ``parent`` chain has the wrong shape (a hand-edited ``"parent": "x"``),
    so every reader can walk it without guarding each step."""
    where, node = "parent", record
    for _ in range(MAX_DEPTH):
        parent = node.get("parent")
        if parent is None:
            break
        if not isinstance(parent, dict):
            raise SdwbError(f"corrupt {path}: {where}: expected an object (spec, path, variant) or null, "
                            f"got {type(parent).__name__}")
        for key in ("spec", "path", "weights_sha256"):
            if parent.get(key) is not None and not isinstance(parent[key], str):
                raise SdwbError(f"corrupt {path}: {where}.{key}: expected a string or null")
        node = parent.get("variant")
        if node is None:
            break
        if not isinstance(node, dict):
            raise SdwbError(f"corrupt {path}: {where}.variant: expected the parent's record (an object) "
                            "or null")
        where += ".variant.parent"
    if "files" in record and not isinstance(record["files"], dict):
        raise SdwbError(f"corrupt {path}: files: expected an object of {{sha256, size}}")


def ancestry(record: dict | None) -> Iterator[dict]:
    """``record``, then its parent's record, and so on (as far as the chain was recorded)."""
    depth = 0
    while isinstance(record, dict) and depth < MAX_DEPTH:
        yield record
        parent = record.get("parent")
        record = parent.get("variant") if isinstance(parent, dict) else None
        depth += 1


def new_record(*, stage: str, method: str, backend: str, weights: str, parent: dict, config: dict,
               metrics: dict, extra_libraries: tuple[str, ...] = (), **fields) -> dict:
    """A variant record of ``stage`` (``fields`` adds the stage's own keys, in order)."""
    return {
        "format": FORMAT,
        "version": 1,
        "stage": stage,
        "method": method,
        "backend": backend,
        "weights": weights,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": parent,
        "config": config,
        **fields,
        "metrics": metrics,
        "libraries": library_versions(extra_libraries),
    }


def parent_entry(spec: str | None, path: Path | None, record: dict | None) -> dict:
    """How a record names its parent: the spec given, its resolved path, the digest of its weight
    files (``weights_sha256``, the digest a bench row of that model records, so a variant names the
    exact teacher or base it was made from; None for a model built in code), and its own record."""
    digest = None
    if path is not None and Path(path).is_dir():
        files = weight_files(Path(path))
        digest = weights_digest(Path(path), files) if files else None
    return {"spec": spec, "path": str(Path(path).resolve()) if path else None,
            "weights_sha256": digest, "variant": record}


def verify_record(directory: Path, record: dict) -> None:
    """Refuse a variant whose files differ (size, then sha256) from its record."""
    verify_files(directory, record.get("files", {}), Path(directory) / RECORD,
                 event="the variant was written")


def is_quantized(record: dict | None) -> bool:
    return bool(record) and record.get("stage") == "quantize"
