"""Step distillation: the DDIM target against diffusers, training, resuming, the saved student, the CLI.

Everything runs on the ~0.3 M-param tiny pipeline (``sdwb.testing``) on the CPU with a handful
of optimizer steps; what is asserted are properties (exact landing on diffusers' two-step
result, loss going down on a fixed batch, bit-identical resume, one UNet call of batch B per
step), never that a few steps produce good images.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from compress.ddim_targets import check_nested, ddim_grid, student_scheduler_config, student_target
from compress.distill import RoundPlan, distill
from compress.distill_config import parse_distill_config
from compress.progressive import round_loss, teacher_prediction, teacher_two_steps
from sdwb.errors import SdwbError
from sdwb.testing import build_tiny_pipeline

PROMPTS = ["a small red circle at the top on a gray background", "a large blue square on the left"]
FAST = {"budget": 3, "batch": 4, "latent_pool": 12, "checkpoint_every": 2, "warmup": 1}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline(seed=0)


def _cond(pipe, prompts):
    from sdwb.train.unet import tokenize

    with torch.no_grad():
        return pipe.text_encoder(tokenize(prompts, pipe.tokenizer))[0]


@pytest.fixture(scope="module")
def student_dir(tiny_pipeline_dir, tmp_path_factory):
    """tiny, distilled 8 -> 4 steps with guidance distilled in (3 optimizer steps)."""
    out = tmp_path_factory.mktemp("distill") / "gd4"
    cfg = parse_distill_config({"teacher_steps": 8, "student_steps": 4, "guidance_distill": True, **FAST})
    distill(str(tiny_pipeline_dir), cfg, out, progress=False)
    return out


# --------------------------------------------------------------------------- the target


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("teacher_steps", [64, 8])
def test_two_step_target_lands_on_diffusers_two_ddim_steps(tiny, teacher_steps, prediction_type):
    from diffusers import DDIMScheduler

    config = student_scheduler_config({**tiny.scheduler.config, "prediction_type": prediction_type})
    tg, sg = ddim_grid(config, teacher_steps), ddim_grid(config, teacher_steps // 2)
    check_nested(tg, sg)
    teacher_sched, student_sched = DDIMScheduler.from_config(config), DDIMScheduler.from_config(config)
    teacher_sched.set_timesteps(teacher_steps)
    student_sched.set_timesteps(teacher_steps // 2)
    assert torch.equal(student_sched.timesteps, sg.timesteps) and int(sg.timesteps[0]) == 999
    j = torch.tensor([0, teacher_steps // 4, teacher_steps // 2 - 1])  # first (alpha_t -> 0), middle, last
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 16, 16, generator=gen)
    cond = _cond(tiny, [PROMPTS[0], PROMPTS[1], ""])
    plan = RoundPlan(tg, sg, 1.0, prediction_type, "truncated-snr")
    ours = teacher_two_steps(tiny.unet, z, j, cond, None, plan)
    x0, target = student_target(z, ours, sg.alpha_bar[j], sg.alpha_bar_prev[j], prediction_type)
    assert torch.isfinite(x0).all() and torch.isfinite(target).all()
    with torch.no_grad():
        for b in range(3):
            ref = z[b : b + 1]
            for i in (2 * int(j[b]), 2 * int(j[b]) + 1):  # two steps of plain diffusers DDIM (eta 0)
                t = teacher_sched.timesteps[i]
                ref = teacher_sched.step(tiny.unet(ref, t, cond[b : b + 1]).sample, t, ref).prev_sample
            torch.testing.assert_close(ours[b : b + 1], ref, rtol=1e-5, atol=1e-5)
            # the student's single diffusers step from the derived target lands on the same point
            landed = student_sched.step(target[b : b + 1], sg.timesteps[j[b]], z[b : b + 1]).prev_sample
            torch.testing.assert_close(landed, ref, rtol=1e-4, atol=1e-4)


def test_leading_grids_do_not_nest_and_trailing_ones_do(tiny):
    leading = {**tiny.scheduler.config, "timestep_spacing": "leading"}
    with pytest.raises(SdwbError, match="not every other point"):
        check_nested(ddim_grid(leading, 64), ddim_grid(leading, 32))
    config = student_scheduler_config(tiny.scheduler.config)
    assert config["timestep_spacing"] == "trailing"
    for n in (64, 32, 16, 8, 4, 2):
        check_nested(ddim_grid(config, n), ddim_grid(config, n // 2))


def test_guided_teacher_is_uncond_plus_w_times_difference(tiny):
    gen = torch.Generator().manual_seed(2)
    z, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([999, 499])
    cond, uncond = _cond(tiny, PROMPTS), _cond(tiny, ["", ""])
    with torch.no_grad():
        c, u = tiny.unet(z, t, cond).sample, tiny.unet(z, t, uncond).sample
    guided = teacher_prediction(tiny.unet, z, t, cond, uncond, 4.0)
    torch.testing.assert_close(guided, u + 4.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, c, atol=1e-3)


# --------------------------------------------------------------------------- training


def test_round_loss_goes_down_on_a_fixed_batch(tiny):
    config = student_scheduler_config(tiny.scheduler.config)
    plan = RoundPlan(ddim_grid(config, 8), ddim_grid(config, 4), 3.0, "epsilon", "truncated-snr")
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    j = torch.tensor([0, 1, 2, 3])
    cond, uncond = _cond(tiny, PROMPTS * 2), _cond(tiny, [""] * 4)
    teacher = tiny.unet
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(12):
        loss, _ = round_loss(student, teacher, x0, noise, j, cond, uncond, plan)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 0 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", ["progressive", "lcm"])
def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                               method, fixed_threads):
    """lcm: the target network is checkpointed too, so the resumed run is bit-identical as well."""
    from compress import distill as distill_mod

    settings = {**FAST, "budget": 4, "method": method}
    cfg = parse_distill_config({"teacher_steps": 4, "student_steps": 2, **settings})
    whole = distill(str(tiny_pipeline_dir), cfg, work_dir=tmp_path / "whole", progress=False)
    original = distill_mod._Round.step

    def crash_at_3(self, step, lr_factor):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step, lr_factor)

    monkeypatch.setattr(distill_mod._Round, "step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        distill(str(tiny_pipeline_dir), cfg, work_dir=tmp_path / "resumed", progress=False)
    checkpoint = tmp_path / "resumed" / "round-1-4to2" / "checkpoint"
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["step"] == 2  # checkpoint_every 2: steps 0-1 are saved, step 2 is redone
    monkeypatch.setattr(distill_mod._Round, "step", original)
    resumed = distill(str(tiny_pipeline_dir), cfg, work_dir=tmp_path / "resumed", progress=False)
    a, b = whole.pipeline.unet.state_dict(), resumed.pipeline.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], build_tiny_pipeline(0).unet.state_dict()["conv_in.weight"])
    other = parse_distill_config({"teacher_steps": 4, "student_steps": 2, **{**FAST, "lr": 5e-4}})
    with pytest.raises(SdwbError, match="another config"):
        distill(str(tiny_pipeline_dir), other, work_dir=tmp_path / "resumed", progress=False)


# --------------------------------------------------------------------------- the saved student


def test_saved_student_records_and_loads_its_inference_defaults(student_dir):
    from sdwb.inference import for_pipeline, for_spec
    from sdwb.loading import load_pipeline

    record = json.loads((student_dir / "sdwb.json").read_text())
    assert record["stage"] == "distill" and record["method"] == "progressive"
    assert record["inference"]["guidance_distilled"] == 7.5
    assert [(r["teacher_steps"], r["student_steps"]) for r in record["rounds"]] == [(8, 4)]
    assert not Path(str(student_dir) + ".work").exists()  # work dir removed on success
    expected = {"steps": 4, "scheduler": "ddim", "guidance": 1.0}
    assert for_spec(str(student_dir)) == expected
    pipe = load_pipeline(str(student_dir))
    assert for_pipeline(pipe) == expected
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(4)  # plain diffusers reproduces the training grid
    assert torch.equal(pipe.scheduler.timesteps, ddim_grid(pipe.scheduler.config, 4).timesteps)
    # a quantized or exported child keeps its parent's defaults through the record chain
    child = student_dir.parent / "child"
    child.mkdir()
    (child / "sdwb.json").write_text(json.dumps({"stage": "quantize", "parent": {"variant": record}}))
    assert for_spec(str(child)) == expected


def test_guidance_distilled_student_makes_one_unet_call_of_batch_b_per_step(student_dir):
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline

    pipe = load_pipeline(str(student_dir))
    batches = []
    hook = pipe.unet.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    try:
        generate(pipe, PROMPTS, batch=2, progress=False)  # no steps / guidance: the model's own
        assert batches == [2] * 4
        batches.clear()
        generate(pipe, PROMPTS, batch=2, guidance=7.5, progress=False)  # explicit CFG: 2B per call
        assert batches == [4] * 4
    finally:
        hook.remove()


def test_generate_cli_and_bench_use_the_students_defaults(student_dir, tmp_path, capsys):
    from bench.scenario import quick_config
    from sdwb.app import cli

    out = tmp_path / "img.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", str(student_dir), "-p", PROMPTS[0], "-o", str(out), "--no-progress",
                  "--device", "cpu"])
    assert info.value.code == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())["config"]["generate"]
    assert (meta["steps"], meta["guidance"], meta["scheduler"]) == (4, 1.0, "ddim")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(student_dir), "-p", PROMPTS[0], "-o", str(out), "--no-progress",
                  "--device", "cpu", "--steps", "2"])
    assert json.loads(out.with_suffix(".json").read_text())["config"]["generate"]["steps"] == 2
    row = quick_config([str(student_dir)]).scenarios()[0]
    assert (row.steps, row.guidance) == (4, 1.0)
    row = quick_config([str(student_dir)], steps=8).scenarios()[0]
    assert (row.steps, row.guidance) == (8, 1.0)


def test_a_guidance_distilled_student_distils_further_keeping_guidance_1(student_dir, tmp_path):
    from sdwb.inference import for_spec

    cfg = parse_distill_config({"teacher_steps": 4, "student_steps": 2, **FAST})
    distill(str(student_dir), cfg, tmp_path / "gd2", progress=False)
    record = json.loads((tmp_path / "gd2" / "sdwb.json").read_text())
    assert record["inference"]["guidance_distilled"] == 7.5
    assert record["parent"]["variant"]["stage"] == "distill"
    assert for_spec(str(tmp_path / "gd2")) == {"steps": 2, "scheduler": "ddim", "guidance": 1.0}
    with pytest.raises(SdwbError, match="already distilled"):
        distill(str(student_dir), cfg.model_copy(update={"guidance_distill": True}), tmp_path / "x",
                progress=False)
    with pytest.raises(SdwbError, match="--teacher-steps 4"):
        distill(str(student_dir), parse_distill_config({"teacher_steps": 8, "student_steps": 2, **FAST}),
                tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_guidance_budget_sets_the_length_of_the_guided_round_only(tiny_pipeline_dir, tmp_path):
    cfg = parse_distill_config({"teacher_steps": 8, "student_steps": 2, "guidance_distill": True,
                                **FAST, "budget": 2, "guidance_budget": 4})
    result = distill(str(tiny_pipeline_dir), cfg, tmp_path / "gd2", progress=False)
    steps = [(r["guidance_teacher"], r["optimizer_steps"]) for r in result.rounds]
    assert steps == [(7.5, 4), (None, 2)]


def test_shipped_distill_configs_are_valid():
    from compress.distill_config import load_distill_config

    root = Path(__file__).resolve().parents[1] / "configs" / "distill"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/distill/*.yaml missing"
    for path in files:
        load_distill_config(path)
    four = load_distill_config(root / "distill4.yaml")
    assert four.round_steps() == [(32, 16), (16, 8), (8, 4)] and four.guidance_distill
    assert four.guidance == 4.0 and four.round_budget(True) == ("steps", 1200.0)
    lcm = load_distill_config(root / "lcm4.yaml")
    assert lcm.method == "lcm" and lcm.round_steps() == [(50, 4)] and lcm.guidance_distill


def test_onnx_export_of_a_student_keeps_its_defaults(student_dir, tmp_path, capsys):
    from export.onnx import export_onnx
    from sdwb.app import cli
    from sdwb.inference import for_spec

    onnx_dir = tmp_path / "onnx"
    export_onnx(str(student_dir), onnx_dir, components=["text_encoder", "unet", "vae_decoder"])
    assert for_spec(str(onnx_dir)) == {"steps": 4, "scheduler": "ddim", "guidance": 1.0}
    assert json.loads((onnx_dir / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == (
        "trailing")
    out = tmp_path / "ort.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--backend", "onnxruntime", "--model", str(onnx_dir), "-p", PROMPTS[0], "-o",
                  str(out), "--no-progress", "--device", "cpu"])
    assert info.value.code == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())["config"]["generate"]
    assert (meta["steps"], meta["guidance"]) == (4, 1.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--teacher-steps", "64", "--student-steps", "6"], "power of two"),
        (["--teacher-steps", "8", "--student-steps", "8"], "fewer than"),
        (["--teacher-steps", "4", "--student-steps", "8"], "fewer than"),
        (["--method", "lcm-ish"], "unknown method"),
        (["--method", "lcm", "--no-guidance-distill"], "always distils guidance"),
        (["--method", "lcm", "--teacher-steps", "8", "--student-steps", "16"], "at most teacher_steps"),
        (["--budget", "10 parsecs"], "budget"),
        (["--set", "guidance_budget=0"], "guidance_budget"),
        (["--method", "lcm", "--set", "guidance_budget=100"], "one run"),
        (["--set", "student_step=4"], "unknown key"),
    ],
)
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, args, expected):
    from sdwb.app import cli

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", "distill", "--model", "builtin:tiny-shapes", "-o", str(out), *args])
    err = capsys.readouterr().err
    assert info.value.code != 0
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_unshipped_4step_builtin_names_the_command_that_makes_it(monkeypatch, tmp_path):
    from sdwb import zoo
    from sdwb.loading import load_pipeline

    monkeypatch.setattr(zoo, "assets_dir", lambda: tmp_path)
    with pytest.raises(SdwbError) as e:
        load_pipeline("builtin:tiny-shapes-4step")
    text = str(e.value)
    assert "\n" not in text and "not been trained" in text and "sdwb compress distill" in text


# --------------------------------------------------------------------------- latent consistency (lcm)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_output_is_lcm_schedulers_denoised(tiny, prediction_type):
    """The student is trained on the quantity LCMScheduler.step calls ``denoised`` (its one-step
    sample), so plain diffusers samples it correctly."""
    from diffusers import LCMScheduler

    from compress.lcm import boundary_scalings, consistency_output

    config = {**student_scheduler_config(tiny.scheduler.config), "prediction_type": prediction_type}
    sched = LCMScheduler.from_config(config, original_inference_steps=50)
    sched.set_timesteps(4)
    grid = ddim_grid(config, 50)
    gen = torch.Generator().manual_seed(4)
    for t in sched.timesteps.tolist():
        z, pred = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        assert t in grid.timesteps.tolist()  # the LCM sampler's steps lie on the teacher's grid
        sched._step_index = None
        expected = sched.step(pred, t, z).denoised
        abar = sched.alphas_cumprod[t].reshape(1)
        ours = consistency_output(sched, pred, z, torch.tensor([t]), abar)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    c_skip, c_out = boundary_scalings(sched, torch.tensor([-1, 0, 19, 999]))
    assert c_skip[0] == c_skip[1] == 1.0 and c_out[0] == c_out[1] == 0.0  # identity at the boundary
    assert c_out[3] > 0.99


def test_lcm_loss_goes_down_on_a_fixed_batch(tiny):
    from diffusers import LCMScheduler

    from compress.lcm import lcm_loss, update_target
    from compress.progressive import unet_call as _unet

    config = student_scheduler_config(tiny.scheduler.config)
    grid = ddim_grid(config, 50)
    sched = LCMScheduler.from_config({**config, "prediction_type": "epsilon"}, original_inference_steps=50)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    n = torch.tensor([0, 10, 30, 49])  # 49: the last point, whose target is the teacher's own step
    cond, uncond = _cond(tiny, PROMPTS * 2), _cond(tiny, [""] * 4)
    student = copy.deepcopy(tiny.unet).train().requires_grad_(True)
    target = copy.deepcopy(tiny.unet).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)

    def teacher_fn(z, t):
        return teacher_prediction(tiny.unet, z, t, cond, uncond, 3.0)

    def unet_fn(model, z, t):
        return _unet(model, z, t, cond, "fp32")

    losses = []
    for _ in range(12):
        loss, _ = lcm_loss(student, target, teacher_fn, unet_fn, x0, noise, n, grid, sched, 1e-3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_target(target, student, 0.95)
        losses.append(loss.item())
    assert losses[0] > 0 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    moved = target.state_dict()["conv_in.weight"] - tiny.unet.state_dict()["conv_in.weight"]
    assert moved.abs().max() > 0  # the target network follows the student


def test_lcm_student_samples_with_lcm_scheduler_one_call_per_step(tiny_pipeline_dir, tmp_path):
    from diffusers import LCMScheduler

    from sdwb.generate import generate
    from sdwb.inference import for_spec
    from sdwb.loading import load_pipeline

    cfg = parse_distill_config({"method": "lcm", "teacher_steps": 50, "student_steps": 4, **FAST})
    out = tmp_path / "lcm4"
    result = distill(str(tiny_pipeline_dir), cfg, out, progress=False)
    assert result.rounds[0]["guidance_teacher"] == 7.5 and result.rounds[0]["optimizer_steps"] == 3
    record = json.loads((out / "sdwb.json").read_text())
    assert record["method"] == "lcm" and record["inference"]["original_inference_steps"] == 50
    assert for_spec(str(out)) == {"steps": 4, "scheduler": "lcm", "guidance": 1.0}
    pipe = load_pipeline(str(out))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    batches = []
    pipe.unet.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    first = generate(pipe, PROMPTS, batch=2, progress=False)
    assert batches == [2] * 4  # guidance distilled in: one call of batch B per step, 4 steps
    again = generate(pipe, PROMPTS, batch=1, progress=False)  # LCM re-noises: still seeded per image
    import numpy as np

    # the same image whatever the batch (another seed would differ everywhere); not bitwise: the
    # CPU kernels may sum in another order for a batch of 2 than of 1
    for a, b in zip(first, again):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2, diff.max()
    # exported, it keeps the LCM sampler and matches torch on ONNX Runtime

    from export.onnx import export_onnx
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.generate import generate

    onnx_dir = tmp_path / "onnx"
    export_onnx(str(out), onnx_dir, components=["text_encoder", "unet", "vae_decoder"])
    assert for_spec(str(onnx_dir)) == {"steps": 4, "scheduler": "lcm", "guidance": 1.0}
    ort = OrtStableDiffusionPipeline.from_export(onnx_dir)
    ort_images = generate(ort, PROMPTS, steps=4, guidance=1.0, scheduler="lcm", progress=False)
    for a, b in zip(first, ort_images):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2, diff.max()


def test_lcm_teacher_grid_must_divide_the_training_timesteps(tiny_pipeline_dir, tmp_path):
    cfg = parse_distill_config({"method": "lcm", "teacher_steps": 48, "student_steps": 4, **FAST})
    with pytest.raises(SdwbError, match="divides the 1000 training timesteps"):
        distill(str(tiny_pipeline_dir), cfg, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_every_registered_distill_method_is_a_config_choice_and_trains_its_own_way():
    """The registry is the one list: the config's method choices are exactly the registered ones."""
    import typing

    from compress.distill_config import DistillConfig
    from compress.distill_methods import METHODS

    choices = typing.get_args(DistillConfig.model_fields["method"].annotation)
    assert set(choices) == set(METHODS) == {"progressive", "lcm"}
    for name, method in METHODS.items():
        cfg = parse_distill_config({"method": name, "teacher_steps": 8, "student_steps": 2})
        assert cfg.round_steps() == method.round_steps(cfg) and cfg.rounds == len(cfg.round_steps())
    with pytest.raises(SdwbError, match="unknown method 'consistency'"):
        parse_distill_config({"method": "consistency"})


# ------------------------------------------------------------------ start points on the teacher's paths


def test_teacher_paths_are_diffusers_guided_ddim_latents_at_the_students_points(tiny):
    """Each kept latent is where plain diffusers DDIM with CFG (the pipeline's formula) stands at
    teacher point 2j, from the same noise: the student starts where it will walk at inference."""
    from diffusers import DDIMScheduler

    from compress.trajectories import teacher_trajectories
    from sdwb.conditioning import TextConditioner
    from sdwb.train.unet import tokenize

    config = student_scheduler_config(tiny.scheduler.config)
    plan = RoundPlan(ddim_grid(config, 8), ddim_grid(config, 4), 3.0, config["prediction_type"],
                     "truncated-snr")
    ids = tokenize(PROMPTS, tiny.tokenizer)
    empty = tokenize([""], tiny.tokenizer)[0]
    paths = teacher_trajectories(tiny.unet, TextConditioner(tiny), ids, empty, plan, 3,
                                 torch.Generator().manual_seed(4), batch=2)
    assert paths["z"].shape == (3, 4, 4, 16, 16) and paths["input_ids"].shape == (3, ids.shape[1])
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(8)
    with torch.no_grad():
        for row in range(3):
            cond = tiny.text_encoder(paths["input_ids"][row : row + 1])[0]
            uncond = tiny.text_encoder(empty[None])[0]
            z = paths["z"][row, 0:1].clone()  # point 0 is the path's noise
            for i, t in enumerate(sched.timesteps[:6]):
                if i % 2 == 0:
                    torch.testing.assert_close(z, paths["z"][row, i // 2 : i // 2 + 1], rtol=1e-4, atol=1e-4)
                u, c = tiny.unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
                z = sched.step(u + 3.0 * (c - u), t, z).prev_sample
            torch.testing.assert_close(z, paths["z"][row, 3:4], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(paths["z"][:, 0], paths["z"][:, 3], atol=1e-2)  # the paths move


def test_trajectory_rows_start_on_the_paths_and_the_rest_on_noised_data(tiny_pipeline_dir, tmp_path,
                                                                        monkeypatch):
    """With trajectory_fraction 0.5 half of each batch starts on a teacher path (its latent and its
    caption), the other half at x0 noised to j; the round records how many paths it sampled."""
    from compress import distill as distill_mod

    seen = []
    original = distill_mod._Round.batch

    def spy(self, step):
        out = original(self, step)
        seen.append((self, out))
        return out

    monkeypatch.setattr(distill_mod._Round, "batch", spy)
    cfg = parse_distill_config({"teacher_steps": 8, "student_steps": 4, "guidance_distill": True, **FAST,
                                "trajectory_fraction": 0.5, "trajectory_pool": 5})
    result = distill(str(tiny_pipeline_dir), cfg, tmp_path / "gd4t", progress=False)
    assert result.rounds[0]["trajectory_paths"] == 5 and result.rounds[0]["trajectory_seconds"] >= 0
    record = json.loads((tmp_path / "gd4t" / "sdwb.json").read_text())
    assert record["config"]["trajectory_fraction"] == 0.5
    rnd, (x0, noise, j, cond, uncond, z_t) = seen[0]
    paths = rnd.trajectories["z"]
    for row in range(2):  # 0.5 of batch 4: rows 0-1 are path latents at their point j
        assert any(torch.equal(z_t[row], paths[p, j[row]]) for p in range(len(paths)))
    from compress.progressive import start_points

    torch.testing.assert_close(z_t[2:], start_points(x0[2:], noise[2:], j[2:], rnd.plan))
    assert not any(torch.equal(z_t[2], paths[p, j[2]]) for p in range(len(paths)))


def test_trajectory_fraction_is_refused_for_a_method_that_draws_its_own_starts():
    with pytest.raises(SdwbError, match="trajectory_fraction: method lcm"):
        parse_distill_config({"method": "lcm", "teacher_steps": 8, "student_steps": 2,
                              "trajectory_fraction": 0.5})
    with pytest.raises(SdwbError, match="trajectory_fraction"):
        parse_distill_config({"trajectory_fraction": 1.5})


def test_path_rows_keep_the_caption_dropout_of_a_student_sampled_with_cfg(tiny_pipeline_dir, tmp_path,
                                                                          monkeypatch):
    """Without guidance distillation the student keeps its unconditional branch: rows that start on a
    teacher path (here every row) are dropped to the empty prompt at caption_dropout like data rows;
    path captions are never empty, so an empty row can only come from the dropout."""
    from compress import distill as distill_mod

    captured = []
    embed = distill_mod._Round._embed

    def record(self, ids):
        captured.append((self, ids.clone()))
        return embed(self, ids)

    monkeypatch.setattr(distill_mod._Round, "_embed", record)
    cfg = parse_distill_config({"teacher_steps": 4, "student_steps": 2, **FAST, "budget": 1,
                                "caption_dropout": 0.9, "trajectory_fraction": 1.0, "trajectory_pool": 3})
    distill(str(tiny_pipeline_dir), cfg, work_dir=tmp_path / "w", progress=False)
    rnd, ids = next((r, i) for r, i in captured if len(i) == FAST["batch"])  # the first training batch
    assert not any(bool((row == rnd.empty_ids).all()) for row in rnd.trajectories["input_ids"])
    assert any(bool((row == rnd.empty_ids).all()) for row in ids)
