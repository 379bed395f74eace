"""``sdwb run RECIPE``: execute a recipe's stages in order, each artifact addressed by a hash.

What: a recipe (``configs/recipes/*.yaml``, :mod:`sdwb.app.recipe_schema`) lists stages -- prune, distill,
quantize, decoder, cache, lora, export, generate, bench, report. Each model stage (prune / distill /
decoder / quantize / cache / lora / export) takes the current model and produces the next one;
generate / bench / report read models and write results.

Why hashes: a stage's key is the sha256 of its kind, its resolved config and the keys of what it
reads (the recipe model's content fingerprint, or the key of the stage before). Its artifact
lives in ``<store>/<kind>-<key>/`` (default store ``runs/stages``), so

- a re-run skips every finished stage (``stage.json`` is written last, atomically),
- a killed run resumes: prune and distill continue from the checkpoints in ``<dir>/work``; the
  compress and export verbs build their output atomically, so ``<dir>/out`` is either whole or
  absent,
- two recipes that share a prefix share its artifacts (``fastest`` reuses ``prune30``'s pruned
  UNet), and a changed setting re-runs that stage and everything after it, nothing before.

The store is locked per stage (:mod:`sdwb.store_lock`): two runs on one store never run the same
stage at once; the second waits, then reuses the first's artifact (it re-checks under the lock),
and ``*.tmp-*`` directories left in a stage's directory by a killed run are removed then.

The run itself is recorded in ``runs/<recipe>-<hash8>/run.json`` (the resolved recipe, and per
stage its key, directory, status and seconds), written atomically when the run ends without an
error; while it runs, and when it fails, the record is ``run.partial.json`` beside it, so a
failed run never replaces the record of a good one. ``model`` and ``report`` beside it link to
the final model and report once they exist.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdwb.app.recipe_schema import MODEL_STAGES, Recipe, config_hash, load_recipe, resolved_dict, stage_name
from sdwb.errors import SdwbError
from sdwb.store_lock import remove_stale_tmp, stage_lock

DEFAULT_STORE = Path("runs/stages")
RECIPES_DIR = Path("configs/recipes")
STAGE_FILE = "stage.json"
RUN_FILE, RUN_PARTIAL = "run.json", "run.partial.json"
RECIPE_PREFIX = "recipe:"
_DONE_MARKERS = {
    "prune": "sdwb.json",
    "distill": "sdwb.json",
    "decoder": "sdwb.json",
    "quantize": "sdwb.json",
    "cache": "sdwb.json",
    "lora": "sdwb.json",
    "export": "manifest.json",
    "bench": "results.json",
    "report": "report.html",
    "generate": "grid.png",
}


@dataclass
class PlannedStage:
    """One stage of a planned run: what it is, its key, where its artifact lives, what it reads."""

    index: int
    stage: Any
    key: str
    dir: Path
    input: str | None  # model spec / path the stage reads (model and generate stages)
    refs: dict[str, str] = field(default_factory=dict)  # @NAME -> artifact path (bench)
    bench_results: Path | None = None  # report: the bench results it renders

    @property
    def kind(self) -> str:
        return self.stage.kind

    @property
    def name(self) -> str:
        return stage_name(self.stage)

    @property
    def out(self) -> Path:
        """The artifact: a model directory, an export, a bench output (named after the bench, which
        labels its rows in reports), a report."""
        return self.dir / (self.stage.name if self.kind == "bench" else "out")

    @property
    def done(self) -> bool:
        return (self.dir / STAGE_FILE).is_file() and self.out.exists()


def _digest(payload: Any, length: int = 12) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _stage_config(stage) -> dict:
    """The stage's resolved config without ``name`` (renaming a stage must not re-run it)."""
    data = stage.model_dump(mode="json")
    if stage.kind != "bench":  # a bench stage's name is also its results' name
        data.pop("name", None)
    return data


def model_fingerprint(spec: str) -> str:
    """Content identity of the recipe's starting model (what its first stage reads)."""
    from sdwb.variants.manifest import source_fingerprint

    return source_fingerprint(spec)


def plan(recipe: Recipe, store: str | Path = DEFAULT_STORE) -> list[PlannedStage]:
    """Keys, directories and inputs of every stage, in order; nothing runs, nothing is written."""
    store = Path(store)
    current_spec, current_key = recipe.model, "model:" + model_fingerprint(recipe.model)
    artifacts: dict[str, tuple[str, str]] = {}  # stage name -> (artifact path, key)
    last_bench: PlannedStage | None = None
    planned: list[PlannedStage] = []
    for i, stage in enumerate(recipe.stages):
        payload: dict[str, Any] = {"kind": stage.kind, "config": _stage_config(stage)}
        refs: dict[str, str] = {}
        if stage.kind in MODEL_STAGES or stage.kind == "generate":
            payload["input"] = current_key
        if stage.kind == "generate":
            payload["generate"] = recipe.generate.model_dump(mode="json")
        if stage.kind == "bench":
            ref_keys = {}
            for v in stage.variants:
                if v.model.startswith("@"):
                    ref = v.model[1:]
                    if ref == "input":
                        refs[v.model], ref_keys[v.model] = current_spec, current_key
                    elif ref in artifacts:
                        refs[v.model], ref_keys[v.model] = artifacts[ref]
                    else:
                        known = ", ".join(["@input", *(f"@{n}" for n in artifacts)])
                        raise SdwbError(
                            f"stages.{i} ({stage.kind}): variant {v.name}: {v.model} names no "
                            f"earlier model stage (known here: {known})"
                        )
                elif not v.model.startswith(RECIPE_PREFIX):
                    try:  # new weights behind the same name must not reuse old results
                        ref_keys[v.model] = "model:" + model_fingerprint(v.model)
                    except SdwbError:
                        pass  # not resolvable now: the bench stage reports it when it runs
            payload["refs"] = ref_keys
            own = stage.defaults.model_fields_set
            payload["recipe_bench"] = {k: v for k, v in recipe_bench_defaults(recipe).items() if k not in own}
        if stage.kind == "report":
            if last_bench is None:
                raise SdwbError(f"stages.{i} (report): no bench stage before it to render")
            payload["bench"] = last_bench.key
        key = _digest(payload)
        p = PlannedStage(i, stage, key, store / f"{stage.kind}-{key}", current_spec, refs)
        if stage.kind == "report":
            p.bench_results = last_bench.out / "results.json"
        if stage.kind == "bench":
            last_bench = p
        if stage.kind in MODEL_STAGES:
            current_spec, current_key = str(p.out), "stage:" + key
            artifacts[stage_name(stage)] = (current_spec, current_key)
        planned.append(p)
    return planned


def recipe_bench_defaults(recipe: Recipe) -> dict:
    """The keys the recipe's ``bench:`` section sets, as bench-config ``defaults:`` keys."""
    rename = {"prompts": "n_prompts"}
    section = recipe.bench
    return {rename.get(k, k): getattr(section, k) for k in sorted(section.model_fields_set)}


def recipe_path(name_or_path: str) -> Path:
    """``fastest`` -> ``configs/recipes/fastest.yaml``; a path to a YAML file is taken as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return RECIPES_DIR / f"{name_or_path}.yaml"


def final_model(recipe_spec: str, store: str | Path = DEFAULT_STORE) -> str:
    """``recipe:NAME`` -> the artifact of that recipe's last model stage; ``recipe:NAME@STAGE`` ->
    the artifact of its stage called STAGE (it must have run)."""
    name, _, wanted = recipe_spec.removeprefix(RECIPE_PREFIX).partition("@")
    path = recipe_path(name)
    recipe = load_recipe(path)
    stages = [p for p in plan(recipe, store) if p.kind in MODEL_STAGES]
    if wanted:
        chosen = [p for p in stages if p.name == wanted]
        if not chosen:
            known = ", ".join(p.name for p in stages) or "none"
            raise SdwbError(f"{recipe_spec}: the recipe has no model stage called {wanted} "
                            f"(model stages: {known})")
        stages = stages[: stages.index(chosen[0]) + 1]
    if not stages:
        return recipe.model
    last = stages[-1]
    if not last.done:
        raise SdwbError(
            f"{recipe_spec}: the recipe has not been run to its {last.name} stage yet (sdwb run {path})"
        )
    return str(last.out)


def resolve_recipe_models(config, store: str | Path = DEFAULT_STORE):
    """A bench config whose ``recipe:NAME[@STAGE]`` model specs name the artifacts they stand for
    (the application layer resolves them: the benchmark knows models, not recipes)."""
    variants = []
    for v in config.variants:
        if v.model.startswith(RECIPE_PREFIX):
            try:
                v = v.model_copy(update={"model": final_model(v.model, store)})
            except SdwbError as e:
                raise SdwbError(f"variant {v.name}: {e}") from None
        variants.append(v)
    return config.model_copy(update={"variants": variants})


@dataclass
class RunResult:
    """What ``run_recipe`` did: the run directory and every stage with its status."""

    run_dir: Path
    stages: list[PlannedStage]
    status: dict[int, str]
    seconds: dict[int, float]

    def report(self) -> Path | None:
        """The last report stage's ``report.html``, if the recipe has one and it has been made."""
        reports = [p for p in self.stages if p.kind == "report"]
        return reports[-1].out / "report.html" if reports and reports[-1].done else None


def run_recipe(
    recipe: Recipe,
    *,
    store: str | Path = DEFAULT_STORE,
    run_root: str | Path = "runs",
    out: str | Path | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    command: str | None = None,
    until: str | None = None,
) -> RunResult:
    """Run every stage of ``recipe`` not already finished; see the module docstring.

    ``until``: stop after the stage of that name (or 1-based number); the later ones stay
    pending, so e.g. the training stages can run now and the benchmark on a quiet machine later.
    """
    from sdwb.runs import atomic_write_json, check_writable_dir, run_dir, write_resolved_config

    say = say or (lambda _m: None)
    check_writable_dir(store, f"--store {store}")  # before any stage runs: a file there is one line
    if out is not None:
        check_writable_dir(out, f"--out {out}")
    stages = plan(recipe, store)
    if until is not None:
        last = next((p.index for p in stages if until in (p.name, str(p.index + 1))), None)
        if last is None:
            names = ", ".join(p.name for p in stages)
            raise SdwbError(f"--until {until}: no such stage (stages: {names}, or a number 1-{len(stages)})")
        stages_to_run = {p.index for p in stages if p.index <= last}
    else:
        stages_to_run = {p.index for p in stages}
    out = Path(out) if out is not None else run_dir(recipe.name, config_hash(recipe), root=run_root)
    check_writable_dir(out, f"run record {out}")
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, resolved_dict(recipe))
    status = {p.index: "cached" if p.done else "pending" for p in stages}
    seconds: dict[int, float] = {}

    def record(final: bool = False) -> None:
        """``run.partial.json`` while running or after a failure; ``run.json`` only at a good end."""
        atomic_write_json(
            out / (RUN_FILE if final else RUN_PARTIAL),
            {
                "recipe": resolved_dict(recipe),
                "command": command,
                "store": str(store),
                "stages": [
                    {
                        "index": p.index,
                        "kind": p.kind,
                        "name": p.name,
                        "key": p.key,
                        "dir": str(p.dir),
                        "artifact": str(p.out),
                        "status": status[p.index],
                        "seconds": seconds.get(p.index),
                    }
                    for p in stages
                ],
            },
        )

    record()
    for p in stages:
        label = f"[{p.index + 1}/{len(stages)}] {p.kind} ({p.name})"
        if p.done:
            say(f"{label}: finished earlier, reusing {p.out}")
            continue
        if p.index not in stages_to_run:
            say(f"{label}: left for later (--until {until})")
            continue
        with stage_lock(p.dir, say=lambda m, label=label: say(f"{label}: {m}")):
            if p.done:  # another run finished it while this one waited for the lock
                say(f"{label}: finished by another run meanwhile, reusing {p.out}")
                status[p.index] = "cached"
                record()
                continue
            for stale in remove_stale_tmp(p.out, unlocked_age=0):  # the lock is ours: all are dead
                say(f"{label}: removed {stale}, left by a killed run")
            say(f"{label}: running into {p.out}")
            status[p.index] = "running"
            record()
            started = time.perf_counter()
            try:
                _execute(p, recipe, progress=progress, say=say, command=command)
            except BaseException:
                status[p.index] = "failed"
                record()
                raise
            seconds[p.index] = round(time.perf_counter() - started, 1)
            atomic_write_json(
                p.dir / STAGE_FILE,
                {
                    "kind": p.kind,
                    "name": p.name,
                    "key": p.key,
                    "config": _stage_config(p.stage),
                    "input": p.input,
                    "refs": p.refs,
                    "recipe": recipe.name,
                    "seconds": seconds[p.index],
                },
            )
        status[p.index] = "ran"
        record()
        say(f"{label}: done in {seconds[p.index]:.0f} s")
    _link_outputs(out, stages)
    record(final=True)
    (out / RUN_PARTIAL).unlink(missing_ok=True)
    return RunResult(out, stages, status, seconds)


def _link_outputs(out: Path, stages: list[PlannedStage]) -> None:
    """``out/model`` and ``out/report``: symlinks to the final model and report, when finished."""
    import os

    finals = {"model": [p for p in stages if p.kind in MODEL_STAGES],
              "report": [p for p in stages if p.kind == "report"]}
    for name, chosen in finals.items():
        link = out / name
        if not chosen or not chosen[-1].done:
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            continue  # a real directory of the user's: leave it
        os.symlink(os.path.relpath(chosen[-1].out.resolve(), out.resolve()), link)


# --------------------------------------------------------------------------- executors


def _execute(p: PlannedStage, recipe: Recipe, *, progress: bool, say, command: str | None) -> None:
    p.dir.mkdir(parents=True, exist_ok=True)
    if p.out.exists() and not (p.out / _DONE_MARKERS[p.kind]).exists():
        shutil.rmtree(p.out)  # a bench / report / generate killed half-way: start it over
    if p.out.exists():
        return  # the verb finished (its output is atomic) but the run died before stage.json
    EXECUTORS[p.kind](p, recipe, progress=progress, say=say, command=command)


def _plain(stage, cls):
    """The stage as its technique's own config (without ``kind`` / ``name``)."""
    return cls.model_validate(stage.model_dump(exclude={"kind", "name"}))


def _run_prune(p, recipe, *, progress, say, command) -> None:
    from compress.prune import prune
    from compress.prune_config import PruneConfig

    prune(p.input, _plain(p.stage, PruneConfig), p.out, work_dir=p.dir / "work", progress=progress, say=say)


def _run_distill(p, recipe, *, progress, say, command) -> None:
    from compress.distill import distill
    from compress.distill_config import DistillConfig

    distill(
        p.input, _plain(p.stage, DistillConfig), p.out, work_dir=p.dir / "work", progress=progress, say=say
    )


def _run_decoder(p, recipe, *, progress, say, command) -> None:
    from compress.tiny_decoder import DecoderConfig, distill_decoder

    distill_decoder(p.input, _plain(p.stage, DecoderConfig), p.out, work_dir=p.dir / "work",
                    progress=progress, say=say)


def _run_quantize(p, recipe, *, progress, say, command) -> None:
    from compress.quantize import quantize
    from export.onnx import export_onnx

    quantize(p.input, p.stage.quant_config(), p.out, progress=say, exporter=export_onnx)


def _run_cache(p, recipe, *, progress, say, command) -> None:
    from compress.cache import make_cache_variant

    make_cache_variant(p.input, p.stage.cache_config(), p.out, say=say)


def _run_lora(p, recipe, *, progress, say, command) -> None:
    from compress.lora_fuse import fuse_variant

    fuse_variant(p.input, p.stage.lora, p.out, scale=p.stage.scale, say=say)


def _run_export(p, recipe, *, progress, say, command) -> None:
    from export.onnx import export_onnx

    s = p.stage
    export_onnx(
        p.input,
        p.out,
        opset=s.opset,
        components=s.components,
        slim=s.slim,
        max_batch=s.max_batch,
        exporter=s.exporter,
        progress=say,
    )


def _run_generate(p, recipe, *, progress, say, command) -> None:
    from sdwb import shapes
    from sdwb.generate import captioned_grid, generate
    from sdwb.loading import load_pipeline
    from sdwb.runs import atomic_dir, atomic_save_image

    g = recipe.generate
    if g.dtype != "fp32":
        raise SdwbError(f"stages.{p.index} (generate): dtype {g.dtype}: recipe generation runs in fp32")
    prompts = shapes.eval_prompts(p.stage.prompts)
    pipe = load_pipeline(p.input)
    images = generate(
        pipe,
        prompts,
        steps=g.steps,
        guidance=g.guidance,
        seed=g.seed,
        scheduler=g.scheduler,
        batch=g.batch,
        height=g.height,
        width=g.width,
        progress=progress,
    )
    with atomic_dir(p.out) as tmp:
        for k, image in enumerate(images):
            atomic_save_image(image, tmp / f"{k:03d}.png")
        captions = [f"{prompt}\nseed {g.seed + k}" for k, prompt in enumerate(prompts)]
        atomic_save_image(captioned_grid(images, captions, columns=min(8, len(images))), tmp / "grid.png")
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")


def _run_bench(p, recipe, *, progress, say, command) -> None:
    from bench.harness import run_bench
    from bench.scenario import BenchConfig
    from sdwb.backends.registry import backend_for
    from sdwb.variants.manifest import is_export_dir

    data = p.stage.model_dump(mode="json")  # variants keep only the keys they set
    data.pop("kind", None)
    own = p.stage.defaults.model_fields_set
    data["defaults"].update({k: v for k, v in recipe_bench_defaults(recipe).items() if k not in own})
    for v in data["variants"]:
        if v["model"] in p.refs:
            v["model"] = p.refs[v["model"]]
            if v.get("backend") is None and is_export_dir(v["model"]):
                v["backend"] = backend_for(v["model"])  # what its manifest is: ONNX Runtime, OpenVINO
    cfg = resolve_recipe_models(BenchConfig.model_validate(data))
    run_bench(cfg, p.out, progress=progress, command=command)


def _run_report(p, recipe, *, progress, say, command) -> None:
    from bench.report import render_report
    from sdwb.runs import atomic_dir

    with atomic_dir(p.out) as tmp:
        render_report([p.bench_results, *map(Path, p.stage.extra)], tmp, n_images=p.stage.images)


EXECUTORS: dict[str, Callable] = {
    "prune": _run_prune,
    "distill": _run_distill,
    "quantize": _run_quantize,
    "decoder": _run_decoder,
    "cache": _run_cache,
    "lora": _run_lora,
    "export": _run_export,
    "generate": _run_generate,
    "bench": _run_bench,
    "report": _run_report,
}
