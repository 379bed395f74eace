"""The tiny-shapes noise schedule and UNet training targets (zero terminal SNR, v-prediction)."""

import torch
from diffusers import DDIMScheduler

from sdwb.tiny_arch import scheduler_config
from sdwb.train.unet import min_snr_weights, training_scheduler, training_target


def test_last_training_step_carries_no_signal_so_layout_must_come_from_the_prompt():
    sched = training_scheduler()
    assert float(sched.alphas_cumprod[-1]) == 0.0
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 999])
    assert torch.equal(sched.add_noise(x0, noise, t), noise)
    # v at zero SNR is -x0: the model must predict the clean latent from the text alone
    assert torch.allclose(training_target(sched, x0, noise, t), -x0, atol=1e-6)


def test_sampling_starts_at_pure_noise():
    ddim = DDIMScheduler(**scheduler_config())
    for steps in (4, 25, 50):
        ddim.set_timesteps(steps)
        assert int(ddim.timesteps[0]) == 999


def test_v_weights_keep_the_highest_noise_levels_trained():
    sched = training_scheduler()
    t = torch.tensor([0, 250, 500, 750, 999])
    w = min_snr_weights(sched, t, gamma=5.0)
    assert torch.all(w > 0) and torch.all(w <= 1.0 + 1e-6)
    assert float(w[-1]) == 1.0  # plain Min-SNR for v would give 0 here
    assert float(w[0]) < 0.05  # the near-clean end is down-weighted (capped at gamma)
    assert torch.equal(min_snr_weights(sched, t, None), torch.ones(5))


def test_caption_dropout_curriculum_switches_at_its_step_fractions():
    from sdwb.train.config import UnetTrain

    uc = UnetTrain(
        steps=100,
        caption_dropout=0.1,
        min_snr_gamma=5.0,
        phases=[
            {"start": 0.6, "caption_dropout": 0.3, "min_snr_gamma": None},
            {"start": 0.8, "caption_dropout": 0.5, "min_snr_gamma": None, "agreement_weight": 3.0},
        ],
    )
    assert uc.phase_at(0) == (0.1, 5.0, 0.0)
    assert uc.phase_at(59) == (0.1, 5.0, 0.0)
    assert uc.phase_at(60) == (0.3, None, 0.0)
    assert uc.phase_at(80) == (0.5, None, 3.0)
    assert uc.phase_at(99).agreement_weight == 3.0
    # no phases: top-level values throughout
    assert UnetTrain(steps=10, phases=[], agreement_weight=1.0).phase_at(9) == (0.1, 5.0, 1.0)


def test_agreement_rows_are_the_captioned_low_noise_samples():
    import torch

    from sdwb.train.unet import agreement_rows

    t = torch.tensor([0, 399, 400, 999, 10, 10])
    dropped = torch.tensor([False, False, False, False, True, False])
    assert agreement_rows(t, dropped, 400, 3.0).tolist() == [True, True, False, False, False, True]
    assert not agreement_rows(t, dropped, 400, 0.0).any()  # weight 0: the loss is off


def test_shipped_config_trains_branch_agreement_late():
    from sdwb.train.config import load_train_config

    uc = load_train_config("configs/baseline/tiny-shapes.yaml").unet
    assert uc.phase_at(0).agreement_weight == 0.0
    assert uc.phase_at(uc.steps - 1).agreement_weight > 0
    assert load_train_config("configs/baseline/tiny-shapes.yaml") == load_train_config(None)


def test_curriculum_phases_out_of_order_are_a_config_error(tmp_path):
    import pytest

    from sdwb.errors import SdwbError
    from sdwb.train.config import load_train_config

    bad = tmp_path / "train.yaml"
    bad.write_text(
        "unet:\n  phases:\n"
        "    - {start: 0.8, caption_dropout: 0.5}\n"
        "    - {start: 0.6, caption_dropout: 0.3}\n"
    )
    with pytest.raises(SdwbError, match="unet: .*phases must start at strictly increasing"):
        load_train_config(bad)
    bad.write_text("unet:\n  phases:\n    - {start: 1.5, caption_dropout: 0.5}\n")
    with pytest.raises(SdwbError, match="unet.phases.0.start"):
        load_train_config(bad)


def test_fast_with_a_config_file_keeps_its_settings_at_the_fast_sizes():
    from pathlib import Path

    from sdwb.train.config import fast_config, load_train_config

    shipped = Path(__file__).resolve().parents[1] / "configs" / "baseline" / "tiny-shapes.yaml"
    full, fast = load_train_config(shipped), load_train_config(shipped, fast=True)
    assert fast.unet.steps == fast_config().unet.steps < full.unet.steps
    assert fast.judge.eval_images == fast_config().judge.eval_images
    assert fast.unet.phases == full.unet.phases and fast.unet.lr_floor == full.unet.lr_floor
    assert fast.unet.lr == full.unet.lr and fast.vae.kl_weight == full.vae.kl_weight
