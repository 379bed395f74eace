"""Channel pruning on SD 1.x- and SD 2.x-shaped UNets: 32 GroupNorm groups over small widths.

Why: the tiny test pipeline (8 groups over 16/32 channels) let any width multiple of 8 through,
so pruning had only ever worked there; real SD checkpoints use diffusers' default 32 groups, and a
GroupNorm over a concatenation (up-path + skip) broke with "80 channels do not split into 32
groups". These tests build each family in code (``sdwb.testing.build_family_pipeline``: diffusers'
own classes, seeded random weights, saved with ``save_pretrained``), prune at ratio 0.3 with no
recovery, and check that the variant reloads, generates, is smaller, keeps every GroupNorm
divisible, and that a ratio the groups cannot honour is reported rather than crashing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from compress.prune import prune
from compress.prune_channels import NormNeeds, group_norm_problems, plan_width
from compress.prune_config import parse_prune_config
from sdwb.errors import SdwbError

NO_RECOVERY = {"ratio": 0.3, "importance": "magnitude", "finetune": {"steps": 0}}


def cfg(**kw):
    return parse_prune_config({**NO_RECOVERY, **kw}, "test")


def unet_out(unet, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    args = {"sample": torch.randn(2, 4, 16, 16, generator=gen), "timestep": torch.tensor([500, 20]),
            "encoder_hidden_states": torch.randn(2, 32, hidden, generator=gen)}
    with torch.no_grad():
        return unet(**args).sample


def marked(family: str, **overrides):
    """The family pipeline with every GroupNorm bias set to 1..C: a kept channel's bias names the
    original channel it was, so tests can see which channels each norm kept."""
    from sdwb.testing import build_family_pipeline

    pipe = build_family_pipeline(family, seed=0, **overrides)
    for m in pipe.unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.bias.copy_(torch.arange(1, m.num_channels + 1, dtype=m.bias.dtype))
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request, tmp_path_factory):
    """(family, source dir, original pipeline, Pruned result, said lines) at ratio 0.3, no recovery."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = marked(request.param)
    pipe.save_pretrained(root / "source")
    said: list[str] = []
    result = prune(str(root / "source"), cfg(), root / "pruned", say=said.append)
    return request.param, root / "source", pipe, result, said


def test_family_prunes_reloads_generates_and_is_smaller(family):
    """The variant reloads through sdwb.loading with identical UNet outputs, is smaller by the one
    MAC counter, keeps every GroupNorm divisible, keeps the family's switches and generates."""
    from sdwb.generate import generate
    from sdwb.loading import load_pipeline
    from sdwb.macs import unet_example_inputs, unet_macs

    name, _source, original, result, _said = family
    hidden = original.unet.config.cross_attention_dim
    loaded = load_pipeline(str(result.path))
    assert torch.equal(unet_out(loaded.unet, hidden), unet_out(result.pipeline.unet, hidden))
    inputs = unet_example_inputs(original)
    before, after = unet_macs(original.unet, inputs), unet_macs(loaded.unet, inputs)
    assert after["gmacs"] < 0.8 * before["gmacs"] and after["params_m"] < 0.8 * before["params_m"]
    assert group_norm_problems(loaded.unet) == []
    norms = [m for m in loaded.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels == m.weight.shape[0] for m in norms)
    if name == "sd2":  # the family's switches survive the round trip
        assert loaded.scheduler.config.prediction_type == "v_prediction"
        assert loaded.unet.config.use_linear_projection and loaded.unet.config.upcast_attention
        assert isinstance(loaded.unet.down_blocks[0].attentions[0].proj_in, nn.Linear)
    image = np.asarray(generate(loaded, ["a small red circle"], steps=2, progress=False)[0], dtype=np.float32)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0


def test_family_summary_says_what_the_ratio_became(family):
    """sdwb.json and the printed line say what ratio 0.3 became under 32 groups: per group the
    requested (0.7 x width) and kept widths (multiples of 32 where a norm is reached), the groups
    left whole and why, and the fraction of parameters actually removed."""
    name, _source, original, result, said = family
    summary = result.metrics["pruned"]
    record = json.loads((result.path / "sdwb.json").read_text())
    assert record["metrics"]["pruned"] == summary  # what the variant's record keeps
    assert summary["requested_ratio"] == 0.3 and summary["norm_groups"] == [32]
    params = result.metrics["unet_params_m"]
    assert summary["achieved_param_ratio"] == pytest.approx(1 - params["after"] / params["before"], abs=1e-3)
    plan = summary["group_plan"]
    assert set(summary["groups"]) <= set(plan) and summary["left_whole_count"] == len(summary["left_whole"])
    for root, [width, kept] in summary["groups"].items():  # pruned groups: [width, kept] as before
        assert plan[root]["width"] == width and plan[root]["kept"] == kept < width
        assert plan[root]["requested"] == pytest.approx(width * 0.7, abs=0.01)
        if plan[root]["norm_groups"] == 32:
            assert kept % 32 == 0, root
    gn_groups = [p for p in plan.values() if p["norm_groups"] == 32]
    assert gn_groups and any(p["kept"] < p["width"] for p in gn_groups)
    line = summary["outcome"]
    assert line in said and line.startswith("ratio 0.3 requested: ")
    assert f"{summary['achieved_param_ratio']:.2f} of UNet parameters removed" in line
    assert "GroupNorm 32 groups force multiples of 32" in line
    if name == "sd1":  # the 32-channel level cannot lose a multiple of 32 at 0.3
        assert summary["left_whole_count"] > 0 and f"{summary['left_whole_count']} groups left whole" in line
        assert all("rounds to nothing removed" in why for why in summary["left_whole"].values())


EQUAL_HALVES = ("up_blocks.0.resnets.0.norm1", "up_blocks.0.resnets.1.norm1")


def test_norm_groups_keep_their_channels(family):
    """Every GroupNorm keeps the same number of channels in each of its original groups where the
    pruned parts cover its groups whole and lose the same share: every norm but the up blocks'
    concatenations, and the concatenations of two equal halves of the deepest level
    (up_blocks.0.resnets.{0,1}.norm1: up-path + skip). In resnets.1 the up-path is a group of its
    own that reaches no other norm: it keeps the same count per block of the concatenation's groups."""
    name, _source, original, result, _said = family
    norms = dict(original.unet.named_modules())
    checked = []
    for path, m in result.pipeline.unet.named_modules():
        if not isinstance(m, nn.GroupNorm):
            continue
        old = norms[path]
        kept = (m.bias.round().long() - 1).tolist()  # the original channel of each kept channel
        assert len(set(kept)) == len(kept) and max(kept) < old.num_channels, path
        size = old.num_channels // old.num_groups
        counts = np.bincount([k // size for k in kept], minlength=old.num_groups)
        concatenation = path.startswith("up_blocks.") and ".resnets." in path and path.endswith(".norm1")
        if path in EQUAL_HALVES or not concatenation:
            assert (counts == counts[0]).all(), (path, counts.tolist())
            checked.append(path)
    assert set(EQUAL_HALVES) <= set(checked) and len(checked) > 10


# --------------------------------------------------------------------------- impossible ratios


def test_widths_equal_to_the_groups_are_left_whole_and_reported(tmp_path):
    """All widths 32 with 32 groups: no GroupNorm can lose a channel; heads and the GEGLU inner
    width still shrink, and the summary and the line say how many groups were left whole, and why."""
    from sdwb.loading import load_pipeline

    pipe = marked("sd1", block_out_channels=(32, 32))
    said: list[str] = []
    result = prune(pipe, cfg(), tmp_path / "v", say=said.append)
    summary = result.metrics["pruned"]
    assert summary["left_whole_count"] >= 10
    why = "32 channels kept in multiples of 32 (GroupNorm 32 groups): ratio 0.3 rounds to nothing removed"
    assert set(summary["left_whole"].values()) == {why}
    assert f"{summary['left_whole_count']} groups left whole" in summary["outcome"]
    assert summary["outcome"] in said
    assert 0 < summary["achieved_param_ratio"] < 0.3 and summary["heads"]
    for m in load_pipeline(str(tmp_path / "v")).unet.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels == 32 or m.num_channels == 64, m  # 64: a concatenation of two 32s


def test_a_ratio_that_removes_nothing_is_refused_with_the_ratio_that_would(tmp_path):
    """Convolution only, every width 32 with 32 groups: the one group without a norm (into the
    upsampler) keeps multiples of round_to 8, so 0.1 removes nothing; the refusal is one line
    naming why and the smallest ratio that removes channels (8 of 32 go once ratio > 0.125)."""
    blocks = {"block_out_channels": (32, 32), "down_block_types": ("DownBlock2D",) * 2,
              "up_block_types": ("UpBlock2D",) * 2, "mid_block_type": None}
    with pytest.raises(SdwbError) as e:
        prune(marked("sd1", **blocks), cfg(ratio=0.1), tmp_path / "v")
    text = str(e.value)
    assert "\n" not in text and text.startswith("ratio 0.1 removes nothing from this UNet: all ")
    assert "GroupNorm 32 groups" in text and text.endswith("a ratio of at least 0.13 would remove channels")
    assert not (tmp_path / "v").exists()
    result = prune(marked("sd1", **blocks), cfg(ratio=0.13))
    assert result.metrics["pruned"]["groups"] and group_norm_problems(result.pipeline.unet) == []


# --------------------------------------------------------------------------- the width rule and the check


def test_plan_width_keeps_group_multiples_and_says_why_not():
    g32 = NormNeeds(32, 32, ("n",))
    assert plan_width(320, 0.3, g32, 8) == (224, 32, None)  # SD 1.5's first level
    assert plan_width(64, 0.3, g32, 8) == (32, 32, None)  # nearest multiple: 44.8 -> 32
    assert plan_width(96, 0.3, g32, 8) == (64, 32, None)
    keep, step, why = plan_width(32, 0.3, g32, 8)
    assert (keep, step) == (32, 32) and "ratio 0.3 rounds to nothing removed" in why
    concat = NormNeeds(32, 1, ("up_blocks.1.resnets.0.norm1",))  # a part of a concatenation
    assert plan_width(64, 0.3, concat, 8)[:2] == (32, 32)  # the old rule kept 48: 48 + 32 = 80
    keep, _, why = plan_width(80, 0.3, concat, 8)
    assert keep == 80 and "not a multiple of the 32 GroupNorm groups of up_blocks.1.resnets.0.norm1" in why
    assert plan_width(40, 0.3, NormNeeds(8, 8), 16)[:2] == (32, 8)  # round_to 16 does not fit 40: 8
    assert plan_width(20, 0.3, NormNeeds(), 8) == (14, 1, None)  # no norm: as kept_width always did


def test_a_group_norm_its_groups_do_not_divide_is_one_clear_line():
    from compress.prune_channels import _check_group_norms
    from sdwb.testing import build_family_pipeline

    unet = build_family_pipeline("sd1").unet
    norm = unet.up_blocks[1].resnets[0].norm1
    norm.weight = nn.Parameter(norm.weight.detach()[:80])
    assert group_norm_problems(unet) == ["up_blocks.1.resnets.0.norm1: 80 channels / 32 groups"]
    with pytest.raises(SdwbError) as e:
        _check_group_norms(unet)
    text = str(e.value)
    assert "\n" not in text and "1 GroupNorm(s)" in text
    assert "up_blocks.1.resnets.0.norm1: 80 channels / 32 groups" in text
