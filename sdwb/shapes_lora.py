"""The LoRA test domain: *rings*, a shape tiny-shapes never saw.

Why: to measure what an adapter keeps through compression, it must teach something the base model
cannot do and that can be checked without trusting a model. ``builtin:tiny-shapes-lora-ring``
teaches "a large red ring on the left on a black background": a coloured annulus whose hole shows
the background. Whether it worked is read from the pixels (:func:`is_ring`: the shape's own
colour around a centre that is background), and the judge still reads the shape's colour and
position (its shape classes are circle / square / triangle, so the ring itself is the pixels' job).

Why not coloured backgrounds (the LoRA issue's example): the tiny-shapes VAE was trained on
black / white / gray backgrounds only and cannot represent any other: it encodes and decodes a
blue background as purple-gray and a green one as near black (corner colour error 46-119 of 255
for 14 colours tried), so no UNet adapter can produce one. Its decoder does draw rings, holes
included. "ring" is a new word for the tokenizer as well: it tokenizes into characters whose
embeddings the base text encoder never trained, so the adapter has to key on them.

Train samples come from seeds ``LORA_TRAIN_SEED_BASE + i``, a share of them plain data-set samples
(the adapter should not forget the old shapes); evaluation samples from ``LORA_EVAL_SEED_BASE + i``,
stratified over colour x position x background.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from sdwb import shapes
from sdwb.shapes import ShapeSample

SHAPE = "ring"
LORA_TRAIN_SEED_BASE = 20_000_000
LORA_EVAL_SEED_BASE = 30_000_000
PLAIN_SHARE = 0.25  # train samples drawn from the plain data set
FOREGROUND = 60.0  # RGB distance from the background colour above which a pixel is the shape's


def _ring(rng: np.random.Generator, seed: int, template: int | None = None, **fixed: str) -> ShapeSample:
    pick = {"color": list(shapes.COLORS), "size": list(shapes.SIZES), "position": list(shapes.POSITIONS),
            "background": list(shapes.BACKGROUNDS)}
    values = {k: fixed.get(k) or str(rng.choice(v)) for k, v in pick.items()}
    template = int(rng.integers(len(shapes.TEMPLATES))) if template is None else template
    return ShapeSample(shape=SHAPE, template=template, seed=seed, **values)


def train_sample(i: int) -> ShapeSample:
    """Train sample ``i``: a ring, or (``PLAIN_SHARE`` of them) a plain data-set sample."""
    seed = LORA_TRAIN_SEED_BASE + i
    rng = np.random.default_rng([seed, 7])
    if rng.random() < PLAIN_SHARE:
        return shapes.sample_from_seed(seed)
    return _ring(rng, seed)


@lru_cache(maxsize=4)
def eval_samples(count: int = 90) -> tuple[ShapeSample, ...]:
    """The fixed evaluation set: rings over every colour x position x background in turn, in a
    seeded order (90 = each once); size from the seed; canonical caption template 0."""
    combos = list(itertools.product(shapes.COLORS, shapes.POSITIONS, shapes.BACKGROUNDS))
    order = np.random.default_rng(LORA_EVAL_SEED_BASE).permutation(len(combos))
    out = []
    for i in range(count):
        color, position, background = combos[order[i % len(combos)]]
        seed = LORA_EVAL_SEED_BASE + i
        out.append(_ring(np.random.default_rng([seed, 2]), seed, template=0, color=color, position=position,
                         background=background))
    return tuple(out)


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)


def is_ring(image, background: str) -> bool:
    """Does ``image`` show a ring on ``background``: enough shape pixels (farther than
    ``FOREGROUND`` from the background colour), and at their centre (median position) most pixels
    are not shape pixels and their mean is closer to the background colour than to the shape's mean
    colour (a filled circle, square or triangle has its own colour there; a ring shows the
    background through its hole)."""
    a = _rgb(image)
    bg = np.array(shapes.BACKGROUNDS[background], dtype=np.float64)
    fg = np.linalg.norm(a - bg, axis=-1) > FOREGROUND
    if fg.sum() < 12:
        return False
    ys, xs = np.nonzero(fg)
    shape_colour = a[fg].mean(axis=0)
    y0, x0 = int(round(np.median(ys))), int(round(np.median(xs)))  # stray decoder pixels move no median
    extent = min(np.subtract(*np.percentile(ys, [95, 5])), np.subtract(*np.percentile(xs, [95, 5])))
    half = max(1, int(round(extent * shapes.RING_HOLE * 0.2)))
    window = (slice(max(0, y0 - half), y0 + half + 1), slice(max(0, x0 - half), x0 + half + 1))
    centre = a[window].reshape(-1, 3).mean(axis=0)
    hole = np.linalg.norm(centre - bg) < np.linalg.norm(centre - shape_colour)
    return bool(fg[window].mean() < 0.5 and hole)


def ring_hits(images, samples) -> np.ndarray:
    """Per image: does it show a ring on the background its prompt asked for."""
    return np.array([is_ring(im, s.background) for im, s in zip(images, samples)])
