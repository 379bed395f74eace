"""A model's own inference defaults (steps, guidance, scheduler), read from its ``sdwb.json``.

Why: a step-distilled student is only right with the step count, sampler and guidance it was
trained for (4 DDIM steps, guidance 1.0 when guidance is distilled into it). Its variant record
carries them as ``"inference": {"steps": 4, "scheduler": "ddim", "guidance": 1.0}``, and
``sdwb generate`` and the benchmark use them for every setting the user did not give. A variant
made from such a model (quantized, exported) keeps its parent's record, so the lookup walks the
record's ``parent.variant`` chain; an ONNX export carries a copy of its source's ``sdwb.json``.

Precedence everywhere: an explicit flag / setting, then the model's defaults, then the global
defaults (:data:`FALLBACK`).
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = ("steps", "guidance", "scheduler")
FALLBACK = {"steps": 30, "guidance": 7.5, "scheduler": "ddim"}
ATTRIBUTE = "sdwb_inference"  # set on a pipeline by sdwb.loading.load_pipeline


def from_record(record: dict | None) -> dict:
    """``{steps, guidance, scheduler}`` (the keys present) of a variant record or its ancestors."""
    depth = 0
    while isinstance(record, dict) and depth < 32:
        found = record.get("inference")
        if isinstance(found, dict):
            return {k: found[k] for k in KEYS if found.get(k) is not None}
        parent = record.get("parent")
        record = parent.get("variant") if isinstance(parent, dict) else None
        depth += 1
    return {}


def _model_dir(spec: str) -> Path | None:
    """The directory a spec names, without loading or raising (None when there is none)."""
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin

    if spec.startswith(BUILTIN_PREFIX):
        try:
            return get_builtin(spec).path
        except Exception:  # unknown builtin: the loader reports it
            return None
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def for_spec(spec: str | None) -> dict:
    """The inference defaults of the model ``spec`` names (a variant or export dir), else ``{}``.

    Never raises for a missing or unreadable model: loading reports those with its own errors.
    """
    if not spec:
        return {}
    directory = _model_dir(str(spec))
    if directory is None or not (directory / "sdwb.json").is_file():
        return {}
    try:
        record = json.loads((directory / "sdwb.json").read_text())
    except (OSError, ValueError):
        return {}
    return from_record(record)


def attach(pipe, defaults: dict) -> None:
    """Remember ``defaults`` on a loaded pipeline (read back by :func:`for_pipeline`)."""
    if defaults:
        object.__setattr__(pipe, ATTRIBUTE, dict(defaults))


def for_pipeline(pipe) -> dict:
    """The defaults attached to ``pipe`` by the loader, else ``{}``."""
    return dict(getattr(pipe, ATTRIBUTE, None) or {})


def resolve(pipe, **given) -> dict:
    """``given`` (None = not given) completed from the pipeline's defaults, then :data:`FALLBACK`."""
    model = for_pipeline(pipe)
    return {k: given[k] if given.get(k) is not None else model.get(k, FALLBACK[k]) for k in KEYS}
