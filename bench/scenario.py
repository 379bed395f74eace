"""Benchmark scenarios as data: a YAML ``BenchConfig`` expanded into one ``Scenario`` per row.

Why data and not code: a benchmark must be re-runnable from one file, diffable, and checked
before anything is loaded. A config has ``defaults`` (every setting below), a list of
``variants`` (a name, a model spec, and any setting overridden for that variant) and an
optional ``sweep`` (setting -> list of values) crossed with every variant, so
``sweep: {steps: [50, 25]}`` turns variant ``fp32`` into rows ``fp32-steps50`` and ``fp32-steps25``.
Precedence: defaults < sweep value < variant override (a variant may not override a swept key).
A setting the ``defaults:`` section (or a command-line flag) leaves unset takes the model's own
inference default first, if it has one (a distilled variant's steps / scheduler / guidance in
its ``sdwb.json``, :mod:`sdwb.inference`).

Every model forbids unknown keys and is strictly typed; every problem is one ``SdwbError`` line
naming the file, the key path (``variants.1.dtype``) and what was expected.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from sdwb.backends.registry import BACKENDS, Backend
from sdwb.errors import SdwbError
from sdwb.schema_errors import format_errors, lower, short
from sdwb.torch_compile import CompileMode
from sdwb.yaml_io import DType, Scheduler, apply_overrides, parse_override
from sdwb.yaml_io import read_yaml as _read_yaml

Metric = Literal["latency", "memory", "quality", "edit"]
# the default metrics; "edit" (builtin:shapes-edit img2img / inpainting, scored by the judge) is asked for
METRICS: tuple[str, ...] = ("latency", "memory", "quality")
SHAPES_EVAL = "builtin:shapes-eval"
SUPPORTED_BACKENDS = BACKENDS  # the backends table (sdwb.backends.registry)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_STRICT = ConfigDict(extra="forbid", strict=True)


class Settings(BaseModel):
    """Every per-row setting, with its default (the ``defaults:`` section of a bench config)."""

    model_config = _STRICT

    backend: Backend = Field("torch", description=" | ".join(BACKENDS) + " (see bench.harness)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="auto: cuda when available")
    dtype: DType = "fp32"
    compile: bool = Field(False, description="torch only: torch.compile the UNet (inductor, static shapes); "
                          "compiled and warmed at load time, the compile reported as compile_s")
    compile_mode: CompileMode = Field("default", description="torch.compile mode (with compile: true)")
    threads: Optional[int] = Field(None, ge=1, description="intra-op threads (torch, and ONNX Runtime "
                                   "sessions); None: torch's default, used for both")
    batch: int = Field(1, ge=1, le=256, description="prompts per pipeline call (one timed run)")
    height: Optional[int] = Field(None, ge=8, multiple_of=8, description="pixels; None: the model's")
    width: Optional[int] = Field(None, ge=8, multiple_of=8, description="pixels; None: the model's")
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0, description="classifier-free guidance; <= 1 disables it")
    scheduler: Scheduler = "ddim"
    prompts: str = Field(SHAPES_EVAL, min_length=1, description="builtin:shapes-eval or a text file")
    n_prompts: int = Field(8, ge=1, description="first N prompts (quality images)")
    seed: int = Field(0, ge=0, description="image i is seeded with seed + i")
    warmup: int = Field(1, ge=0, description="untimed runs per variant before the timed ones")
    repeats: int = Field(5, ge=1, description="timed runs per variant (interleaved across variants)")
    metrics: list[Metric] = Field(default_factory=lambda: list(METRICS), min_length=1)
    judge: str = Field("builtin:shapes-judge", min_length=1, description="CLIP judge for quality")
    n_edits: int = Field(8, ge=1, description="metric edit: the first N cases of builtin:shapes-edit")
    edit_strength: float = Field(0.6, ge=0.0, le=1.0, description="metric edit: the edits' strength")
    lora: Optional[str] = Field(None, min_length=1,
                                description="torch backend: a LoRA adapter loaded unfused (builtin:NAME, a "
                                "dir or .safetensors; projected onto a pruned model)")
    lora_scale: float = Field(1.0, ge=0.0, le=4.0, description="with lora: its strength (1.0: as trained)")
    unet_slowdown: float = Field(0.0, ge=0.0, le=10.0, description="gate self-test: after every timed UNet "
                                 "call, busy-wait this fraction of its time (0.15 = a 15% slower UNet)")


def _optional(field: FieldInfo) -> tuple[Any, FieldInfo]:
    return Optional[field.annotation], FieldInfo.merge_field_infos(field, default=None, default_factory=None)


# A variant: name + model + any Settings key as an override (same constraints, default "not set").
Variant = create_model(
    "Variant",
    __config__=_STRICT,
    __doc__="One model under test: a unique name, a model spec and per-variant setting overrides.",
    name=(str, Field(pattern=_NAME, max_length=64)),
    model=(str, Field(min_length=1, description="builtin:NAME, a diffusers directory or a cached hub id")),
    **{key: _optional(field) for key, field in Settings.model_fields.items()},
)


class Scenario(Settings):
    """One fully resolved row of the benchmark: which model, under which settings."""

    variant: str  # unique row label (variant name + sweep suffix)
    base_variant: str  # the variant entry it came from
    scenario: str  # config name, or the sweep suffix (e.g. "steps25")
    model: str
    baseline: str  # row label whose images PSNR/SSIM compare against

    @property
    def source_model(self) -> str:
        """The spec the row's weights come from: ``model``, or for an export / engine directory
        the spec its manifest records (``builtin:sd15-arch`` exported is still sd15-arch)."""
        import json

        manifest = Path(self.model).expanduser() / "manifest.json"
        if self.model.startswith("builtin:") or not manifest.is_file():
            return self.model
        try:
            source = json.loads(manifest.read_text()).get("source") or {}
        except (OSError, ValueError, AttributeError):
            return self.model
        source = source.get("model", source)  # engines record the ONNX export's source under "model"
        return source.get("spec") or self.model

    @property
    def quality_applies(self) -> bool:
        """False for builtin models whose weights make quality meaningless (sd15-arch)."""
        model = self.source_model
        if not model.startswith("builtin:"):
            return True
        from sdwb.zoo import get_builtin

        return get_builtin(model).quality_metrics


class BenchConfig(BaseModel):
    """A whole benchmark: defaults, the variants, an optional sweep, the baseline variant."""

    model_config = _STRICT

    name: str = Field("bench", pattern=_NAME, max_length=64)
    defaults: Settings = Field(default_factory=Settings)
    variants: list[Variant] = Field(min_length=1)  # type: ignore[valid-type]
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="setting -> values")
    baseline: Optional[str] = Field(None, description="variant for PSNR/SSIM; default: the first")

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variants: duplicate name(s) {', '.join(dupes)}")
        for key, values in self.sweep.items():
            if key not in Settings.model_fields:
                allowed = ", ".join(Settings.model_fields)
                raise ValueError(f"sweep.{key}: unknown setting (allowed: {allowed})")
            if not values:
                raise ValueError(f"sweep.{key}: expected a non-empty list of values")
            for i, v in enumerate(self.variants):
                if key in v.model_fields_set:
                    raise ValueError(f"variants.{i}.{key}: also swept in sweep.{key}; set one or the other")
        for s in self.scenarios():  # every combination must validate
            _check_compile(s)
        return self

    def scenarios(self) -> list[Scenario]:
        """Expand variants x sweep into resolved scenarios, in declaration order."""
        from sdwb.inference import for_spec

        base = self.defaults.model_dump()
        explicit = self.defaults.model_fields_set
        keys = list(self.sweep)
        combos = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        rows: list[tuple[str, str, dict]] = []
        for v in self.variants:
            overrides = v.model_dump(include=set(v.model_fields_set) - {"name", "model"})
            own = {k: x for k, x in for_spec(v.model).items() if k not in explicit}
            for combo in combos:
                suffix = "-".join(f"{k}{_label(x)}" for k, x in zip(keys, combo))
                settings = {**base, **own, **dict(zip(keys, combo)), **overrides}
                try:
                    Settings.model_validate(settings)
                except ValidationError as e:
                    err = e.errors(include_url=False)[0]
                    key = ".".join(map(str, err["loc"]))
                    where = f"sweep.{key}" if key in keys else f"variants.{v.name}.{key}"
                    raise ValueError(f"{where}: {lower(err['msg'])}, got {short(err['input'])}") from None
                label = f"{v.name}-{suffix}" if suffix else v.name
                rows.append((label, v.name, {**settings, "model": v.model, "scenario": suffix or self.name}))
        labels = [r[0] for r in rows]
        baseline = self._baseline_label(rows)
        if len(set(labels)) != len(labels):
            raise ValueError(f"variants: expanded names collide: {', '.join(labels)}")
        return [Scenario(variant=label, base_variant=bv, baseline=baseline, **s) for label, bv, s in rows]

    def _baseline_label(self, rows: list[tuple[str, str, dict]]) -> str:
        if self.baseline is None:
            return rows[0][0]
        for label, base_variant, _ in rows:
            if self.baseline in (label, base_variant):
                return label
        raise ValueError(f"baseline: {self.baseline!r} is not a variant (expected one of "
                         f"{', '.join(r[0] for r in rows)})")


def _check_compile(s: Scenario) -> None:
    """``compile: true`` is a torch option: refused on a row of any other backend."""
    if s.compile and s.backend != "torch":
        row = f" (row {s.variant})" if s.variant != s.base_variant else ""
        raise ValueError(f"variants.{s.base_variant}{row}: compile: true with backend {s.backend}: "
                         "torch.compile is a torch backend option (set backend: torch or compile: false)")


def _label(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


# --------------------------------------------------------------------------- loading


def bench_config_from_dict(data: dict, source: str = "bench config", overrides: list[str] | None = None,
                           settings: dict[str, Any] | None = None) -> BenchConfig:
    """Validate ``data`` (+ ``a.b=value`` overrides, then ``settings`` into ``defaults``: command-line
    flags, None values ignored) as a BenchConfig; errors name the source and the key."""
    merged = apply_overrides(data, overrides)
    flags = {k: v for k, v in (settings or {}).items() if v is not None}
    if flags:
        if not isinstance(merged.get("defaults", {}), dict):
            raise SdwbError(f"{source}: defaults: expected a mapping of settings")
        merged["defaults"] = {**merged.get("defaults", {}), **flags}
    try:
        return BenchConfig.model_validate(merged)
    except ValidationError as e:
        set_keys = [parse_override(o)[0] for o in overrides or []]
        raise SdwbError(_format(e, source, merged, set_keys)) from None


def load_bench_config(path: str | Path, overrides: list[str] | None = None,
                      settings: dict[str, Any] | None = None) -> BenchConfig:
    """Read, override and validate a bench config YAML (``name`` defaults to the file stem).

    ``settings`` (command-line flags) go into ``defaults`` last: they win over the file and
    ``--set`` there, while a variant's own setting still wins over every default.
    """
    path = Path(path)
    data = _read_yaml(path)
    if "name" not in data and re.match(_NAME, path.stem):
        data["name"] = path.stem
    return bench_config_from_dict(data, str(path), overrides, settings)


def variant_label(model: str) -> str:
    """A variant name derived from a model spec: ``builtin:tiny-shapes`` -> ``tiny-shapes``."""
    text = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model.rstrip("/")).name
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
    return text[:64]


def quick_config(models: list[str], *, name: str = "quick", overrides: list[str] | None = None,
                 **settings: Any) -> BenchConfig:
    """A config for the quick CLI form: one variant per model, ``settings`` as defaults.

    ``settings`` takes any :class:`Settings` key (None values are ignored), e.g.
    ``quick_config(["builtin:tiny-shapes"], steps=4, repeats=3)``.
    """
    if not models:
        raise SdwbError("no model to bench: give a config file or at least one --model")
    labels: list[str] = []
    for m in models:
        label, n = variant_label(m), 2
        while label in labels:
            label, n = f"{variant_label(m)}-{n}", n + 1
        labels.append(label)
    data = {"name": name, "variants": [{"name": label, "model": m} for label, m in zip(labels, models)]}
    return bench_config_from_dict(data, "command line", overrides, settings)


def resolved_dict(config: BenchConfig) -> dict:
    """The config with defaults filled in, plus its expanded scenarios, as plain data."""
    out = config.model_dump(mode="json", exclude_unset=False)
    out["variants"] = variants_as_written(config)
    return out


def variants_as_written(config: BenchConfig) -> list[dict]:
    """Each variant as plain data with only the keys it sets (so the dump validates again and a
    variant's unset keys keep falling back to the defaults and the model's own settings)."""
    return [v.model_dump(mode="json", include=set(v.model_fields_set) | {"name", "model"})
            for v in config.variants]


# --------------------------------------------------------------------------- prompts


def load_prompts(scenario: Settings) -> tuple[list[str], list[dict] | None]:
    """The first ``n_prompts`` prompts and, when every one is a shapes caption, their attributes.

    ``builtin:shapes-eval`` is the held-out evaluation set; anything else is a UTF-8 text file,
    one prompt per line (blank lines and lines starting with ``#`` skipped). A file with fewer
    lines than ``n_prompts`` gives all its lines.
    """
    from sdwb import shapes

    if scenario.prompts == SHAPES_EVAL:
        samples = shapes.eval_samples(max(scenario.n_prompts, 1))
        return [s.caption for s in samples], [s.attributes for s in samples]
    path = Path(scenario.prompts).expanduser()
    if scenario.prompts.startswith("builtin:"):
        raise SdwbError(f"prompts: unknown prompt set {scenario.prompts!r} (expected {SHAPES_EVAL} "
                        "or a text file, one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SdwbError(f"prompts: file not found: {path.resolve()} (expected a text file, one prompt "
                        f"per line, or {SHAPES_EVAL})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SdwbError(f"prompts: cannot read {path}: {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise SdwbError(f"prompts: {path} holds no prompt (expected one prompt per line)")
    prompts = prompts[: scenario.n_prompts]
    try:
        attributes = [shapes.parse_caption(p) for p in prompts]
    except ValueError:
        attributes = None
    return prompts, attributes


# --------------------------------------------------------------------------- error messages

_SECTION_MODELS = {"defaults": Settings, "variants": Variant, "sweep": None}


def _variant_name(data: dict, index: int) -> str | None:
    try:
        name = data["variants"][index]["name"]
        return name if isinstance(name, str) else None
    except (KeyError, IndexError, TypeError):
        return None


def _format(e: ValidationError, source: str, data: dict, set_keys: list[list[str]]) -> str:
    def label(loc: tuple) -> str:
        if loc[:1] == ("variants",) and len(loc) > 1 and isinstance(loc[1], int):
            name = _variant_name(data, loc[1])
            loc = ("variants", f"{loc[1]}" + (f"({name})" if name else ""), *loc[2:])
        return ".".join(map(str, loc))

    def allowed(loc: tuple) -> list[str] | None:
        model = _SECTION_MODELS.get(loc[0], BenchConfig) if len(loc) > 1 else BenchConfig
        return list(model.model_fields) if model else None

    return f"{source}: " + format_errors(
        e, allowed=allowed, label=label, set_keys=set_keys, value_error_key=False,
        got=lambda err: f"{lower(err['msg'])}, got {short(err['input'])}",
    )
