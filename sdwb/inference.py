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

from pathlib import Path

KEYS = ("steps", "guidance", "scheduler")
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER = 30, 7.5, "ddim"  # the one place of each default
FALLBACK = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "scheduler": DEFAULT_SCHEDULER}
ATTRIBUTE = "sdwb_inference"  # set on a pipeline by sdwb.loading.load_pipeline


def from_record(record: dict | None) -> dict:
    """``{steps, guidance, scheduler}`` (the keys present) of a variant record or its ancestors."""
    from sdwb.variants.record import ancestry

    for entry in ancestry(record):
        found = entry.get("inference")
        if isinstance(found, dict):
            return {k: found[k] for k in KEYS if found.get(k) is not None}
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
    from sdwb.errors import SdwbError
    from sdwb.variants.record import read_record

    directory = _model_dir(str(spec))
    if directory is None:
        return {}
    try:
        return from_record(read_record(directory))
    except SdwbError:  # a corrupt record: loading reports it
        return {}


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
