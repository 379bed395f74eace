"""Recipes: the YAML files in ``configs/`` that say what to run, validated by pydantic models.

Why: every experiment must be reproducible from one file plus its command-line overrides, and a
typo must fail loudly *before* anything runs. So every section forbids unknown keys, fields are
strictly typed, and any problem becomes one ``SdwbError`` line that names the file, the key path
(``bench.steps``) and what was expected. ``config_hash`` names run directories after the
resolved recipe, so two runs of the same recipe land in the same place.

Stages (``stages:``, run in order by ``sdwb run``, :mod:`sdwb.app.recipe_run`) reuse the schemas of
the single-technique commands: a ``prune`` stage takes exactly the keys of ``configs/prune/*.yaml``,
``distill`` / ``quantize`` / ``bench`` likewise, so a config moves into a recipe unchanged. Adding a
stage type is one model with a ``kind: Literal[...]`` field added to ``STAGE_TYPES`` (a
discriminated union on ``kind``) and one executor in :mod:`sdwb.app.recipe_run`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from bench.scenario import BenchConfig
from compress.distill_config import DistillConfig
from compress.prune_config import PruneConfig
from compress.tiny_decoder import DecoderConfig
from sdwb.backends.registry import Backend as Backend  # noqa: F401  (re-exported)
from sdwb.errors import SdwbError
from sdwb.inference import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS
from sdwb.schema_errors import format_errors, short
from sdwb.yaml_io import DType, Scheduler, _kind, apply_overrides, parse_override, read_yaml, resolve_include


class _Section(BaseModel):
    """Base of every recipe model: unknown keys are errors, YAML types are taken as written."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateSection(_Section):
    """How images are generated (``sdwb generate`` and every stage that renders images)."""

    steps: int = Field(DEFAULT_STEPS, ge=1, le=1000, description="denoising steps")
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0.0,
                            description="classifier-free guidance scale (<=1 disables it)")
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: int = Field(0, ge=0)
    batch: int = Field(1, ge=1, le=256, description="images per prompt")
    height: int | None = Field(None, ge=8, multiple_of=8, description="pixels; default: the model's")
    width: int | None = Field(None, ge=8, multiple_of=8, description="pixels; default: the model's")
    dtype: DType = "fp32"


class BenchSection(_Section):
    """Recipe-wide benchmark settings: every ``bench`` stage takes the keys set here for the keys
    its own ``defaults:`` leave unset (``prompts`` is a bench config's ``n_prompts``). Keys not
    written in the recipe are not passed on, so a model's own inference defaults still apply."""

    steps: int = Field(DEFAULT_STEPS, ge=1, le=1000)
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0.0)
    prompts: int = Field(8, ge=1, description="number of held-out evaluation prompts")
    repeats: int = Field(5, ge=1, description="timed repeats (median and spread are reported)")
    warmup: int = Field(1, ge=0, description="untimed warm-up runs")
    backend: Backend = "torch"
    dtype: DType = "fp32"
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: library default")


_STAGE_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


def _stage_name():
    return Field(None, pattern=_STAGE_NAME, max_length=32,
                 description="what bench variants call this stage's artifact (@NAME); default: the kind")


class GenerateStage(_Section):
    """Render the first ``prompts`` held-out evaluation prompts of the current model with the
    recipe's ``generate`` settings (a grid and one PNG per prompt)."""

    kind: Literal["generate"]
    name: str | None = _stage_name()
    prompts: int = Field(16, ge=1)


class PruneStage(PruneConfig):
    """Prune the UNet of the current model, as ``sdwb compress prune`` does: the keys of
    ``configs/prune/*.yaml`` (same schema and checks)."""

    kind: Literal["prune"]
    name: str | None = _stage_name()


class DistillStage(DistillConfig):
    """Step-distil the current model, as ``sdwb compress distill`` does: the keys of
    ``configs/distill/*.yaml`` (same schema and checks)."""

    kind: Literal["distill"]
    name: str | None = _stage_name()


class DecoderStage(DecoderConfig):
    """Replace the current model's VAE decoder by a distilled tiny one, as ``sdwb compress decoder``
    does: the keys of ``configs/decoder/*.yaml`` (same schema and checks). The result has no VAE
    encoder, so a later export leaves ``vae_encoder`` out (it cannot edit)."""

    kind: Literal["decoder"]
    name: str | None = _stage_name()


class QuantizeStage(_Section):
    """Quantize the current model, as ``sdwb compress quantize`` does: the keys of
    ``configs/quantize/*.yaml`` (``method`` picks the schema; same checks). ort-* methods take an
    export (a preceding ``export`` stage) or a torch model (exported on the fly)."""

    model_config = ConfigDict(extra="allow", strict=True)

    kind: Literal["quantize"]
    name: str | None = _stage_name()

    def quant_config(self):
        """The method's typed config (:mod:`sdwb.quant.config`)."""
        from sdwb.quant.config import parse_quant_config

        return parse_quant_config(dict(self.model_extra or {}), "quantize")

    @model_validator(mode="after")
    def _check_method(self) -> QuantizeStage:
        try:
            self.quant_config()
        except SdwbError as e:
            raise ValueError(str(e).removeprefix("quantize: ")) from None
        return self

    @model_serializer(mode="wrap")
    def _resolved(self, handler):
        from sdwb.quant.config import resolved

        head = {"kind": self.kind, **({"name": self.name} if self.name is not None else {})}
        return {**head, **resolved(self.quant_config())}


class CacheStage(_Section):
    """Apply a training-free acceleration to the current model, as ``sdwb compress cache`` does: the
    keys of ``configs/cache/*.yaml`` (``method`` picks the schema; same checks). Torch models only."""

    model_config = ConfigDict(extra="allow", strict=True)

    kind: Literal["cache"]
    name: str | None = _stage_name()

    def cache_config(self):
        """The method's typed config (:mod:`sdwb.cache.config`)."""
        from sdwb.cache.config import parse_cache_config

        return parse_cache_config(dict(self.model_extra or {}), "cache")

    @model_validator(mode="after")
    def _check_method(self) -> CacheStage:
        try:
            self.cache_config()
        except SdwbError as e:
            raise ValueError(str(e).removeprefix("cache: ")) from None
        return self

    @model_serializer(mode="wrap")
    def _resolved(self, handler):
        from sdwb.cache.config import resolved

        head = {"kind": self.kind, **({"name": self.name} if self.name is not None else {})}
        return {**head, **resolved(self.cache_config())}


class LoraStage(_Section):
    """Fuse a LoRA adapter into the current model, as ``sdwb lora fuse`` does: the later stages
    (quantize, export, distill, bench) then work on float weights that hold it (the fused route).
    The adapter's sha256 is part of the stage's resolved config, so a changed adapter is a new stage."""

    kind: Literal["lora"]
    name: str | None = _stage_name()
    lora: str = Field(min_length=1, description="builtin:NAME, a LoRA directory or .safetensors file")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="LoRA strength (1.0: as trained)")

    @model_serializer(mode="wrap")
    def _with_hash(self, handler):
        from sdwb.hash_cache import sha256_cached
        from sdwb.lora import resolve_adapter

        data = handler(self)
        try:
            data["sha256"] = sha256_cached(resolve_adapter(self.lora))
        except SdwbError:
            data["sha256"] = None  # missing: the stage itself fails with the loader's one-line error
        return data


class ExportStage(_Section):
    """Export the current model to ONNX and validate it against PyTorch, as ``sdwb export onnx``."""

    kind: Literal["export"]
    name: str | None = _stage_name()
    format: Literal["onnx"] = Field("onnx", description="TensorRT engines need a GPU: sdwb export tensorrt")
    opset: int = Field(18, ge=17, le=21)
    components: list[Literal["text_encoder", "unet", "vae_decoder", "vae_encoder"]] = Field(
        default_factory=lambda: ["text_encoder", "unet", "vae_decoder"], min_length=1)
    slim: bool = Field(False, description="ONNX Runtime offline optimisation (basic level)")
    max_batch: int = Field(8, ge=1, le=256, description="most images per call in the dynamic ranges")
    exporter: Literal["auto", "torchscript", "dynamo"] = "auto"


class BenchStage(BenchConfig):
    """Benchmark side by side, as ``sdwb bench`` does: the keys of ``configs/bench/*.yaml``. A
    variant's ``model`` may be ``@input`` (the current model: the latest prune / distill /
    quantize / export artifact) or ``@NAME`` (the artifact of the stage called NAME)."""

    kind: Literal["bench"]

    @model_serializer(mode="wrap")
    def _variants_as_written(self, handler):
        from bench.scenario import variants_as_written

        data = handler(self)
        data["variants"] = variants_as_written(self)
        return data


class ReportStage(_Section):
    """Render ``report.md`` / ``report.html`` from the preceding bench stage's results (and any
    ``extra`` results.json files), as ``sdwb report`` does."""

    kind: Literal["report"]
    name: str | None = _stage_name()
    extra: list[str] = Field(default_factory=list, description="more results.json files to render beside")
    images: int = Field(8, ge=0, le=64, description="images per variant in each grid")


# Every stage type, one model each, told apart by ``kind``.
STAGE_TYPES: tuple[type[BaseModel], ...] = (GenerateStage, PruneStage, DistillStage, DecoderStage,
                                            QuantizeStage, CacheStage, LoraStage, ExportStage, BenchStage,
                                            ReportStage)
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]

# Stages whose output is a model the next stages take as their input.
MODEL_STAGES = ("prune", "distill", "decoder", "quantize", "cache", "lora", "export")


def stage_name(stage: BaseModel) -> str:
    """The name bench variants use for a stage's artifact (``@NAME``)."""
    return getattr(stage, "name", None) or stage.kind


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Recipe(_Section):
    """A whole recipe: which model, how to generate and bench, and the stages to run."""

    name: str = Field("recipe", pattern=_NAME_PATTERN, max_length=64)
    model: str = Field("builtin:tiny-shapes", min_length=1)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    stages: list[Stage] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Recipe:
        names = [stage_name(st) for st in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stages: more than one stage is called {', '.join(dupes)} "
                             "(give each a distinct 'name')")
        return self


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
    data = read_yaml(path)
    if "name" not in data and re.match(_NAME_PATTERN, path.stem):
        data["name"] = path.stem
    data = expand_includes(data, path)
    return recipe_from_dict(data, str(path), overrides)


def expand_includes(data: dict, recipe_file: Path) -> dict:
    """Replace each stage's ``include: FILE`` with that file's keys, the stage's own keys winning.

    Why: a stage takes exactly the keys of ``configs/prune/*.yaml`` (etc.), so a recipe names the
    file instead of copying it. FILE is relative to the working directory, else to the recipe's
    folder (else the repository). Only YAML mappings under the recipe's folder or ``configs/`` are
    read (:func:`sdwb.yaml_io.resolve_include`). What the hash and ``config check`` see is the
    merged result, never the file name.
    """
    stages = data.get("stages")
    if not isinstance(stages, list):
        return data
    out = []
    for i, stage in enumerate(stages):
        if isinstance(stage, dict) and "include" in stage:
            name = stage["include"]
            if not isinstance(name, str) or not name:
                raise SdwbError(f"{recipe_file}: stages.{i}.include: expected a file path, got {_kind(name)}")
            found = resolve_include(name, recipe_file, f"{recipe_file}: stages.{i}.include")
            merged = read_yaml(found)
            merged.update({k: v for k, v in stage.items() if k != "include"})
            stage = merged
        out.append(stage)
    return {**data, "stages": out}


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


_STAGE_KINDS = tuple(t.model_fields["kind"].annotation.__args__[0] for t in STAGE_TYPES)


def _label(loc: tuple) -> str:
    # a discriminated union inserts the tag after the list index (stages.0.generate.x): hide it
    return ".".join(str(p) for i, p in enumerate(loc)
                    if not (i >= 2 and loc[i - 2] == "stages" and isinstance(loc[i - 1], int)))


def _got(err: dict) -> str:
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else err["type"]
    return f"{msg}, got {short(err['input'])} ({_kind(err['input'])})"


_STAGE_KIND_ERRORS = {
    "union_tag_invalid": lambda err: f"unknown stage kind {err['ctx']['tag']!r} (expected one of: "
                                     f"{', '.join(_STAGE_KINDS)})",
    "union_tag_not_found": lambda err: f"stage has no 'kind' (expected one of: {', '.join(_STAGE_KINDS)})",
}


def _format_validation_error(e: ValidationError, source: str, set_keys: list[list[str]]) -> str:
    return f"{source}: " + format_errors(e, allowed=_allowed_keys, label=_label, kinds=_STAGE_KIND_ERRORS,
                                         got=_got, set_keys=set_keys, empty_key="(top level)")
