"""The training-free acceleration registry: one typed config and one applier per method, by name.

Mirrors :mod:`sdwb.quant.registry`: a method is one module of :mod:`sdwb.cache` holding its config
class (``@register``) and its applier (``@applies``); the method list, the ``CacheConfig`` union,
the ``--method`` help and the loader's re-application (:func:`sdwb.cache.config.apply_cache`) are
all read from here.
"""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel, ConfigDict

ATTRIBUTE = "sdwb_cache"  # set on a pipeline by an applier: the method's live state (see config.applied)


class Strict(BaseModel):
    """Unknown keys and loose types are errors: a typo must fail before a model is loaded."""

    model_config = ConfigDict(extra="forbid", strict=True)


# method name -> config class, in registration order (the order of help texts and docs).
METHODS: dict[str, type[Strict]] = {}
# method name -> applier ``(pipe, config) -> summary`` (in place on the pipeline).
APPLIERS: dict[str, Callable] = {}


def register(cls: type[Strict]) -> type[Strict]:
    """Class decorator: register a method config (its ``method`` literal is its name)."""
    name = cls.model_fields["method"].default
    if name in METHODS:
        raise ValueError(f"cache method {name!r} registered twice")
    METHODS[name] = cls
    return cls


def applies(*configs: type[Strict]):
    """Function decorator: ``fn`` applies the methods of ``configs`` to a pipeline in place."""

    def add(fn: Callable) -> Callable:
        for cls in configs:
            APPLIERS[cls.model_fields["method"].default] = fn
        return fn

    return add
