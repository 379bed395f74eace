"""Fail closed (issue #23): every fault a hostile or careless user found is refused in one line.

Each test builds the faulty input first (a byte-flipped copy of a builtin, a ``.bin`` pickle
fallback, ``include:`` of a foreign file, two concurrent runs on one store, the fail-open gate
cases, each late or "internal" error) and asserts the new behaviour: exit 2 and one ``error:``
line naming the input, no traceback, no "internal"; or, for the store, no lost or replaced
finished artifact. Everything runs on copies of tiny-shapes or the ~0.3 M-param test pipeline;
nothing here loads sd15-arch or sdxl-arch, and refusals are checked to come before any weights
are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sdwb import hash_cache, zoo
from sdwb.errors import SdwbError

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "sdwb" / "assets"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    """Each test gets its own sha256 cache (never the user's ~/.cache/sdwb)."""
    monkeypatch.setenv("SDWB_CACHE_DIR", str(tmp_path / "sdwb-cache"))
    monkeypatch.delenv("SDWB_FOLLOW_SYMLINKS", raising=False)
    hash_cache.reset()
    yield
    hash_cache.reset()


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """The real entry point in this process: ``(exit code, stdout + stderr)``."""
    from sdwb.app.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def refused(code: int, out: str, *needles: str) -> str:
    """Exit 2 with exactly one ``error:`` line (no traceback, not "internal") holding ``needles``."""
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2, out
    assert len(errors) == 1 and "Traceback" not in out and "internal" not in errors[0], out
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are read by diffusers/transformers (a refusal must come first)."""
    import diffusers
    import transformers

    def boom(*_a, **_k):
        raise AssertionError("weights were loaded before the input was refused")

    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline,
                transformers.CLIPModel):
        monkeypatch.setattr(cls, "from_pretrained", boom)


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def copied_assets(tmp_path: Path, monkeypatch, name: str = "tiny-shapes") -> Path:
    """A copy of the shipped assets the zoo then serves as ``builtin:<name>``."""
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS / name, assets / name)
    monkeypatch.setattr(zoo, "assets_dir", lambda: assets)
    return assets / name


# --------------------------------------------------------------------------- 1. verified models


def test_every_shipped_builtin_lists_its_files_and_verifies():
    from sdwb.verify import verify_model

    for model in zoo.list_models():
        if model.asset is not None and model.available():
            verify_model(model.name, model.path, model.kind)  # the committed lists match the files


def test_a_byte_flipped_builtin_or_copy_of_it_is_refused(tmp_path, monkeypatch, capsys, no_loading):
    from sdwb.loading import load_pipeline

    builtin = copied_assets(tmp_path, monkeypatch)
    flip_byte(builtin / UNET_WEIGHTS)  # same size, valid header: only the hash can tell
    with pytest.raises(SdwbError, match=r"sha256 differs from .*sdwb-files.json \(modified after "
                                        r"builtin:tiny-shapes was shipped\)"):
        load_pipeline("builtin:tiny-shapes")
    code, out = cli(["generate", "--model", "builtin:tiny-shapes", "-p", "a red circle", "-o",
                      str(tmp_path / "x.png")], capsys)
    refused(code, out, str(builtin / UNET_WEIGHTS), "sha256 differs")

    plain = tmp_path / "copy"  # a copy carries the list with it and is held to it
    shutil.copytree(builtin, plain)
    code, out = cli(["generate", "--model", str(plain), "-p", "a red circle", "-o", str(tmp_path / "x.png")],
                     capsys)
    refused(code, out, str(plain / UNET_WEIGHTS), "sha256 differs")


def test_builtin_files_truncated_unlisted_or_unlisted_at_all_are_refused(tmp_path, monkeypatch):
    from sdwb.verify import FILES_MANIFEST, verify_model

    builtin = copied_assets(tmp_path, monkeypatch)
    verify_model("builtin:tiny-shapes", builtin)  # the intact copy passes
    (builtin / "unet" / "extra.safetensors").write_bytes((builtin / UNET_WEIGHTS).read_bytes())
    with pytest.raises(SdwbError, match="extra.safetensors: not listed in"):
        verify_model("builtin:tiny-shapes", builtin)
    (builtin / "unet" / "extra.safetensors").unlink()
    vae = builtin / "vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-10])
    with pytest.raises(SdwbError, match="corrupt weights|truncated"):
        verify_model("builtin:tiny-shapes", builtin)
    shutil.copyfile(ASSETS / "tiny-shapes" / vae.relative_to(builtin), vae)
    verify_model("builtin:tiny-shapes", builtin)
    (builtin / FILES_MANIFEST).unlink()
    with pytest.raises(SdwbError, match=r"no sdwb-files.json .* tools.builtin_manifest tiny-shapes"):
        verify_model("builtin:tiny-shapes", builtin)


def test_hashes_are_cached_by_identity_and_redone_after_any_write(tmp_path, monkeypatch):
    from sdwb.variants import files

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    assert hash_cache.sha256_cached(f) and not hash_cache._memory  # just written: never cached (racy)
    monkeypatch.setattr(hash_cache, "RACY_NS", 0)  # as if written long ago
    calls = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda p: calls.append(p) or real(p))
    first = hash_cache.sha256_cached(f)
    assert hash_cache.sha256_cached(f) == first and len(calls) == 1  # memory
    hash_cache.flush()
    hash_cache.reset()  # as another process starts: only the file on disk
    assert hash_cache.sha256_cached(f) == first and len(calls) == 1
    time.sleep(0.05)  # past the filesystem clock's tick
    st = f.stat()
    f.write_bytes(b"b" * 4096)  # same size; the mtime set back by hand, as `touch -d` would
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hash_cache.sha256_cached(f) == files.sha256_file(f) != first and len(calls) == 2  # ctime moved


def test_pickle_weights_are_refused_with_the_conversion_command(tiny_pipeline_dir, tmp_path, capsys,
                                                                no_loading):
    import torch
    from safetensors.torch import load_file

    from sdwb.verify import scan_directory

    model = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")  # diffusers' fallback
    scan_directory(model)  # beside safetensors, a pickle is never read (use_safetensors=True): fine
    weights.unlink()
    import sdwb.loading

    with pytest.raises(SdwbError) as e:
        sdwb.loading.verify_model(str(model), model)
    msg = str(e.value)
    assert "vae/diffusion_pytorch_model.bin: pickle weights are refused" in msg and "\n" not in msg
    assert "save_pretrained(" in msg and "safe_serialization=True" in msg  # how to convert


def test_symlinks_out_of_the_model_are_refused_unless_followed(tiny_pipeline_dir, tmp_path, capsys,
                                                                monkeypatch, no_loading):
    from sdwb.verify import scan_directory

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model = tmp_path / "linked"
    shutil.copytree(tiny_pipeline_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.move(weights, outside / "unet.safetensors")
    weights.symlink_to(outside / "unet.safetensors")
    code, out = cli(["generate", "--model", str(model), "-p", "a red circle", "-o", str(tmp_path / "x.png")],
                     capsys)
    refused(code, out, str(weights), "outside the model directory", "--follow-symlinks")
    scan_directory(model, follow_symlinks=True)
    monkeypatch.setenv("SDWB_FOLLOW_SYMLINKS", "1")
    scan_directory(model)
    monkeypatch.delenv("SDWB_FOLLOW_SYMLINKS")

    # a Hugging Face cache snapshot links into its repo's blobs/: inside the model, allowed
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_pipeline_dir, snap)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "abc"
    shutil.move(snap / "unet" / "diffusion_pytorch_model.safetensors", blob)
    (snap / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(Path("../../../blobs/abc"))
    scan_directory(snap)


def test_an_unreadable_model_directory_is_named(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, no_loading):
    model = tmp_path / "locked"
    shutil.copytree(tiny_pipeline_dir, model)
    model.chmod(0)
    try:
        if os.geteuid() == 0:  # root reads anything: deny as the kernel would deny another user
            real = os.access
            monkeypatch.setattr(os, "access",
                                lambda p, m, **k: False if Path(p) == model else real(p, m, **k))
        code, out = cli(["generate", "--model", str(model), "-p", "a red circle", "-o",
                          str(tmp_path / "x.png")], capsys)
        assert "ermission denied" in refused(code, out, str(model))
    finally:
        model.chmod(0o755)

    # any other PermissionError on the way is the user's to fix: named, exit 2, not "internal"
    import sdwb.app.recipe_schema as schema

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "r.yaml"))

    monkeypatch.setattr(schema, "load_recipe", denied)
    code, out = cli(["config", "check", str(tmp_path / "r.yaml")], capsys)
    refused(code, out, f"{tmp_path / 'r.yaml'}: Permission denied")


def test_a_variant_record_whose_parent_is_a_string_is_corrupt(tiny_pipeline_dir, tmp_path, capsys,
                                                               no_loading):
    from sdwb.variants.record import read_record

    model = tmp_path / "variant"
    shutil.copytree(tiny_pipeline_dir, model)
    (model / "sdwb.json").write_text(json.dumps({"format": "sdwb-variant", "stage": "quantize",
                                                 "parent": "builtin:tiny-shapes"}))
    with pytest.raises(SdwbError, match=r"corrupt .*sdwb.json: parent: expected an object"):
        read_record(model)
    code, out = cli(["compress", "prune", "--model", str(model), "--ratio", "0.3", "-o",
                      str(tmp_path / "pruned")], capsys)
    refused(code, out, "sdwb.json: parent: expected an object")


def test_a_truncated_export_manifest_is_corrupt_not_missing(tmp_path, capsys):
    from sdwb.backends.registry import check_model
    from sdwb.loading import load_pipeline

    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text('{"format": "sdwb-onnx-export", "compo')
    with pytest.raises(SdwbError, match="corrupt .*manifest.json"):
        check_model("onnxruntime", str(export))
    with pytest.raises(SdwbError, match="corrupt .*manifest.json"):
        load_pipeline(str(export))
    code, out = cli(["generate", "--model", str(export), "--backend", "onnxruntime", "-p", "x", "-o",
                      str(tmp_path / "x.png")], capsys)
    refused(code, out, "corrupt", "manifest.json")


# --------------------------------------------------------------------------- 2. include:


def test_include_reads_only_yaml_under_the_recipe_or_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    secret = tmp_path / "secret" / "keys.yaml"
    secret.parent.mkdir()
    secret.write_text("hunter2: swordfish\nmethod: channels\n")  # a mapping: keys would be echoed
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    rfile = recipes / "r.yaml"

    def check(include: str) -> tuple[int, str]:
        rfile.write_text(yaml.safe_dump({"stages": [{"kind": "prune", "include": include}]}))
        return cli(["config", "check", str(rfile)], capsys)

    for foreign in (str(secret), "/etc/passwd", "../secret/keys.yaml"):
        code, out = check(foreign)
        line = refused(code, out, "stages.0.include", "outside the directories an include may read")
        assert "hunter2" not in out and "swordfish" not in out and "root:" not in out, line
    (recipes / "link.yaml").symlink_to(secret)  # a link inside that leads out: the real path counts
    code, out = check("link.yaml")
    refused(code, out, "outside the directories")
    assert "hunter2" not in out
    (recipes / "notes.txt").write_text("method: channels\n")
    refused(*check("notes.txt"), "expected a YAML file")
    (recipes / "list.yaml").write_text("- a\n- b\n")
    refused(*check("list.yaml"), "expected a mapping")

    code, out = check("configs/prune/prune30.yaml")  # the repository's configs/ is allowed
    assert code == 0, out
    (recipes / "mine.yaml").write_text("method: channels\nratio: 0.4\n")  # beside the recipe: allowed
    code, out = check("mine.yaml")
    assert code == 0 and "ratio: 0.4" in out, out


# --------------------------------------------------------------------------- 3. the stage store

RUNNER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sdwb.app import recipe_run
    from sdwb.app.recipe_schema import recipe_from_dict
    from sdwb.runs import atomic_dir

    work, model, fail = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "fail"
    (work / f"started-{os.getpid()}").touch()

    def slow_export(p, recipe, **_kw):
        with open(work / "executions", "a") as f:
            f.write(f"{os.getpid()}\\n")
        deadline = time.time() + 30  # hold the stage until the other runner is surely waiting
        while len(list(work.glob("started-*"))) < int(sys.argv[4]) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        if fail:
            raise RuntimeError("export failed")
        with atomic_dir(p.out) as tmp:
            (tmp / "manifest.json").write_text("{}")

    recipe_run.EXECUTORS["export"] = slow_export
    recipe = recipe_from_dict({"name": "locked", "model": model, "stages": [{"kind": "export"}]})
    result = recipe_run.run_recipe(recipe, store=work / "store", out=work / "run", progress=False,
                                   say=lambda m: print(m, flush=True))
    print("STATUS", result.status[0], flush=True)
""")


def _runner(tmp_path: Path, model: Path, fail: bool = False, expect: int = 2) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), str(model), "fail" if fail else "ok",
                             str(expect)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_two_concurrent_runs_on_one_store_run_a_stage_once(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.txt").write_text("w")
    runners = [_runner(tmp_path, model) for _ in range(2)]
    outs = [r.communicate(timeout=120)[0] for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outs
    assert len((tmp_path / "executions").read_text().split()) == 1, outs  # trained once, not twice
    statuses = sorted(line.split()[1] for out in outs for line in out.splitlines()
                      if line.startswith("STATUS"))
    assert statuses == ["cached", "ran"], outs
    loser = next(out for out in outs if "STATUS cached" in out)
    assert "waiting: another run is working on" in loser and "finished by another run meanwhile" in loser
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["stages"][0]["status"] in ("ran", "cached")
    assert not (tmp_path / "run/run.partial.json").exists()
    stage_dir = Path(record["stages"][0]["dir"])
    assert (stage_dir / "out" / "manifest.json").is_file() and (stage_dir / "stage.json").is_file()


def test_a_failed_run_never_replaces_a_good_run_json(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.txt").write_text("w")
    good = tmp_path / "run" / "run.json"
    good.parent.mkdir()
    good.write_text('{"a good": "record"}')  # what an earlier finished run wrote
    failing = _runner(tmp_path, model, fail=True, expect=1)
    out = failing.communicate(timeout=120)[0]
    assert failing.returncode != 0 and "export failed" in out
    assert good.read_text() == '{"a good": "record"}'
    partial = json.loads((tmp_path / "run" / "run.partial.json").read_text())
    assert partial["stages"][0]["status"] == "failed"


HOLDER = textwrap.dedent("""
    import sys, time
    from sdwb.runs import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        print("READY", tmp, flush=True)
        time.sleep(120)
""")


def test_stale_tmp_dirs_of_killed_commands_are_removed_live_ones_kept(tmp_path):
    from sdwb.runs import atomic_dir

    final = tmp_path / "variant"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    procs, tmps = [], []
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(final)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        procs.append(proc)
        tmps.append(Path(line.split()[1]))
    try:
        procs[0].send_signal(signal.SIGKILL)  # kill -9: nothing of its own cleans up
        procs[0].wait(timeout=30)
        assert tmps[0].is_dir()
        with atomic_dir(final) as tmp:
            (tmp / "done").write_text("ok")
        assert not tmps[0].exists() and not Path(f"{tmps[0]}.lock").exists()  # the dead one's: removed
        assert tmps[1].is_dir()  # a live process's: left alone
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    assert (final / "done").read_text() == "ok"


def test_run_store_or_out_that_is_a_file_is_one_line(tmp_path, capsys):
    rfile = tmp_path / "r.yaml"
    rfile.write_text(yaml.safe_dump({"model": str(tmp_path), "stages": [{"kind": "export"}]}))
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out = cli(["run", str(rfile), "--store", str(afile)], capsys)
    refused(code, out, f"--store {afile}: exists and is not a directory")
    code, out = cli(["run", str(rfile), "--store", str(tmp_path / "s"), "--out", str(afile)], capsys)
    refused(code, out, f"--out {afile}: exists and is not a directory")
    code, out = cli(["run", str(rfile), "--store", str(afile / "sub")], capsys)
    refused(code, out, "cannot create directory")


# --------------------------------------------------------------------------- 4. the gate


def row(**kw) -> dict:
    base = {"variant": "v", "model": "builtin:tiny-shapes", "backend": "torch", "dtype": "fp32", "steps": 10,
            "guidance": 7.5, "batch": 1, "scheduler": "ddim", "prompts": "builtin:shapes-eval",
            "n_prompts": 108, "seed": 0, "threads": 2, "height": 64, "width": 64, "device": "cpu",
            "peak_rss_mb": 440.0, "clip_score": 93.0, "color_acc": 1.0, "shape_acc": 0.88,
            "position_acc": 1.0}
    return {**base, **kw}


def results(path: Path, rows: list, samples: dict | None = None, **extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    runs = [0.15 + 0.001 * i for i in range(10)]
    data = {"complete": True, "rows": rows, "environment": {},
            "samples": {"v": {"e2e_s": runs, "unet_ms": runs}} if samples is None else samples, **extra}
    (path / "results.json").write_text(json.dumps(data))
    return path / "results.json"


def gate(base: Path, cand: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    return cli(["gate", "--baseline", str(base), "--candidate", str(cand), "-o", str(tmp_path / "g"),
                *extra], capsys)


def test_gate_refuses_a_candidate_missing_a_metric_it_gates(tmp_path, capsys):
    base = results(tmp_path / "b", [row()])
    code, out = gate(base, base, tmp_path, capsys)
    assert code == 0, out
    memory_only = results(tmp_path / "m", [row(clip_score=None, color_acc=None, shape_acc=None,
                                               position_acc=None)], samples={})  # bench --metrics memory
    code, out = gate(base, memory_only, tmp_path, capsys)
    refused(code, out, "candidate", "per-run latency samples (e2e_s) not measured",
            "thresholds.file_latency_pct")
    code, out = gate(base, memory_only, tmp_path, capsys, "--set", "thresholds.file_latency_pct=null")
    refused(code, out, "clip_score not measured", "thresholds.clip_drop: null")
    code, out = gate(memory_only, base, tmp_path, capsys, "--set", "thresholds.file_latency_pct=null")
    refused(code, out, "baseline")
    nothing_gated = ["--set", "thresholds.file_latency_pct=null", "--set", "thresholds.clip_drop=null",
                     "--set", "thresholds.accuracy_drop=null"]
    code, out = gate(base, memory_only, tmp_path, capsys, *nothing_gated)  # asked for memory only: fine
    assert code == 0, out


def test_gate_refuses_a_different_scenario_naming_each_difference(tmp_path, capsys):
    base = results(tmp_path / "b", [row()])
    cheap = results(tmp_path / "c", [row(steps=2, guidance=1.0, n_prompts=4)])
    code, out = gate(base, cheap, tmp_path, capsys)
    line = refused(code, out, "different scenarios", "steps 10 vs 2", "guidance 7.5 vs 1.0",
                   "n_prompts 108 vs 4")
    assert "same prompts and seeds" not in out, line
    for key, value in (("model", "/elsewhere/model"), ("seed", 1), ("scheduler", "euler"), ("batch", 2),
                       ("backend", "onnxruntime"), ("dtype", "bf16"), ("threads", 1), ("prompts", "p.txt")):
        other = results(tmp_path / key, [row(**{key: value})])
        code, out = gate(base, other, tmp_path, capsys)
        refused(code, out, f"{key} ")
    other = results(tmp_path / "model-ok", [row(model="/elsewhere/model")])
    code, out = gate(base, other, tmp_path, capsys, "--allow-model-change")
    assert code == 0, out
    texts = results(tmp_path / "t1", [row()], prompts=["a red circle", "a blue square"])
    shuffled = results(tmp_path / "t2", [row()], prompts=["a blue square", "a red circle"])
    refused(*gate(texts, shuffled, tmp_path, capsys), "prompt texts")


def test_gate_refuses_partial_results_and_rows_that_are_not_objects(tmp_path, capsys):
    base = results(tmp_path / "b", [row()])
    partial = results(tmp_path / "p", [row()], complete=False)
    refused(*gate(base, partial, tmp_path, capsys), "partial results")
    refused(*gate(partial, base, tmp_path, capsys), "partial results")
    strings = results(tmp_path / "s", ["not", "rows"])
    refused(*gate(base, strings, tmp_path, capsys), "rows[0] is str, expected an object")
    sweep = results(tmp_path / "w", [row(), row(steps=4)])
    refused(*gate(base, sweep, tmp_path, capsys, "--variant", "v"), "2 rows of variant 'v'")


def test_ci_gate_bench_measures_the_committed_baselines_scenario():
    """`make gate` on unchanged code: what configs/bench/ci-gate.yaml measures is what the committed
    baseline holds, and it measures every metric configs/gate/ci.yaml gates."""
    from bench.gate import load_gate_config
    from bench.gate_inputs import SCENARIO_KEYS, check_measured, required_metrics
    from bench.scenario import load_bench_config

    committed = json.loads((ROOT / "reports/baselines/tiny-shapes-cpu.json").read_text())
    base = committed["rows"][0]
    scenario = load_bench_config(ROOT / "configs/bench/ci-gate.yaml").scenarios()[0]
    for key in SCENARIO_KEYS:
        if key in ("height", "width") and getattr(scenario, key) is None:
            continue  # the model's own size, filled in when measured
        assert getattr(scenario, key) == base[key], key
    need = required_metrics(load_gate_config(ROOT / "configs/gate/ci.yaml").thresholds,
                            latency="file_latency_pct")
    check_measured(need, base, committed["samples"][base["variant"]], "committed baseline")
    assert {"latency", "memory", "quality"} <= set(scenario.metrics)


# --------------------------------------------------------------------------- 5. inputs checked first


def test_unwritable_outputs_are_refused_before_any_model_loads(tmp_path, capsys, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out_dir = str(blocker / "out")
    for argv in (["export", "onnx", "--model", "builtin:tiny-shapes", "-o", out_dir],
                 ["compress", "prune", "--model", "builtin:tiny-shapes", "--ratio", "0.3", "-o", out_dir],
                 ["compress", "quantize", "--model", "builtin:tiny-shapes", "--method", "torch-bf16",
                  "-o", out_dir],
                 ["compress", "distill", "--model", "builtin:tiny-shapes", "-o", out_dir],
                 ["bench", "--model", "builtin:tiny-shapes", "-o", out_dir],
                 ["generate", "--model", "builtin:tiny-shapes", "-p", "x", "-o", out_dir + ".png"]):
        code, out = cli(argv, capsys)
        refused(code, out, str(blocker))


def test_resolution_beyond_the_model_or_memory_is_refused_before_loading(tmp_path, capsys, no_loading,
                                                                         monkeypatch):
    base = ["generate", "--model", "builtin:tiny-shapes", "-p", "x", "-o", str(tmp_path / "x.png")]
    code, out = cli([*base, "--height", "65536", "--width", "65536"], capsys)
    refused(code, out, "--height 65536", "above 1024")
    import sdwb.preflight

    monkeypatch.setattr(sdwb.preflight, "available_memory_bytes", lambda: 64 * 2**20)  # a 64 MiB machine
    code, out = cli([*base, "--height", "1024", "--width", "1024"], capsys)
    refused(code, out, "GiB", "available")


def test_a_non_utf8_prompt_is_refused_before_loading(tmp_path):
    sdwb_bin = Path(sys.executable).parent / "sdwb"
    proc = subprocess.run([str(sdwb_bin), "generate", "--model", "/nonexistent-never-reached", "-p",
                           b"a red \xff\xfe circle", "-o", str(tmp_path / "x.png")], capture_output=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8"}, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.startswith("error: --prompt 1: not valid UTF-8") and "(byte 0xff)" in err
    assert len(err.strip().splitlines()) == 1 and "internal" not in err


# --------------------------------------------------------------------------- 6. smaller


def test_generate_never_overwrites_a_json_it_did_not_write(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d" / "x.png"
    out.parent.mkdir()
    mine = out.with_suffix(".json")
    mine.write_text('{"my": "data"}')
    import sdwb.loading

    monkeypatch.setattr(sdwb.loading, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    code, text = cli(["generate", "--model", "builtin:tiny-shapes", "-p", "x", "-o", str(out)], capsys)
    refused(code, text, str(mine), "--overwrite")
    assert mine.read_text() == '{"my": "data"}'
    ours = {"command": "generate", "output": str(out)}  # an earlier sdwb generate of this output: replaced
    mine.write_text(json.dumps(ours))
    from sdwb.preflight import check_sidecar

    check_sidecar(mine, out, overwrite=False)
    mine.write_text('{"my": "data"}')
    check_sidecar(mine, out, overwrite=True)


def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path, capsys, monkeypatch):
    import sdwb.app.recipe_schema as schema

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(schema, "load_recipe", interrupted)
    code, out = cli(["config", "check", str(tmp_path / "r.yaml")], capsys)
    assert code == 130 and out.strip().splitlines()[-1] == "error: interrupted", out


def test_report_marks_partial_results_incomplete(tmp_path, capsys):
    done = results(tmp_path / "done", [row(variant="a", e2e_s_median=0.2)], samples={})
    partial_dir = tmp_path / "partial"
    partial_dir.mkdir()
    data = json.loads(done.read_text())
    data["complete"] = False
    (partial_dir / "results.partial.json").write_text(json.dumps(data))
    code, out = cli(["report", str(done), "-o", str(tmp_path / "r1")], capsys)
    assert code in (0, None) and "INCOMPLETE" not in (tmp_path / "r1/report.md").read_text()
    code, out = cli(["report", str(done), str(partial_dir), "-o", str(tmp_path / "r2")], capsys)
    assert code in (0, None), out
    md = (tmp_path / "r2/report.md").read_text()
    assert md.splitlines()[0].endswith("(INCOMPLETE)")
    assert "INCOMPLETE: partial holds partial results" in md and "(**incomplete**)" in md
    assert "INCOMPLETE" in (tmp_path / "r2/report.html").read_text() and "marked INCOMPLETE" in out
