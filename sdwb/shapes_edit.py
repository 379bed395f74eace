"""``builtin:shapes-edit``: a fixed, seeded set of image edits on the shapes domain, scored by the judge.

Why: "does the compressed model still edit" needs a number, as generation has its accuracies.
Each case takes a data-set image (held-out seeds ``EDIT_SEED_BASE + i``, disjoint from train and
eval) and a prompt that changes exactly one attribute; the judge reads the edited image back:

- ``color`` / ``shape`` / ``position`` (img2img): the caption with that attribute changed;
- ``inpaint``: the shape's region is masked (a disc around it, white = repaint) and the prompt asks
  for another colour there; the unmasked region must come back intact.

**Edit success** = the changed attribute now reads as asked AND the other two of colour, shape
and position still read as the source's (size and background are not scored: an edit may
legitimately touch them, and the judge reads them least reliably). ``preserve_psnr`` is the PSNR
of the unmasked region against the input (inpainting cases only). Cases cycle through the four
kinds, so any first ``n`` cases are balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdwb import shapes

SHAPES_EDIT = "builtin:shapes-edit"
EDIT_SEED_BASE = 20_000_000
KINDS = ("color", "shape", "position", "inpaint")
JUDGED = ("color", "shape", "position")
MASK_MARGIN = 1.7  # mask radius / shape radius: the whole shape and its anti-aliased rim


@dataclass(frozen=True)
class EditCase:
    """One edit: the source sample, which attribute changes, the target attributes and prompt."""

    index: int
    kind: str
    source: shapes.ShapeSample
    target: dict[str, str]

    @property
    def changed(self) -> str:
        return "color" if self.kind == "inpaint" else self.kind

    @property
    def prompt(self) -> str:
        return shapes.caption_for(self.target, 0)

    def image(self):
        from PIL import Image

        return Image.fromarray(shapes.render(self.source))

    def mask(self):
        """The inpainting mask (a white disc over the shape), None for img2img cases."""
        if self.kind != "inpaint":
            return None
        from PIL import Image

        return Image.fromarray((self.mask_array() * 255).astype(np.uint8))

    def mask_array(self) -> np.ndarray:
        """``(64, 64)`` float: 1 where the case repaints (all zeros for img2img cases)."""
        if self.kind != "inpaint":
            return np.zeros((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), np.float32)
        cx, cy = shapes._CENTERS[self.source.position]
        radius = shapes._RADIUS[self.source.size] * 1.15 * MASK_MARGIN + 3  # jitter: centre +-3 px
        y, x = np.mgrid[: shapes.IMAGE_SIZE, : shapes.IMAGE_SIZE] + 0.5
        return ((x - cx) ** 2 + (y - cy) ** 2 <= radius**2).astype(np.float32)


def edit_cases(count: int) -> list[EditCase]:
    """The first ``count`` cases of the set (deterministic; kinds cycle)."""
    cases = []
    for i in range(count):
        source = shapes.sample_from_seed(EDIT_SEED_BASE + i)
        kind = KINDS[i % len(KINDS)]
        attribute = "color" if kind == "inpaint" else kind
        rng = np.random.default_rng([EDIT_SEED_BASE + i, 7])
        others = [v for v in shapes.ATTRIBUTE_VALUES[attribute] if v != getattr(source, attribute)]
        target = {**source.attributes, attribute: str(rng.choice(others))}
        cases.append(EditCase(i, kind, source, target))
    return cases


def preserve_psnr(edited, case: EditCase) -> float | None:
    """PSNR (dB) of the unmasked pixels of ``edited`` against the case's input; None without a mask."""
    if case.kind != "inpaint":
        return None
    keep = case.mask_array() < 0.5
    a = np.asarray(edited.convert("RGB"), dtype=np.float64)[keep]
    b = shapes.render(case.source).astype(np.float64)[keep]
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def score_edits(judge, images: list, cases: list[EditCase]) -> dict:
    """``edit_success`` (mean, 95 % bootstrap interval), its per-kind means, ``preserve_psnr`` (mean over
    inpainting cases) and the per-case outcomes, from the judge's reading of the edited ``images``."""
    from sdwb.judge import bootstrap_interval

    if len(images) != len(cases):
        raise ValueError(f"{len(images)} edited images for {len(cases)} cases")
    predicted = judge.classify(images).predicted
    outcomes = []
    for case, seen in zip(cases, predicted):
        source = case.source.attributes
        asked = seen[case.changed] == case.target[case.changed]
        kept = all(seen[a] == source[a] for a in JUDGED if a != case.changed)
        outcomes.append(bool(asked and kept))
    mean, lo, hi = bootstrap_interval(np.array(outcomes, dtype=np.float64))
    psnrs = [p for p in (preserve_psnr(im, c) for im, c in zip(images, cases)) if p is not None]
    by_kind = {kind: float(np.mean([o for o, c in zip(outcomes, cases) if c.kind == kind]))
               for kind in KINDS if any(c.kind == kind for c in cases)}
    return {"edit_success": mean, "edit_success_lo": lo, "edit_success_hi": hi,
            **{f"edit_success_{k}": v for k, v in by_kind.items()},
            "preserve_psnr": float(np.mean(psnrs)) if psnrs else None, "n_edits": len(cases),
            "outcomes": outcomes}
