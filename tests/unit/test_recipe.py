"""The data recipe's pure parts: buckets at every resolution, background words a tokenizer knows,
and whole images as a weighted share of each epoch."""

from __future__ import annotations

import math

import pytest

from finestyle.core.geometry import bucket_size, centre_crop_share, context_crop
from finestyle.prepare.recipe import background_text, caption_remainder, join_concepts, known_text
from finestyle.train.data import Example, epoch_batches


@pytest.mark.parametrize("res", [64, 512, 1024])
def test_buckets_follow_the_vae_factor_and_cut_under_10_percent(res):
    worst = 0.0
    for i in range(121):
        aspect = math.exp(math.log(4) * (2 * i / 120 - 1))  # 1:4 .. 4:1
        for side in (40, 300, 1500):
            size = (max(8, round(side * math.sqrt(aspect))), max(8, round(side / math.sqrt(aspect))))
            b = bucket_size(size, res, 8)
            assert b[0] % 8 == 0 and b[1] % 8 == 0
            assert 0.6 * res * res <= b[0] * b[1] <= 1.25 * res * res
            kw, kh = centre_crop_share(size, b)
            worst = max(worst, 1 - kw * kh)
    assert worst <= 0.10, worst
    # a square stays the resolution; 64 px steps used to turn a 3:2 crop square at 64 px
    assert bucket_size((300, 300), res) == (res, res)
    assert bucket_size((96, 64), 64) != (64, 64)


def test_context_crop_keeps_the_share_and_stays_inside():
    crop = context_crop((40, 40, 60, 60), (200, 100), share=0.5)
    assert crop == (30, 30, 70, 70)
    # shifted, not shrunk, at the image's edge; clipped only by the image itself
    assert context_crop((0, 0, 20, 20), (200, 100), share=0.25) == (0, 0, 80, 80)
    assert context_crop((0, 0, 20, 90), (200, 100), share=0.5) == (0, 0, 40, 100)


def test_background_text_is_known_to_the_world_and_clip_tokenizers():
    from finestyle.core.models import load_sd_pipeline
    from finestyle.world.models import world_tokenizer

    world, clip = world_tokenizer(), load_sd_pipeline("builtin:tiny-sd", device="cpu").tokenizer
    assert not known_text(world, "background")  # the bare word the old rows used
    caption = "a red boat and a yellow sun over the sea"
    assert caption_remainder(caption, ["red boat", "yellow sun"]) == "the sea"
    for tok in (world, clip):
        # the captioner's words when the tokenizer knows them, else what the caption says beside its concepts
        assert background_text("the sea", caption, ["red boat", "yellow sun"], tok) == "the sea"
        text = background_text("qwzx background", caption, ["red boat", "yellow sun"], tok)
        assert text and known_text(tok, text)
    assert background_text("qwzx background", "qwzx", [], world) is None  # dropped, and reported
    assert join_concepts(["red cat", "blue car", "sun"]) == "red cat, blue car and sun"


def _examples(n_crops: int, n_whole: int) -> list[Example]:
    return [Example(0, (64, 64), (i,), whole=i >= n_crops) for i in range(n_crops + n_whole)]


def test_whole_image_weight_sets_their_share_of_each_epoch():
    ex = _examples(10, 2)
    same = epoch_batches(ex, 1, seed=3, epoch=0)
    assert same == epoch_batches(ex, 1, seed=3, epoch=0, whole_weight=1.0)  # the default is unchanged
    seen = [i for e in range(40) for b in epoch_batches(ex, 1, 3, e, whole_weight=2.5) for i in b]
    whole = sum(i >= 10 for i in seen) / 40 / 2  # per whole image per epoch
    assert 2.2 < whole < 2.8 and sum(i < 10 for i in seen) == 400
    assert not [i for b in epoch_batches(ex, 1, 3, 0, whole_weight=0) for i in b if i >= 10]
    # a pure function of (seed, epoch), as resume needs
    assert epoch_batches(ex, 2, 5, 7, 2.5) == epoch_batches(ex, 2, 5, 7, 2.5)
