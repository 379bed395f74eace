"""Scale-out with accelerate: ``accelerate launch --num_processes 2 -m sdwb bench`` on the CPU (gloo)
writes the same quality numbers and images as one process (bench.distributed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import distributed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("count", "processes", "expected"), [
    (5, 2, [range(0, 3), range(3, 5)]), (3, 2, [range(0, 2), range(2, 3)]),
    (1, 2, [range(0, 1), range(1, 1)]), (7, 3, [range(0, 3), range(3, 5), range(5, 7)]),
    (4, 1, [range(0, 4)]),
])
def test_shares_are_contiguous_cover_everything_once(count, processes, expected, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    shares = []
    for rank in range(processes):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.share(count))
    assert shares == expected


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed._state.cache_clear()
    assert distributed.world_size() == 1 and distributed.is_main() and distributed._state() is None
    assert distributed.gather([1, 2]) == [1, 2] and distributed.device_for("cuda") == "cuda"


@pytest.mark.slow
def test_two_processes_write_the_images_and_quality_of_one(tiny_pipeline_dir, tmp_path):
    """5 prompts in chunks of 2 over 2 processes (uneven shares: chunks 0-1 and 2): the same images,
    byte for byte, and the same quality columns as a single-process run; one results file."""
    from sdwb.testing import build_tiny_judge

    judge = tmp_path / "judge"
    model, processor = build_tiny_judge(seed=0)
    model.save_pretrained(judge)
    processor.save_pretrained(judge)
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "defaults": {"steps": 2, "n_prompts": 5, "batch": 2, "threads": 1, "judge": str(judge),
                     "metrics": ["quality"]},
        "variants": [{"name": "a", "model": str(tiny_pipeline_dir)},
                     {"name": "b", "model": str(tiny_pipeline_dir), "steps": 3}],
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    bench = ["-m", "sdwb", "bench", str(config), "--no-progress"]
    one = subprocess.run([sys.executable, *bench, "-o", str(tmp_path / "one")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launch, *bench, "-o", str(tmp_path / "two")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only the main process reports

    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert b["environment"]["image_processes"] == 2 and "image_processes" not in a["environment"]
    quality = ("clip_score", "clip_score_lo", "clip_score_hi", "cmmd", "psnr_vs_baseline", "ssim_vs_baseline",
               "color_acc", "shape_acc", "position_acc", "n_prompts")
    for ra, rb in zip(a["rows"], b["rows"]):
        assert rb["image_processes"] == 2
        assert {k: ra[k] for k in quality} == {k: rb[k] for k in quality}, ra["variant"]
    for variant in ("a", "b"):
        files = sorted((tmp_path / "one" / "images" / variant).glob("*.png"))
        assert len(files) == 5
        for f in files:
            assert f.read_bytes() == (tmp_path / "two" / "images" / variant / f.name).read_bytes(), f


TRAIN_SCRIPT = """
import json, sys
from pathlib import Path

from compress.distill import distill
from compress.distill_config import parse_distill_config
from compress.prune import prune
from compress.prune_config import parse_prune_config

model, out = sys.argv[1], Path(sys.argv[2])
distill(model, parse_distill_config({"budget": 3, "batch": 4, "latent_pool": 12, "checkpoint_every": 2,
                                     "warmup": 1, "teacher_steps": 4, "student_steps": 2}),
        out / "student", progress=False)
finetune = {"steps": 3, "batch": 4, "lr": 2e-3, "warmup": 0, "precision": "fp32", "eval_batches": 1,
            "task_weight": 0.0, "checkpoint_every": 2}
prune(model, parse_prune_config({"ratio": 0.3, "data": {"latent_pool": 16}, "finetune": finetune}, "test"),
      out / "pruned", progress=False)
"""


@pytest.mark.slow
def test_two_processes_train_as_one_on_the_same_global_batch(tiny_pipeline_dir, tmp_path):
    """Distillation and prune recovery under ``accelerate launch --num_processes 2`` (gloo): each
    process trains half of every step's batch and the gradients are averaged, so the weights and
    the logged losses are those of one process on the whole batch, to float rounding."""
    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDWB_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tiny_pipeline_dir), str(tmp_path / "one")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launch, str(script), str(tiny_pipeline_dir), str(tmp_path / "two")], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # Adam divides by the root of each gradient's running square: where a gradient is ~0 its first
    # steps are +-lr whatever its size, so rounding-level differences flip a few elements by a whole
    # step. Compared: the distance between the runs against how far training moved the weights
    # (student), the share of elements apart by more than 5 % of a step (pruned: lr 2e-3), and
    # what the weights do (losses, the recovered student's MSE to the teacher)
    initial = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    weights = {(d, v): load_file(tmp_path / d / v / "unet" / "diffusion_pytorch_model.safetensors")
               for d in ("one", "two") for v in ("student", "pruned")}
    a, b = weights["one", "student"], weights["two", "student"]
    assert a.keys() == b.keys() == initial.keys()
    apart = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5
    moved = sum(float(((a[k] - initial[k]).double() ** 2).sum()) for k in a) ** 0.5
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)
    a, b = weights["one", "pruned"], weights["two", "pruned"]
    assert a.keys() == b.keys()
    apart = sum(int(((a[k].float() - b[k].float()).abs() > 0.05 * 2e-3).sum()) for k in a)
    assert apart < 1e-3 * sum(v.numel() for v in a.values()), apart
    rec = {d: json.loads((tmp_path / d / "student" / "sdwb.json").read_text()) for d in ("one", "two")}
    ra, rb = (r["rounds"][0] for r in rec.values())
    assert ra["loss_last"] == pytest.approx(rb["loss_last"], rel=1e-4)  # the global batch's loss
    rec = [json.loads((tmp_path / d / "pruned" / "sdwb.json").read_text())["metrics"]["recovery"]
           for d in ("one", "two")]
    assert rec[0]["distill_mse_after"] == pytest.approx(rec[1]["distill_mse_after"], rel=1e-4)
    assert rec[0]["final_smoothed_losses"] == pytest.approx(rec[1]["final_smoothed_losses"], rel=1e-4)
    with pytest.raises(subprocess.CalledProcessError):  # 3 rows cannot be shared by 2: one line, no work
        subprocess.run([*launch, "-m", "sdwb", "compress", "distill", "--model", str(tiny_pipeline_dir),
                        "--set", "batch=3", "-o", str(tmp_path / "odd")], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "odd").exists()
