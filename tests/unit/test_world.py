"""The procedural world: deterministic from a seed, boxes inside the image and on the object."""

from __future__ import annotations

import numpy as np
import pytest

from finestyle.world.data import JUDGE_LABELS, STYLE_SLICE, label_vector, render_set
from finestyle.world.scene import HELDOUT_STYLE, OBJECTS, STYLES, TRAINED_STYLES, render_seed, world_words


def test_same_seed_same_pixels_and_labels():
    a, b = render_seed(42, 64), render_seed(42, 64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.labels("x.png") == b.labels("x.png")
    assert not np.array_equal(np.asarray(a.image), np.asarray(render_seed(43, 64).image))


@pytest.mark.parametrize("size", [64, 256])
def test_boxes_inside_the_image_and_caption_names_every_object(size):
    for seed in range(40):
        r = render_seed(seed, size)
        lab = r.labels("f.png")
        assert 1 <= len(lab["objects"]) <= 3
        for obj in lab["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert f"{obj['colour']} {obj['name']}" in lab["caption"]


def test_flat_render_shows_the_object_colour_inside_its_box():
    for seed in range(20):
        r = render_seed(seed, 64, "flat")
        px = np.asarray(r.image).astype(int)
        from finestyle.world.scene import COLOURS

        for obj, (x0, y0, x1, y1) in zip(r.scene.objects, r.boxes, strict=True):
            crop = px[y0:y1, x0:x1].reshape(-1, 3)
            hit = (np.abs(crop - np.array(COLOURS[obj.colour])).sum(1) < 10).mean()
            assert hit > 0.05, (seed, obj)


def test_styles_differ_and_heldout_is_not_a_training_style():
    assert HELDOUT_STYLE in STYLES and HELDOUT_STYLE not in TRAINED_STYLES and len(STYLES) >= 6
    imgs = [np.asarray(render_seed(5, 64, s).image).astype(int) for s in STYLES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 4, (STYLES[i], STYLES[j])  # outline: lines only


def test_vocabulary_and_judge_labels_cover_the_world():
    words = world_words()
    assert set(OBJECTS) <= set(words) and set(STYLES) <= set(words) and len(OBJECTS) >= 12
    images, labels, prompts = render_set(0, 12)
    assert images.shape == (12, 64, 64, 3) and labels.shape == (12, len(JUDGE_LABELS))
    assert (labels[:, STYLE_SLICE].sum(1) == 1).all()
    assert prompts[0].endswith(" style") and np.array_equal(
        labels[3], label_vector(render_seed(3, 64, STYLES[3]))
    )


def test_the_heldout_duotone_style_is_read_analytically_and_survives_blur_and_crops():
    import types

    import torch

    from finestyle.world.check import DUOTONE_MIN_SHARE, gate_vae, reference_views
    from finestyle.world.scene import duotone_share

    held = reference_views(10, 12, HELDOUT_STYLE)  # whole pictures and zoomed object crops
    assert held.shape == (12, 64, 64, 3)
    assert (duotone_share(held) >= DUOTONE_MIN_SHARE).all()
    for style in TRAINED_STYLES:
        assert (duotone_share(reference_views(20, 12, style)) < DUOTONE_MIN_SHARE).all(), style
    # a blur mixes ramp colours into ramp colours: the signature outlives a lossy round trip
    blur = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    class BlurVAE(torch.nn.Module):
        device = torch.device("cpu")

        def encode(self, x):
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=blur(x)))

        def decode(self, z):
            return types.SimpleNamespace(sample=z)

    survive, false_pos = gate_vae(BlurVAE(), 12)
    assert survive.value == 1.0 and survive.passed
    assert false_pos.value == 0.0 and false_pos.passed
