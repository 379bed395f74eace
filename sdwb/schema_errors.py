"""One formatter for the validation errors of every schema: one line that names the key.

Every typed config of the workbench (quantize / prune / distill configs, bench configs, recipes,
gate configs) is a strict pydantic model, and bad input must come back as one line naming the
source, the key path and what was expected, never a pydantic dump. :func:`format_errors` is that
line for all of them; a schema passes what is its own: how a key path is shown (``label``: a
variant's name, a hidden union tag), where the allowed keys of a mapping come from (``allowed``),
extra error kinds (``kinds``: a recipe's stage tag), how a bad value is shown (``got``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


def lower(msg: str) -> str:
    """pydantic's message with its first letter lowered (it continues our sentence)."""
    return msg[:1].lower() + msg[1:] if msg else msg


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_at(root: type[BaseModel], loc: Sequence) -> type[BaseModel] | None:
    """The model class a key path points into (list indices skipped), or None."""
    model: Any = root
    for seg in loc:
        if isinstance(seg, int):
            continue
        field = getattr(model, "model_fields", {}).get(seg)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def fields_of(root: type[BaseModel]) -> Callable[[tuple], list[str] | None]:
    """``allowed`` for a plain nested schema: the fields of the model holding the unknown key."""

    def allowed(loc: tuple) -> list[str] | None:
        model = model_at(root, loc[:-1])
        return list(model.model_fields) if model else None

    return allowed


def format_errors(
    e: ValidationError,
    *,
    allowed: Callable[[tuple], list[str] | None] | None = None,
    label: Callable[[tuple], str] | None = None,
    kinds: dict[str, Callable[[dict], str]] | None = None,
    got: Callable[[dict], str] = lambda err: f"{lower(err['msg'])}, got {err['input']!r}",
    value_error_key: bool = True,
    set_keys: Sequence[Sequence[str]] = (),
    limit: int = 3,
    empty_key: str = "",
) -> str:
    """``key: what`` for the first ``limit`` errors, joined by "; " (and how many more there are).

    ``what`` is "unknown key (allowed: ...)", "required key is missing", a model validator's own
    sentence (``value_error``: its keys are in it, so the key prefix is optional), a ``kinds``
    message, else ``got(err)``. A key set by ``--set`` is marked ``[from --set]``.
    """
    parts = []
    errors = e.errors(include_url=False)
    for err in errors[:limit]:
        loc = tuple(err["loc"])
        key = (label(loc) if label else ".".join(map(str, loc))) or empty_key
        kind = err["type"]
        if kind == "extra_forbidden":
            keys = allowed(loc) if allowed else None
            what = "unknown key" + (f" (allowed: {', '.join(keys)})" if keys else "")
        elif kind == "missing":
            what = "required key is missing"
        elif kinds and kind in kinds:
            what = kinds[kind](err)
        elif kind == "value_error":  # a model validator's own sentence
            fallback = err["msg"] if value_error_key else lower(err["msg"])
            what = str(err.get("ctx", {}).get("error", fallback))
            if not value_error_key:
                parts.append(what)
                continue
        else:
            what = got(err)
        if any(list(map(str, loc[: len(k)])) == list(k) for k in set_keys):
            what += " [from --set]"
        parts.append(f"{key}: {what}" if key else what)
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_model(cls: type[BaseModel], data: Any, source: str, what: str) -> BaseModel:
    """Validate ``data`` as ``cls`` with one-line errors naming ``source`` and the key; ``what`` names
    the keys in the not-a-mapping error (the front door of a config without methods)."""
    from sdwb.errors import SdwbError

    if not isinstance(data, dict):
        raise SdwbError(f"{source}: expected a mapping of {what} keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SdwbError(f"{source}: " + format_errors(e, allowed=fields_of(cls))) from None


def parse_by_method(data: Any, methods: dict[str, type[BaseModel]], source: str, what: str) -> BaseModel:
    """Validate ``data`` (a mapping that must hold ``method``) as the config class ``methods``
    registers for that method, with one-line errors: the shared front door of every registry of
    method configs (quantization, cache). ``what`` names the keys in the not-a-mapping error."""
    from sdwb.errors import SdwbError

    if not isinstance(data, dict):
        raise SdwbError(f"{source}: expected a mapping of {what} keys, got {type(data).__name__}")
    method = data.get("method")
    if method is None:
        raise SdwbError(f"{source}: method: required key is missing (expected one of {', '.join(methods)})")
    cls = methods.get(method) if isinstance(method, str) else None
    if cls is None:
        raise SdwbError(f"{source}: method: unknown method {method!r} (expected one of {', '.join(methods)})")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SdwbError(f"{source}: " + format_errors(e, allowed=fields_of(cls))) from None
