"""The guard: a probe generation after quantizing, compared with the float model, before saving.

Why: a quantized model that emits NaN, or images that no longer resemble the float model's, must
never become a variant that looks finished. The probe renders ``guard.prompts`` captions of the
shapes train stream (disjoint from the calibration prompts) with the float and the quantized
model, image ``i`` from the same seed, and computes PSNR over all probe pixels (uint8 images,
peak 255). NaN/inf in an output, or PSNR below ``guard.min_psnr``, raises one ``SdwbError`` line;
the caller builds the variant inside :func:`sdwb.runs.atomic_dir`, so nothing is written.
"""

from __future__ import annotations

import numpy as np

from compress.calibration import calibration_prompts
from sdwb.errors import SdwbError
from sdwb.quant.config import GuardConfig

PSNR_CAP = 100.0  # identical images: reported as 100 dB instead of inf (JSON-safe)


def psnr(images_a, images_b) -> float:
    """PSNR (dB) over all pixels of two equally long lists of uint8 images (capped at 100 dB)."""
    a = np.stack([np.asarray(x, dtype=np.float64) for x in images_a])
    b = np.stack([np.asarray(x, dtype=np.float64) for x in images_b])
    mse = float(((a - b) ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * np.log10(255.0**2 / mse))


def probe_prompts(config: GuardConfig) -> list[str]:
    """The probe captions (shapes train stream from ``prompt_offset``)."""
    return calibration_prompts(config.prompts, config.prompt_offset)


def render(pipe, config: GuardConfig) -> list:
    """Probe images of any pipeline (torch or exported: one call contract)."""
    prompts = probe_prompts(config)
    kw = dict(
        steps=config.steps,
        guidance=config.guidance,
        seed=config.seed,
        scheduler=config.scheduler,
        progress=False,
    )
    from sdwb.generate import generate

    return generate(pipe, prompts, **kw)


def check(method: str, reference: list, pipe, config: GuardConfig) -> dict:
    """Render the probe with the quantized ``pipe``; raise unless finite and PSNR >= the floor."""
    try:
        images = render(pipe, config)
    except SdwbError as e:
        if "NaN/inf" in str(e):
            raise SdwbError(
                f"guard: {method} variant produced NaN/inf on the probe generation ({e}); "
                "refusing to save it, nothing was written"
            ) from None
        raise
    except Exception as e:  # a kernel refusing its input (e.g. int8 ranges of NaN activations)
        raise SdwbError(
            f"guard: {method} variant failed on the probe generation ({type(e).__name__}: {e}); "
            "refusing to save it, nothing was written"
        ) from None
    value = psnr(reference, images)
    per_image = [round(psnr([r], [q]), 3) for r, q in zip(reference, images)]
    if not value >= config.min_psnr:
        raise SdwbError(
            f"guard: {method} variant's probe images are {value:.2f} dB PSNR from the float "
            f"model's (floor guard.min_psnr = {config.min_psnr:g} dB, {len(images)} prompts, "
            f"{config.steps} steps); refusing to save it, nothing was written"
        )
    return {
        "psnr": round(value, 3),
        "psnr_per_image": per_image,
        "min_psnr": config.min_psnr,
        "prompts": probe_prompts(config),
        "steps": config.steps,
        "finite": True,
    }
