"""Recipe validation: valid recipes load, every kind of bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdwb.app.recipe_schema import (
    Recipe,
    apply_overrides,
    config_hash,
    load_recipe,
    parse_override,
    resolved_dict,
    resolved_yaml,
)
from sdwb.errors import SdwbError

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "configs" / "recipes" / "baseline.yaml"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(SdwbError) as info:
        load_recipe(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert info.value.exit_code != 0
    return msg


def test_baseline_recipe_loads():
    recipe = load_recipe(BASELINE)
    assert recipe.name == "baseline"
    assert recipe.model == "builtin:tiny-shapes"
    assert recipe.generate.scheduler in ("ddim", "euler", "dpmpp")
    assert recipe.bench.repeats >= 1 and recipe.bench.backend == "torch"
    assert [s.kind for s in recipe.stages] == ["generate", "bench", "report"]


RECIPES = sorted(p for d in ("recipes", "examples") for p in (ROOT / "configs" / d).rglob("*.yaml"))
BENCH_CONFIGS = sorted((ROOT / "configs" / "bench").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    assert isinstance(load_recipe(path), Recipe)


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_bench_config_is_valid(path):
    from bench.scenario import load_bench_config

    assert load_bench_config(path, []).scenarios()


def test_defaults_and_name_from_file_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, "", "my-run.yaml"))
    assert recipe.name == "my-run"
    assert recipe == Recipe(name="my-run")
    assert load_recipe(None).model == "builtin:tiny-shapes"


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "bench:\n  stepz: 4\n")
    msg = error_of(path)
    assert str(path) in msg and "bench.stepz" in msg and "unknown key" in msg
    assert "steps" in msg.split("allowed:")[1]
    assert "unknown key" in error_of(write(tmp_path, "modle: x\n"))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "bench:\n  steps: four\n")
    msg = error_of(path)
    assert str(path) in msg and "bench.steps" in msg and "integer" in msg and "'four'" in msg
    assert "generate.scheduler" in error_of(write(tmp_path, "generate: {scheduler: pndm}\n"))
    assert "bench.repeats" in error_of(write(tmp_path, "bench: {repeats: 0}\n"))
    assert "bench.warmup" in error_of(write(tmp_path, "bench: {warmup: -1}\n"))
    assert "bench.dtype" in error_of(write(tmp_path, "bench: {dtype: int8}\n"))
    # strict: a quoted number is a string, not silently an integer
    assert "generate.steps" in error_of(write(tmp_path, "generate: {steps: '4'}\n"))


def test_bad_stage_kind_and_stage_field(tmp_path):
    msg = error_of(write(tmp_path, "stages:\n  - kind: teleport\n"))
    assert "stages.0" in msg and "teleport" in msg and "generate" in msg
    msg = error_of(write(tmp_path, "stages:\n  - kind: generate\n    promts: 3\n"))
    assert "stages.0.promts" in msg and "unknown key" in msg


def test_prune_and_distill_stages_take_their_commands_config_keys(tmp_path):
    text = ("stages:\n  - kind: prune\n    ratio: 0.3\n    importance: taylor\n    finetune: {steps: 4000}\n"
            "  - kind: distill\n    teacher_steps: 32\n    student_steps: 4\n    guidance_distill: true\n"
            "    guidance: 4.0\n    guidance_budget: 1200\n")
    recipe = load_recipe(write(tmp_path, text))
    prune, distill = recipe.stages
    assert (prune.kind, prune.ratio, prune.importance, prune.finetune.steps) == ("prune", 0.3, "taylor", 4000)
    assert distill.round_steps() == [(32, 16), (16, 8), (8, 4)]
    assert distill.round_budget(True) == ("steps", 1200.0)
    # the resolved recipe (defaults filled in) loads again to the same config
    again = load_recipe(write(tmp_path, resolved_yaml(recipe), "resolved.yaml"))
    assert config_hash(again) == config_hash(recipe)
    blocks = load_recipe(write(tmp_path, "stages:\n  - kind: prune\n    method: blocks\n", "b.yaml"))
    assert config_hash(load_recipe(write(tmp_path, resolved_yaml(blocks), "b2.yaml"))) == config_hash(blocks)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("kind: prune\n    ratio: 1.5", "stages.0.ratio"),
        ("kind: prune\n    method: blocks\n    ratio: 0.3", "used by method 'channels' only"),
        ("kind: prune\n    finetune: {stepz: 3}", "stages.0.finetune.stepz: unknown key"),
        ("kind: distill\n    teacher_steps: 64\n    student_steps: 6", "power of two"),
        ("kind: distill\n    method: lcm\n    guidance_budget: 100", "one run"),
        ("kind: distill\n    budgett: 3", "stages.0.budgett: unknown key"),
    ],
)
def test_bad_prune_or_distill_stage_is_one_line(tmp_path, stage, expected):
    msg = error_of(write(tmp_path, f"stages:\n  - {stage}\n"))
    assert expected in msg and "stages.0" in msg, msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nbench:\n  steps: [1, 2\n")
    msg = error_of(path)
    assert f"{path}:" in msg and "malformed YAML" in msg
    line = int(msg[len(str(path)) + 1 :].split(":")[0])
    assert line >= 3
    msg = error_of(write(tmp_path, "bench:\n  steps: 1\n\tbad: tab\n"))
    assert "malformed YAML" in msg


def test_duplicate_key_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, "bench: {steps: 1}\nbench: {steps: 2}\n"))
    assert "duplicate key" in msg and ":2:" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = error_of(missing)
    assert str(missing) in msg and "not found" in msg
    assert "directory" in error_of(tmp_path)


def test_set_overrides_apply_with_yaml_types():
    recipe = load_recipe(BASELINE, ["bench.steps=4", "generate.guidance=1", "generate.height=64",
                                    "bench.threads=2", "generate.steps=3", "generate.steps=5"])
    assert recipe.bench.steps == 4 and isinstance(recipe.bench.steps, int)
    assert recipe.generate.guidance == 1.0
    assert recipe.generate.height == 64 and recipe.bench.threads == 2
    assert recipe.generate.steps == 5  # the later override wins
    assert load_recipe(BASELINE, ["generate.height="]).generate.height is None
    assert load_recipe(BASELINE, ["stages.0.prompts=3"]).stages[0].prompts == 3
    assert load_recipe(BASELINE, ["model=builtin:sd15-arch"]).model == "builtin:sd15-arch"


@pytest.mark.parametrize("item", ["bench.steps", "=4", "bench..steps=4", "bench steps=4", "a.b-c=1", ""])
def test_bad_set_syntax(item):
    msg = error_of(BASELINE, [item])
    assert "--set" in msg and "KEY=VALUE" in msg


def test_bad_set_value_and_path():
    msg = error_of(BASELINE, ["bench.steps=0"])
    assert "bench.steps" in msg and "--set" in msg and str(BASELINE) in msg
    assert "bench.stepz" in error_of(BASELINE, ["bench.stepz=4"])
    assert "not a section" in error_of(BASELINE, ["generate.steps.x=1"])
    assert "stages.5" in error_of(BASELINE, ["stages.5.prompts=1"])
    assert "--set" in error_of(BASELINE, ["bench.steps=[1"])


def test_parse_override_and_apply_do_not_mutate():
    assert parse_override("a.b=4") == (["a", "b"], 4)
    assert parse_override("a=x=y") == (["a"], "x=y")
    data = {"bench": {"steps": 1}}
    out = apply_overrides(data, ["bench.steps=2"])
    assert out == {"bench": {"steps": 2}} and data == {"bench": {"steps": 1}}


def test_hash_is_stable_and_follows_content(tmp_path):
    a = load_recipe(BASELINE)
    b = load_recipe(BASELINE)
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12 and int(config_hash(a), 16) >= 0
    # same content written in another key order: same hash
    reordered = write(tmp_path, "bench: {warmup: 1, steps: 30}\nname: baseline\n")
    plain = write(tmp_path, "name: baseline\nbench: {steps: 30}\n", "other.yaml")
    assert config_hash(load_recipe(reordered)) == config_hash(load_recipe(plain))
    assert config_hash(load_recipe(BASELINE, ["bench.steps=4"])) != config_hash(a)
    assert config_hash(load_recipe(BASELINE, ["generate.seed=1"])) != config_hash(a)


def test_resolved_dict_round_trips():
    recipe = load_recipe(BASELINE, ["bench.steps=4"])
    data = resolved_dict(recipe)
    assert data["bench"]["steps"] == 4 and data["generate"]["height"] is None
    assert Recipe.model_validate(data) == recipe
    assert config_hash(data) == config_hash(recipe)
    import yaml

    assert yaml.safe_load(resolved_yaml(recipe)) == data
