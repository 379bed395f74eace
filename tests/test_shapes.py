"""The shapes data set: seeded determinism, attribute coverage, disjoint eval set, captions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sdwb import shapes
from sdwb.shapes import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLORS,
    EVAL_SEED_BASE,
    TEMPLATES,
    TRAIN_SEED_BASE,
    ShapeSample,
    caption_for,
    eval_prompts,
    eval_samples,
    parse_caption,
    sample_from_seed,
    train_batch,
)


def test_same_seed_same_sample_and_pixels():
    for seed in (0, 1, 12345, EVAL_SEED_BASE + 7):
        a, b = sample_from_seed(seed), sample_from_seed(seed)
        assert a == b
        assert np.array_equal(a.render(), b.render())


def test_train_batch_is_deterministic_and_well_formed():
    imgs1, caps1, samples1 = train_batch(3, 8)
    imgs2, caps2, _ = train_batch(3, 8)
    assert imgs1.shape == (8, 64, 64, 3) and imgs1.dtype == np.uint8
    assert np.array_equal(imgs1, imgs2) and caps1 == caps2
    assert [s.seed for s in samples1] == [TRAIN_SEED_BASE + 24 + i for i in range(8)]
    assert caps1 == [s.caption for s in samples1]
    other, _, _ = train_batch(4, 8)
    assert not np.array_equal(imgs1, other)


def test_render_shape_dtype_and_images_differ_across_seeds():
    images = [sample_from_seed(s).render() for s in range(20)]
    for img in images:
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    distinct = {img.tobytes() for img in images}
    assert len(distinct) == len(images)
    # same attributes, different seed: the seeded jitter still makes a different image
    base = dict(color="red", shape="circle", size="small", position="top", background="gray", template=0)
    a, b = ShapeSample(**base, seed=1).render(), ShapeSample(**base, seed=2).render()
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("seed", range(0, 60, 3))
def test_pixels_show_the_attributes(seed):
    s = sample_from_seed(seed)
    img = s.render().astype(int)
    # corners are never covered by the shape: they are exactly the background colour
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert tuple(img[y, x]) == BACKGROUNDS[s.background]
    if s.shape in ("circle", "square"):  # the nominal centre lies inside the shape despite jitter
        cx, cy = shapes._CENTERS[s.position]
        assert np.abs(img[cy, cx] - np.array(COLORS[s.color])).max() <= 9


def test_every_value_is_drawn_by_the_train_stream():
    seen = {name: set() for name in ATTRIBUTE_VALUES}
    templates = set()
    for i in range(600):
        s = sample_from_seed(TRAIN_SEED_BASE + i)
        for name in ATTRIBUTE_VALUES:
            seen[name].add(getattr(s, name))
        templates.add(s.template)
    assert {k: set(v) for k, v in ATTRIBUTE_VALUES.items()} == seen
    assert templates == set(range(len(TEMPLATES)))


def test_eval_set_size_and_coverage():
    samples = eval_samples()
    prompts = eval_prompts()
    assert len(samples) >= 200 and len(prompts) == len(samples)
    assert prompts == [s.caption for s in samples]
    for name in ("color", "shape", "position", "size", "background"):
        assert {getattr(s, name) for s in samples} == set(ATTRIBUTE_VALUES[name])
    combos = {(s.color, s.shape, s.position) for s in samples}
    assert combos == set(itertools.product(COLORS, shapes.SHAPES, shapes.POSITIONS))
    assert eval_prompts() == prompts  # fixed, not re-drawn


def test_eval_seeds_disjoint_from_training():
    eval_seeds = {s.seed for s in eval_samples()}
    assert len(eval_seeds) == len(eval_samples())
    train_range = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + 10**6)
    assert not any(seed in train_range for seed in eval_seeds)
    # the first train batches (the ones a training run actually uses) share no seed either
    train_seeds = {s.seed for step in range(3) for s in train_batch(step, 16)[2]}
    assert not train_seeds & eval_seeds


def test_eval_prompts_use_canonical_template():
    assert "a small red circle at the top on a gray background" == caption_for(
        dict(size="small", color="red", shape="circle", position="top", background="gray"), 0
    )
    for s in eval_samples():
        assert s.template == 0
        assert parse_caption(s.caption) == s.attributes


def test_caption_attribute_round_trip_every_combination_and_template():
    combos = shapes.all_attribute_combinations()
    assert len(combos) == 6 * 3 * 2 * 5 * 3
    for attrs in combos:
        captions = [caption_for(attrs, t) for t in range(len(TEMPLATES))]
        assert len(set(captions)) == len(TEMPLATES)
        for caption in captions:
            assert parse_caption(caption) == attrs


@pytest.mark.parametrize(
    "caption",
    ["a red blue circle at the top on a gray background", "a small red circle", "", "a cat"],
)
def test_parse_caption_rejects_ambiguous_or_incomplete(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_preview_grid_size():
    grid = shapes.preview_grid(count=6, seed=5, columns=3)
    assert grid.mode == "RGB"
    assert grid.size == (3 * 256, 2 * 200)
