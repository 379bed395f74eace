"""The cache methods as one typed union; applying, removing and asking about them on a pipeline.

A cache variant (``sdwb compress cache``) is the source model's weights plus an ``sdwb.json`` with
``stage: cache`` and the resolved config; :func:`apply_cache` is what ``sdwb.loading`` runs on
the loaded pipeline. The refusals shared by every verb are here too: a cache variant runs on the
torch backend only (:func:`refuse_exported`), is taken by no other compression verb and not
exported (``compress.variant_io.load_source``, ``export.onnx``), and DeepCache is not combined with
``torch.compile`` (:func:`check_compilable`) nor asked for a generation of one step
(:func:`check_steps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from sdwb.cache import deepcache, tome  # noqa: F401  (register the methods)
from sdwb.cache.registry import APPLIERS, ATTRIBUTE, METHODS
from sdwb.errors import SdwbError
from sdwb.schema_errors import parse_by_method

CacheConfig = Union[tuple(METHODS.values())]  # type: ignore[valid-type]  # every registered config
STAGE = "cache"


def methods_help() -> str:
    """``deepcache | tomesd``: the registered methods, for help texts."""
    return " | ".join(METHODS)


def parse_cache_config(data: dict, source: str = "cache config") -> CacheConfig:
    """Validate ``data`` (must hold ``method``) as that method's config; one-line errors."""
    return parse_by_method(data, METHODS, source, "cache")


def load_cache_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      **flags: Any) -> CacheConfig:
    """Read a ``configs/cache/*.yaml`` file (or start empty), apply ``--set`` overrides, then
    ``flags`` (command-line options; None values ignored), and validate."""
    from sdwb.yaml_io import read_with_flags

    data, source = read_with_flags(path, overrides, flags, guard={"method": "--method"})
    return parse_cache_config(data, source)


def resolved(config: CacheConfig) -> dict:
    """The config with every default filled in, as plain JSON data (recorded in sdwb.json)."""
    return config.model_dump(mode="json")


def apply_cache(pipe, config: CacheConfig) -> dict:
    """Apply a cache method to ``pipe`` in place; a summary of what it changed."""
    if applied(pipe) is not None:
        raise SdwbError(f"{config.method}: this pipeline already runs {applied(pipe).method}; "
                        "one cache method per model")
    return APPLIERS[config.method](pipe, config)


def applied(pipe) -> CacheConfig | None:
    """The cache method ``pipe`` runs with, else None."""
    state = getattr(pipe, ATTRIBUTE, None)
    return state.config if state is not None else None


def last_call(pipe) -> str | None:
    """``"full"`` or ``"shallow"`` for the UNet call that just ran on a DeepCache pipeline, else None."""
    state = getattr(pipe, ATTRIBUTE, None)
    return getattr(state, "last_call", None)


def remove_cache(pipe) -> None:
    """Undo :func:`apply_cache` (the modules get their own ``forward`` back; tomesd unpatched)."""
    state = getattr(pipe, ATTRIBUTE, None)
    if state is None:
        return
    if state.config.method == "tomesd":
        import tomesd

        tomesd.remove_patch(pipe.unet)
    else:
        for module in state.patched:
            module.__dict__.pop("forward", None)
    object.__delattr__(pipe, ATTRIBUTE)


def check_steps(pipe, steps: int) -> None:
    """DeepCache reuses the cache from the second step on: a one-step generation has nothing to reuse."""
    config = applied(pipe)
    if config is not None and config.method == "deepcache" and config.interval > 1 and steps < 2:
        raise SdwbError(f"deepcache (interval {config.interval}): {steps} denoising step leaves no step to "
                        "reuse the cache; generate with 2 or more steps, or use the model it was made from")


def check_compilable(pipe) -> None:
    """DeepCache's per-step Python state cannot go into a compiled graph: refused in one line."""
    config = applied(pipe)
    if config is not None and config.method == "deepcache":
        raise SdwbError("torch.compile with a deepcache variant: the step schedule is Python state that "
                        "inductor would recompile at every step; leave out compile")


def cache_record(directory: str | Path | None) -> dict | None:
    """The ``sdwb.json`` of a cache variant directory, else None (never raises for a corrupt one:
    whoever loads it reports that)."""
    from sdwb.variants.record import read_record

    if directory is None or not Path(directory).is_dir():
        return None
    try:
        record = read_record(directory)
    except SdwbError:
        return None
    return record if record is not None and record.get("stage") == STAGE else None


def refuse_cache_variant(spec: str | Path, what: str) -> None:
    """A one-line error when ``spec`` is a cache variant: ``what`` (an export, a backend, a verb)
    cannot take it; its parent (the model it was made from) can."""
    path = Path(str(spec)).expanduser()
    record = cache_record(path) if path.is_dir() else None
    if record is None:
        return
    parent = (record.get("parent") or {}).get("spec") or "its parent"
    raise SdwbError(f"{spec}: a {record.get('method')} cache variant runs on the torch backend only; "
                    f"{what} takes the model it was made from ({parent}) instead")
