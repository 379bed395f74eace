"""The procedural *shapes* data set: 64x64 images of one coloured shape with exact captions.

Why: a domain where quality is measurable exactly. Every image is drawn from a seed, carries its
ground-truth attributes (colour, shape, size, position, background), and has a caption built
from a few templates. The judge CLIP classifies generated images back into these attributes,
which turns "does the compressed model still work" into accuracies instead of impressions.

Train and evaluation sets are disjoint by seed: the train stream draws from seeds
``TRAIN_SEED_BASE + i``, the held-out evaluation set from ``EVAL_SEED_BASE + i``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (140, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
ATTRIBUTES = ("color", "shape", "size", "position", "background")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Caption templates. Template 0 is the canonical one used for evaluation prompts and zero-shot
# classification; the others add variety in training.
TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "a {color} {shape}, {size}, {where}, {background} background",
    "{background} background with a {size} {color} {shape} {where}",
)

IMAGE_SIZE = 64
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 10_000_000
EVAL_PROMPT_COUNT = 270  # every (colour, shape, position) combination appears 3 times
_CENTERS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
_RADIUS = {"small": 7.0, "large": 12.0}
_SUPERSAMPLE = 4
RING_HOLE = 0.55  # a ring's hole radius / its outer radius (sdwb.shapes_lora)


@dataclass(frozen=True)
class ShapeSample:
    """One data-set item: its attributes, the caption, and the seed that draws it."""

    color: str
    shape: str
    size: str
    position: str
    background: str
    template: int
    seed: int

    @property
    def caption(self) -> str:
        return caption_for(self.attributes, self.template)

    @property
    def attributes(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def render(self) -> np.ndarray:
        """Draw the image (H, W, 3) uint8; deterministic for the sample's seed."""
        return render(self)

    def to_dict(self) -> dict:
        return {**asdict(self), "caption": self.caption}


def caption_for(attributes: dict[str, str], template: int = 0) -> str:
    """Build the caption of ``attributes`` with template number ``template``."""
    return TEMPLATES[template].format(
        size=attributes["size"],
        color=attributes["color"],
        shape=attributes["shape"],
        where=POSITION_PHRASES[attributes["position"]],
        background=attributes["background"],
    )


_WORD = re.compile(r"[a-z]+")


def parse_caption(caption: str) -> dict[str, str]:
    """Read the attributes back from a caption written by any template.

    Raises ``ValueError`` when the caption does not name exactly one value of every attribute.
    """
    words = _WORD.findall(caption.lower())
    found: dict[str, str] = {}
    background_idx = words.index("background") if "background" in words else -1
    for name, values in ATTRIBUTE_VALUES.items():
        if name == "background":
            # every template puts the background colour right before the word "background"
            hits = [w for w in values if background_idx > 0 and words[background_idx - 1] == w]
        else:  # shape colours and background colours are disjoint word sets
            hits = [w for w in values if w in words]
        if len(hits) != 1:
            raise ValueError(f"caption {caption!r} does not name exactly one {name}: found {hits}")
        found[name] = hits[0]
    return found


def sample_from_seed(seed: int) -> ShapeSample:
    """Draw the attributes of one sample from its seed (uniform over every attribute)."""
    rng = np.random.default_rng(seed)
    return ShapeSample(
        color=str(rng.choice(list(COLORS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(list(BACKGROUNDS))),
        template=int(rng.integers(len(TEMPLATES))),
        seed=seed,
    )


def render(sample: ShapeSample) -> np.ndarray:
    """Anti-aliased rendering of one sample as (64, 64, 3) uint8.

    Small seeded jitter (centre ±3 px, radius ±10 %, colour ±8 per channel) makes every seed a
    distinct image while keeping every attribute unambiguous.
    """
    rng = np.random.default_rng([sample.seed, 1])
    cx, cy = _CENTERS[sample.position]
    cx += rng.uniform(-3, 3)
    cy += rng.uniform(-3, 3)
    r = _RADIUS[sample.size] * rng.uniform(0.9, 1.1)
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if sample.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif sample.shape == "ring":  # not in the data set: what builtin:tiny-shapes-lora-ring teaches
        ring = r * 1.1
        mask = (dx**2 + dy**2 <= ring**2) & (dx**2 + dy**2 >= (ring * RING_HOLE) ** 2)
    elif sample.shape == "square":
        half = r * 0.9
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upward triangle inscribed in the circle of radius r*1.15
        rt = r * 1.15
        top, base = -rt, rt * 0.5
        half_width = (dy - top) / (base - top) * rt * np.sqrt(3) / 2
        mask = (dy >= top) & (dy <= base) & (np.abs(dx) <= half_width)
    coverage = mask.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
    color = np.clip(np.array(COLORS[sample.color]) + rng.integers(-8, 9, size=3), 0, 255)
    background = np.array(BACKGROUNDS[sample.background], dtype=np.float64)
    img = background * (1 - coverage[..., None]) + color * coverage[..., None]
    return np.round(img).astype(np.uint8)


def train_samples(start: int = 0):
    """Endless train stream: sample ``i`` is drawn from seed ``TRAIN_SEED_BASE + i``."""
    i = start
    while True:
        yield sample_from_seed(TRAIN_SEED_BASE + i)
        i += 1


def train_batch(step: int, batch_size: int) -> tuple[np.ndarray, list[str], list[ShapeSample]]:
    """Batch number ``step`` of the train stream: images (B, 64, 64, 3) uint8 and captions."""
    samples = [sample_from_seed(TRAIN_SEED_BASE + step * batch_size + i) for i in range(batch_size)]
    images = np.stack([s.render() for s in samples])
    return images, [s.caption for s in samples], samples


@lru_cache(maxsize=4)
def eval_samples(count: int = EVAL_PROMPT_COUNT) -> tuple[ShapeSample, ...]:
    """The fixed held-out evaluation set, stratified so that every colour x shape x position
    appears equally often; size and background are drawn from the eval seed.

    All use the canonical template 0, so prompts read like "a small red circle at the top on a
    gray background". Seeds start at ``EVAL_SEED_BASE``, disjoint from the train stream.
    """
    combos = list(itertools.product(COLORS, SHAPES, POSITIONS))
    order = np.random.default_rng(EVAL_SEED_BASE).permutation(len(combos))
    out = []
    for i in range(count):
        color, shape, position = combos[order[i % len(combos)]]
        seed = EVAL_SEED_BASE + i
        rng = np.random.default_rng([seed, 2])
        out.append(
            ShapeSample(
                color=color,
                shape=shape,
                size=str(rng.choice(SIZES)),
                position=position,
                background=str(rng.choice(list(BACKGROUNDS))),
                template=0,
                seed=seed,
            )
        )
    return tuple(out)


def eval_prompts(count: int = EVAL_PROMPT_COUNT) -> list[str]:
    """Captions of the held-out evaluation set, in order."""
    return [s.caption for s in eval_samples(count)]


def all_attribute_combinations() -> list[dict[str, str]]:
    """Every (colour, shape, size, position, background) combination: 540 of them."""
    return [dict(zip(ATTRIBUTES, values)) for values in itertools.product(*ATTRIBUTE_VALUES.values())]


def vocabulary() -> list[str]:
    """Every word any template can produce, in a stable order (used to build tokenizers)."""
    words: list[str] = []
    texts = [
        t.format(
            size=" ".join(SIZES),
            color=" ".join(COLORS),
            shape=" ".join(SHAPES),
            where=" ".join(POSITION_PHRASES.values()),
            background=" ".join(BACKGROUNDS),
        )
        for t in TEMPLATES
    ]
    for text in texts:
        for w in _WORD.findall(text):
            if w not in words:
                words.append(w)
    return words


def preview_grid(count: int = 16, seed: int = 0, columns: int = 4):
    """A PIL image grid of ``count`` train samples with their captions underneath."""
    from PIL import Image, ImageDraw

    samples = [sample_from_seed(seed + i) for i in range(count)]
    cell_w, cell_h, scale = 256, 200, 2
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, s in enumerate(samples):
        x0, y0 = (i % columns) * cell_w, (i // columns) * cell_h
        tile = Image.fromarray(s.render()).resize((IMAGE_SIZE * scale, IMAGE_SIZE * scale), Image.NEAREST)
        grid.paste(tile, (x0 + (cell_w - tile.width) // 2, y0 + 4))
        _draw_wrapped(draw, s.caption, x0 + 4, y0 + tile.height + 8, width=40)
    return grid


def _draw_wrapped(draw, text: str, x: int, y: int, width: int) -> None:
    line, lines = "", []
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for k, ln in enumerate(lines):
        draw.text((x, y + 12 * k), ln, fill="black")
