"""Recipes: the YAML files in ``configs/`` that say what to run, validated by pydantic models.

Why: every experiment must be reproducible from one file plus its command-line overrides, and a
typo must fail loudly *before* anything runs. So every section forbids unknown keys, fields are
strictly typed, and any problem becomes one ``SdwbError`` line that names the file, the key path
(``bench.steps``) and what was expected. ``config_hash`` names run directories after the
resolved recipe, so two runs of the same recipe land in the same place.

Adding a stage type (compress, export, ...) is one new model with a ``kind: Literal[...]`` field
added to ``STAGE_TYPES``; ``stages`` is a discriminated union on ``kind``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.distill_config import DistillConfig
from compress.prune_config import PruneConfig
from sdwb.errors import SdwbError

Scheduler = Literal["ddim", "euler", "dpmpp", "lcm"]
Backend = Literal["torch", "onnxruntime", "tensorrt"]
DType = Literal["fp32", "bf16", "fp16"]


class _Section(BaseModel):
    """Base of every recipe model: unknown keys are errors, YAML types are taken as written."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateSection(_Section):
    """How images are generated (``sdwb generate`` and every stage that renders images)."""

    steps: int = Field(30, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(7.5, ge=0.0, description="classifier-free guidance scale (<=1 disables it)")
    scheduler: Scheduler = "ddim"
    seed: int = Field(0, ge=0)
    batch: int = Field(1, ge=1, le=256, description="images per prompt")
    height: int | None = Field(None, ge=8, multiple_of=8, description="pixels; default: the model's")
    width: int | None = Field(None, ge=8, multiple_of=8, description="pixels; default: the model's")
    dtype: DType = "fp32"


class BenchSection(_Section):
    """How variants are benchmarked (used by ``bench/``)."""

    steps: int = Field(30, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0)
    prompts: int = Field(8, ge=1, description="number of held-out evaluation prompts")
    repeats: int = Field(5, ge=1, description="timed repeats (median and spread are reported)")
    warmup: int = Field(1, ge=0, description="untimed warm-up runs")
    backend: Backend = "torch"
    dtype: DType = "fp32"
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: library default")


class GenerateStage(_Section):
    """Render the first ``prompts`` held-out evaluation prompts with the recipe's ``generate``
    settings. Validated now; executed by the recipe runner that later issues add."""

    kind: Literal["generate"]
    prompts: int = Field(16, ge=1)


class PruneStage(PruneConfig):
    """Prune the UNet of the stage's input model, as ``sdwb compress prune`` does: the keys of
    ``configs/prune/*.yaml`` (same schema and checks). Validated now; executed by the recipe
    runner (``sdwb run``, the recipes issue)."""

    kind: Literal["prune"]


class DistillStage(DistillConfig):
    """Step-distil the stage's input model, as ``sdwb compress distill`` does: the keys of
    ``configs/distill/*.yaml`` (same schema and checks). Validated now; executed by the recipe
    runner (``sdwb run``, the recipes issue)."""

    kind: Literal["distill"]


# Every stage type, one model each, told apart by ``kind``. Later issues append here.
STAGE_TYPES: tuple[type[BaseModel], ...] = (GenerateStage, PruneStage, DistillStage)
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Recipe(_Section):
    """A whole recipe: which model, how to generate and bench, and the stages to run."""

    name: str = Field("recipe", pattern=_NAME_PATTERN, max_length=64)
    model: str = Field("builtin:tiny-shapes", min_length=1)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    stages: list[Stage] = Field(default_factory=list)


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise SdwbError(f"{path}: recipe file not found")
    if path.is_dir():
        raise SdwbError(f"{path}: is a directory, expected a YAML recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SdwbError(f"{path}: cannot read recipe: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = e.problem or e.context or "syntax error"
        raise SdwbError(f"{where}: malformed YAML: {what}") from None
    except yaml.YAMLError as e:
        raise SdwbError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdwbError(f"{path}: expected a mapping of recipe keys at the top level, got {_kind(data)}")
    return data


_KEY_SEGMENT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|\d+)$")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the value parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    segments = key.strip().split(".")
    if not sep or not key.strip() or not all(_KEY_SEGMENT.match(s) for s in segments):
        raise SdwbError(f"--set {item!r}: expected KEY=VALUE with a dotted key such as bench.steps=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SdwbError(f"--set {item!r}: value is not a YAML scalar: {' '.join(str(e).split())}") from None
    return segments, value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied (later ones win)."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides or []:
        segments, value = parse_override(item)
        node: Any = out
        for depth, seg in enumerate(segments):
            last = depth == len(segments) - 1
            where = ".".join(segments[: depth + 1])
            if isinstance(node, list):
                if not seg.isdigit() or int(seg) >= len(node):
                    raise SdwbError(f"--set {item!r}: {where}: no such list item (list has {len(node)})")
                if last:
                    node[int(seg)] = value
                else:
                    node = node[int(seg)]
            elif isinstance(node, dict):
                if last:
                    node[seg] = value
                elif seg not in node and segments[depth + 1].isdigit():
                    raise SdwbError(f"--set {item!r}: {where} is not a list here, cannot index it")
                else:
                    node = node.setdefault(seg, {})
            else:
                parent = ".".join(segments[:depth])
                raise SdwbError(f"--set {item!r}: {parent} is a {_kind(node)}, not a section")
    return out


def recipe_from_dict(data: dict, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate ``data`` (+ overrides) as a :class:`Recipe`; errors name ``source`` and the key."""
    merged = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as e:
        set_keys = [parse_override(o)[0] for o in overrides or []]
        raise SdwbError(_format_validation_error(e, source, set_keys)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. ``path=None`` starts from the defaults.

    A recipe without ``name`` takes the file's stem (``configs/recipes/baseline.yaml`` ->
    ``baseline``), so run directories are named after the recipe.
    """
    if path is None:
        return recipe_from_dict({}, "recipe defaults", overrides)
    path = Path(path)
    data = _read_yaml(path)
    if "name" not in data and re.match(_NAME_PATTERN, path.stem):
        data["name"] = path.stem
    return recipe_from_dict(data, str(path), overrides)


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe with every default filled in, as plain JSON/YAML-able data."""
    return recipe.model_dump(mode="json")


def resolved_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text, keys in schema order."""
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False, default_flow_style=False)


def config_hash(recipe: Recipe | dict, length: int = 12) -> str:
    """Short sha256 of the canonical JSON of the resolved recipe (sorted keys, no whitespace)."""
    data = resolved_dict(recipe) if isinstance(recipe, Recipe) else recipe
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- error messages


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _allowed_keys(loc: tuple) -> list[str] | None:
    """Field names of the model that the parent of ``loc`` points at, if it can be found."""
    model: Any = Recipe
    for seg in loc[:-1]:
        if isinstance(seg, int):
            continue
        fields = getattr(model, "model_fields", {})
        if seg in fields:
            model = fields[seg].annotation
            continue
        stage = next((t for t in STAGE_TYPES if t.model_fields["kind"].annotation.__args__[0] == seg), None)
        if stage is None:
            return None
        model = stage
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def _format_one(err: dict, set_keys: list[list[str]]) -> str:
    loc = tuple(err["loc"])
    # a discriminated union inserts the tag after the list index (stages.0.generate.x): hide it
    shown = [str(p) for i, p in enumerate(loc)
             if not (i >= 2 and loc[i - 2] == "stages" and isinstance(loc[i - 1], int))]
    key = ".".join(shown) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        what = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif kind == "missing":
        what = "required key is missing"
    elif kind == "union_tag_invalid":
        what = f"unknown stage kind {err['ctx']['tag']!r} (expected one of: {', '.join(_STAGE_KINDS)})"
    elif kind == "union_tag_not_found":
        what = f"stage has no 'kind' (expected one of: {', '.join(_STAGE_KINDS)})"
    elif kind == "value_error":  # a model validator's own sentence names its keys
        what = str(err.get("ctx", {}).get("error", err["msg"]))
    else:
        msg = err["msg"]
        msg = msg[0].lower() + msg[1:] if msg else kind
        what = f"{msg}, got {_short(err['input'])} ({_kind(err['input'])})"
    if any(list(map(str, loc[: len(k)])) == k for k in set_keys):
        what += " [from --set]"
    return f"{key}: {what}"


_STAGE_KINDS = tuple(t.model_fields["kind"].annotation.__args__[0] for t in STAGE_TYPES)


def _format_validation_error(e: ValidationError, source: str, set_keys: list[list[str]]) -> str:
    errors = e.errors(include_url=False)
    parts = [_format_one(err, set_keys) for err in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more
