"""Recipes run end to end (``sdwb run``): stage keys, caching, resumption, includes, references.

The end-to-end run uses the ~0.3 M-param tiny pipeline (``sdwb.testing``): prune (no recovery)
-> export -> bench (latency only, 2 steps) -> report. The tests check what the runner promises:
a stage's key depends on its config and inputs only, a re-run reuses finished stages, ``--until``
leaves later stages for later, and a changed stage re-runs it and what follows, nothing before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sdwb.app.recipe_run import final_model, plan, run_recipe
from sdwb.app.recipe_schema import load_recipe, recipe_from_dict
from sdwb.errors import SdwbError

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(model: str, repeats: int = 2) -> dict:
    return {
        "name": "tiny",
        "model": model,
        "stages": [
            {"kind": "prune", "ratio": 0.3, "data": {"latent_pool": 16}},
            {"kind": "export"},
            {
                "kind": "bench",
                "name": "tinybench",
                "defaults": {"steps": 2, "n_prompts": 1, "repeats": repeats, "warmup": 0,
                             "metrics": ["latency"], "threads": 1},
                "variants": [{"name": "base", "model": model},
                             {"name": "pruned", "model": "@prune"},
                             {"name": "pruned-ort", "model": "@input"}],
                "baseline": "base",
            },
            {"kind": "report", "images": 0},
        ],
    }


def test_committed_recipes_validate_and_share_the_prune_stage():
    files = sorted((ROOT / "configs/recipes").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"baseline", "int8", "prune30", "distill4", "fastest", "demo"} <= names
    plans = {f.stem: plan(load_recipe(f), "/nonexistent-store") for f in files}
    # fastest starts with exactly prune30's stage: one artifact serves both recipes
    assert plans["fastest"][0].kind == plans["prune30"][0].kind == "prune"
    assert plans["fastest"][0].key == plans["prune30"][0].key
    # ... and distils the *pruned* model, so its distill stage differs from distill4's
    assert plans["fastest"][1].kind == plans["distill4"][0].kind == "distill"
    assert plans["fastest"][1].key != plans["distill4"][0].key
    assert [p.kind for p in plans["fastest"]] == ["prune", "distill", "export", "quantize", "bench", "report"]


def test_keys_follow_config_and_inputs_not_names(tiny_pipeline_dir):
    base = tiny_recipe(str(tiny_pipeline_dir))
    keys = [p.key for p in plan(recipe_from_dict(base), "store")]
    assert len(set(keys)) == len(keys)
    assert [p.key for p in plan(recipe_from_dict(base), "store")] == keys  # deterministic

    renamed = json.loads(json.dumps(base))
    renamed["stages"][0]["name"] = "slim"
    renamed["stages"][2]["variants"][1]["model"] = "@slim"
    assert [p.key for p in plan(recipe_from_dict(renamed), "store")][:2] == keys[:2]

    changed = json.loads(json.dumps(base))
    changed["stages"][1]["opset"] = 17  # the export changes: it and everything after re-run
    new = [p.key for p in plan(recipe_from_dict(changed), "store")]
    assert new[0] == keys[0] and all(a != b for a, b in zip(new[1:], keys[1:]))


def test_bad_references_and_includes_are_one_line_errors(tiny_pipeline_dir, tmp_path):
    recipe = tiny_recipe(str(tiny_pipeline_dir))
    recipe["stages"][2]["variants"][1]["model"] = "@distill"
    with pytest.raises(SdwbError, match=r"@distill names no earlier model stage \(known here: @input, @pru"):
        plan(recipe_from_dict(recipe), tmp_path)
    with pytest.raises(SdwbError, match="no bench stage before it"):
        plan(recipe_from_dict({"stages": [{"kind": "report"}]}), tmp_path)

    inc = tmp_path / "prune.yaml"
    inc.write_text("method: channels\nratio: 0.5\nimportance: taylor\n")
    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump({"stages": [{"kind": "prune", "include": "prune.yaml", "ratio": 0.2}]}))
    stage = load_recipe(rfile).stages[0]
    assert (stage.ratio, stage.importance) == (0.2, "taylor")  # the stage's own key wins over the file
    rfile.write_text(yaml.safe_dump({"stages": [{"kind": "prune", "include": "missing.yaml"}]}))
    with pytest.raises(SdwbError, match=r"stages\.0\.include: missing\.yaml: file not found"):
        load_recipe(rfile)
    rfile.write_text(yaml.safe_dump({"stages": [{"kind": "quantize", "method": "ort-int8-statik"}]}))
    with pytest.raises(SdwbError, match=r"stages\.0: method: unknown method 'ort-int8-statik'"):
        load_recipe(rfile)


def test_run_until_then_resume_reuses_finished_stages(tiny_pipeline_dir, tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    recipe = recipe_from_dict(tiny_recipe(str(tiny_pipeline_dir)))

    first = run_recipe(recipe, store=store, run_root=runs, progress=False, until="export")
    assert [first.status[i] for i in range(4)] == ["ran", "ran", "pending", "pending"]
    pruned, export = first.stages[0], first.stages[1]
    assert (pruned.out / "sdwb.json").is_file() and (export.out / "manifest.json").is_file()
    stamp = (pruned.dir / "stage.json").stat().st_mtime_ns

    second = run_recipe(recipe, store=store, run_root=runs, progress=False)
    assert [second.status[i] for i in range(4)] == ["cached", "cached", "ran", "ran"]
    assert (pruned.dir / "stage.json").stat().st_mtime_ns == stamp  # not re-run
    results = json.loads((second.stages[2].out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["pruned-ort"]["backend"] == "onnxruntime"  # an export reference runs on ORT
    assert rows["pruned"]["model"] == str(pruned.out)
    assert len(results["samples"]["pruned"]["e2e_s"]) == 2  # per-run numbers for the gate
    assert second.report() is not None and second.report().is_file()
    assert (second.run_dir / "report" / "report.html").resolve() == second.report().resolve()
    assert (second.run_dir / "model" / "manifest.json").is_file()  # the final model: the export
    record = json.loads((second.run_dir / "run.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["cached", "cached", "ran", "ran"]

    third = run_recipe(recipe, store=store, run_root=runs, progress=False)
    assert set(third.status.values()) == {"cached"}

    # recipe-wide bench settings fill what a bench stage's defaults leave unset, and re-key it
    def bench_key(section: dict) -> str:
        return plan(recipe_from_dict({**tiny_recipe(str(tiny_pipeline_dir)), "bench": section}), store)[2].key

    assert bench_key({"steps": 3}) == second.stages[2].key  # the stage sets steps itself
    assert bench_key({"steps": 3, "dtype": "bf16"}) != second.stages[2].key  # dtype is inherited

    # a bench killed half-way (no stage.json, partial output) is started over, the rest reused
    (second.stages[2].dir / "stage.json").unlink()
    (second.stages[2].out / "results.json").unlink()
    fourth = run_recipe(recipe, store=store, run_root=runs, progress=False)
    assert [fourth.status[i] for i in range(4)] == ["cached", "cached", "ran", "cached"]
    assert (second.stages[2].out / "results.json").is_file()


def test_recipe_spec_names_a_recipes_final_model(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("configs/recipes").mkdir(parents=True)
    data = tiny_recipe(str(tiny_pipeline_dir))
    data["stages"] = data["stages"][:1]
    Path("configs/recipes/mine.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SdwbError, match=r"recipe:mine: the recipe has not been run to its prune stage"):
        final_model("recipe:mine")
    with pytest.raises(SdwbError, match=r"recipe:mine@export: the recipe has no model stage called export"):
        final_model("recipe:mine@export")
    run_recipe(load_recipe("configs/recipes/mine.yaml"), progress=False)
    pruned = str(plan(load_recipe("configs/recipes/mine.yaml"))[0].out)
    assert final_model("recipe:mine") == final_model("recipe:mine@prune") == pruned


def test_cli_run_dry_run_and_errors(tiny_pipeline_dir, tmp_path):
    from sdwb.app.cli import app

    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump(tiny_recipe(str(tiny_pipeline_dir))))
    runner = CliRunner()
    out = runner.invoke(app, ["run", str(rfile), "--store", str(tmp_path / "s"), "--dry-run"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 4 and all("to run" in line for line in lines)
    bad = runner.invoke(app, ["run", str(rfile), "--until", "nope", "--store", str(tmp_path / "s")])
    assert bad.exit_code != 0 and "--until nope: no such stage" in str(bad.exception)
    missing = runner.invoke(app, ["run", str(tmp_path / "absent.yaml")])
    assert missing.exit_code != 0 and "recipe file not found" in str(missing.exception)
