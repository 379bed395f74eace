"""Quality metrics of one variant's images: CLIP score, CMMD, PSNR/SSIM, attribute accuracy.

Why: a compressed variant is only worth its speed-up if it still draws the right thing. Every
number here is computed from saved images and a judge CLIP that shares no weights with the model
under test, so the quality columns of the results are comparable across variants and machines:

- ``clip_score`` (+ ``_lo``/``_hi``): the judge's CLIP score through torchmetrics' code path
  (100 * max(cos, 0)), mean over prompts with a 95 % percentile bootstrap over prompts.
- ``cmmd``: CMMD (Jayasumana et al. 2024, "Rethinking FID"): MMD² with a Gaussian RBF kernel
  (sigma = 10, times 1000) between the judge's L2-normalised image embeddings of the generated
  and the reference images. Like the paper's reference implementation it uses the biased
  (V-statistic, minimum-variance) estimator: it is exactly 0 for a set against itself and never
  negative. The unbiased U-statistic (``cmmd(..., unbiased=True)``) assumes the two sets are
  independent samples, which the bench's sets are not (generated image *i* and reference image
  *i* share a prompt), and then goes negative by about 2000·(1 - mean kernel)/n.
- ``psnr_vs_baseline`` / ``ssim_vs_baseline``: torchmetrics PSNR and SSIM (data range 1.0) per
  (image, baseline image) pair for the same prompt and seed, averaged over pairs. PSNR of an
  identical pair is ``inf`` and is kept as ``inf`` (never capped): the mean is ``inf`` as soon
  as one pair is pixel-identical, which is what "the same images as the baseline" should read.
- ``color_acc`` / ``shape_acc`` / ``position_acc`` (+ ``_lo``/``_hi``): the judge's zero-shot
  attributes against the expected ones, with a 95 % bootstrap over prompts.

Every key is always present; a metric whose inputs are missing is ``None`` (not applicable),
never 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sdwb import shapes
from sdwb.errors import SdwbError
from sdwb.judge import SCORED_ATTRIBUTES, bootstrap_interval, to_uint8_chw

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
ACCURACY_ATTRIBUTES = ("color", "shape", "position")
QUALITY_KEYS = (
    "clip_score", "clip_score_lo", "clip_score_hi",
    "cmmd",
    "psnr_vs_baseline", "ssim_vs_baseline",
    *(f"{a}_acc{s}" for a in ACCURACY_ATTRIBUTES for s in ("", "_lo", "_hi")),
)


def to_float_nchw(images) -> torch.Tensor:
    """PIL images / HWC uint8 arrays -> (N, 3, H, W) float tensor in [0, 1]."""
    return to_uint8_chw(images).float().div_(255.0)


def cmmd(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False) -> float:
    """CMMD between embedding sets ``x`` (m, D) and ``y`` (n, D): 1000 * MMD² with an RBF kernel.

    Default: the biased estimator of the CMMD reference code (see the module docstring).
    """
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * CMMD_SIGMA**2)
    k_xx = torch.exp(-gamma * torch.cdist(x, x).square())
    k_yy = torch.exp(-gamma * torch.cdist(y, y).square())
    k_xy = torch.exp(-gamma * torch.cdist(x, y).square())
    if unbiased:
        m, n = len(x), len(y)
        if m < 2 or n < 2:
            raise SdwbError(f"cmmd: the unbiased estimator needs >= 2 images per set, got {m} and {n}")
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    else:
        xx, yy = k_xx.mean(), k_yy.mean()
    return float(CMMD_SCALE * (xx + yy - 2.0 * k_xy.mean()))


def psnr_ssim(images, baseline_images) -> tuple[float, float]:
    """Mean per-pair PSNR (dB, ``inf`` for identical pairs) and SSIM of images vs baseline images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    # float64: in float32 SSIM of identical flat images comes out as 0.999998, not 1
    preds, target = to_float_nchw(images).double(), to_float_nchw(baseline_images).double()
    if preds.shape != target.shape:
        raise SdwbError(
            f"baseline_images: expected images of shape {tuple(preds.shape[1:])} like the generated "
            f"ones, got {tuple(target.shape[1:])}"
        )
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return float(psnr.double().mean()), float(ssim.double().mean())


def _check_length(name: str, values, n: int) -> None:
    if values is not None and len(values) != n:
        raise SdwbError(f"{name}: expected {n} items (one per generated image), got {len(values)}")


def _check_attributes(expected_attributes) -> None:
    for i, attrs in enumerate(expected_attributes):
        for name in ACCURACY_ATTRIBUTES:
            allowed = shapes.ATTRIBUTE_VALUES[name]
            if not isinstance(attrs, dict) or attrs.get(name) not in allowed:
                got = attrs.get(name) if isinstance(attrs, dict) else attrs
                raise SdwbError(f"expected_attributes[{i}].{name}: expected one of {', '.join(allowed)}, "
                                f"got {got!r}")


def _interval(prefix: str, values, n_resamples: int, seed: int) -> dict[str, float]:
    mean, lo, hi = bootstrap_interval(values, n_resamples=n_resamples, seed=seed)
    return {prefix: mean, f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def compute_quality(
    images: Sequence,
    prompts: Sequence[str] | None,
    *,
    judge=None,
    expected_attributes: Sequence[dict[str, str]] | None = None,
    reference_images: Sequence | None = None,
    baseline_images: Sequence | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float | None]:
    """All quality columns of one variant (keys ``QUALITY_KEYS``; ``None`` where not applicable).

    ``images`` are the variant's images (PIL or HWC uint8) in prompt order; ``prompts``,
    ``expected_attributes`` and ``baseline_images`` are aligned with them; ``reference_images``
    (for CMMD) may have any size >= 1. ``judge`` is a ``sdwb.judge.ShapesJudge`` or a judge name
    for ``sdwb.judge.load_judge``. CLIP score needs judge + prompts, CMMD judge + reference
    images, accuracies judge + expected attributes, PSNR/SSIM baseline images.
    """
    n = len(images)
    if n == 0:
        raise SdwbError("images: expected at least one generated image, got none")
    _check_length("prompts", prompts, n)
    _check_length("expected_attributes", expected_attributes, n)
    _check_length("baseline_images", baseline_images, n)
    if reference_images is not None and len(reference_images) == 0:
        raise SdwbError("reference_images: expected at least one reference image, got none")
    if n_resamples < 1:
        raise SdwbError(f"n_resamples: expected a positive integer, got {n_resamples}")
    if expected_attributes is not None:
        _check_attributes(expected_attributes)
    if isinstance(judge, str):
        from sdwb.judge import load_judge

        judge = load_judge(judge)

    out: dict[str, float | None] = dict.fromkeys(QUALITY_KEYS)
    if judge is not None and prompts is not None:
        scores = judge.clip_scores(list(images), list(prompts))
        out.update(_interval("clip_score", scores, n_resamples, seed))
    if judge is not None and reference_images is not None:
        generated = judge.image_embeddings(list(images))
        out["cmmd"] = cmmd(generated, judge.image_embeddings(list(reference_images)))
    if baseline_images is not None:
        out["psnr_vs_baseline"], out["ssim_vs_baseline"] = psnr_ssim(images, baseline_images)
    if judge is not None and expected_attributes is not None:
        # the judge also scores size/background; unknown ones (None) just count as wrong there
        expected = [{**dict.fromkeys(SCORED_ATTRIBUTES), **a} for a in expected_attributes]
        correct = judge.classify(list(images), expected).correct
        for attr in ACCURACY_ATTRIBUTES:
            out.update(_interval(f"{attr}_acc", correct[attr].astype(np.float64), n_resamples, seed))
    return out
