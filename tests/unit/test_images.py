"""Ingestion: every failure kind is rejected by name, every odd mode becomes correct RGB."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finestyle.prepare.ingest import ImageRejected, discover, load_all, load_image
from tests.conftest import make_scene


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def make_messy_folder(root: Path) -> dict[str, str]:
    """A folder mixing good images with every failure kind. Returns {file name: expected outcome}."""
    root.mkdir(parents=True, exist_ok=True)
    base = make_scene((160, 128), seed=7)
    exp: dict[str, str] = {}
    _save(base, root / "good.png")
    exp["good.png"] = "ok"
    # CMYK JPEG, RGBA, 16-bit, palette with transparency, EXIF rotated
    _save(make_scene((150, 120), 1).convert("CMYK"), root / "cmyk.jpg")
    exp["cmyk.jpg"] = "ok"
    rgba = make_scene((140, 120), 2).convert("RGBA")
    a = np.array(rgba)
    a[:, :70, 3] = 0
    rgba = Image.fromarray(a)
    _save(rgba, root / "rgba.png")
    exp["rgba.png"] = "ok"
    g16 = Image.fromarray((np.linspace(0, 65535, 130 * 100).reshape(100, 130)).astype(np.uint16))
    _save(g16, root / "gray16.png")
    exp["gray16.png"] = "ok"
    pal = make_scene((128, 128), 3).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    _save(pal, root / "palette.png", transparency=0)
    exp["palette.png"] = "ok"
    rot = make_scene((200, 100), 4)
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(rot, root / "rotated.jpg", exif=exif.tobytes())
    exp["rotated.jpg"] = "ok"
    frames = [make_scene((120, 120), s) for s in (5, 6)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exp["anim.gif"] = "ok"
    # failures
    (root / "zero.png").write_bytes(b"")
    exp["zero.png"] = "empty file"
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    exp["corrupt.png"] = "not an image|cannot open|truncated"
    buf = io.BytesIO()
    make_scene((160, 128), 8).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    exp["truncated.png"] = "truncated|corrupt"
    (root / "notes.png").write_text("this is not an image")
    exp["notes.png"] = "not an image"
    (root / "readme.txt").write_text("hello")
    exp["readme.txt"] = "not an image file extension"
    _save(make_scene((600, 500), 9), root / "huge.png")
    exp["huge.png"] = "too many pixels"
    _save(make_scene((40, 30), 10), root / "tiny.png")
    exp["tiny.png"] = "too small.*64"
    _save(base, root / "zz_copy_of_good.png")
    exp["zz_copy_of_good.png"] = "duplicate"
    (root / ".hidden.png").write_bytes(buf.getvalue())
    exp[".hidden.png"] = "hidden"
    (root / ".DS_Store").write_bytes(b"\0\0")
    exp[".DS_Store"] = "hidden"
    (root / "draft.png~").write_bytes(b"x")
    exp["draft.png~"] = "debris"
    return exp


def test_messy_folder_keeps_good_and_names_every_bad(tmp_path):
    exp = make_messy_folder(tmp_path / "m")
    cands, skipped = discover([str(tmp_path / "m")])
    good, bad = load_all(cands, max_pixels=200_000, min_side=64, animated="first", log=lambda m: None)
    reasons = {Path(s.path).name: s.reason for s in skipped + bad}
    good_names = {Path(g.path).name for g in good}
    for name, outcome in exp.items():
        if outcome == "ok":
            assert name in good_names, (name, reasons.get(name))
        else:
            assert name in reasons, f"{name} was neither used nor reported"
            import re

            assert re.search(outcome, reasons[name]), (name, reasons[name])
    for r in bad + skipped:
        assert r.error, f"{r.path}: exception class missing"
    assert all(g.image.mode == "RGB" for g in good)


def test_modes_are_normalised_not_clipped_or_dropped(tmp_path):
    exp = make_messy_folder(tmp_path / "m")
    assert exp
    g16 = np.asarray(load_image(tmp_path / "m" / "gray16.png").image)
    assert g16[..., 0].max() == 255 and g16[..., 0].min() == 0  # scaled, not clipped to 255 everywhere
    assert len(np.unique(g16[..., 0])) > 200
    rgba = np.asarray(load_image(tmp_path / "m" / "rgba.png").image)
    assert (rgba[:, :60] == 255).all(), "transparent half should be composited on white"
    rot = load_image(tmp_path / "m" / "rotated.jpg")
    assert rot.image.size == (100, 200) and any("EXIF" in n for n in rot.notes)
    anim = load_image(tmp_path / "m" / "anim.gif")
    assert any("first frame" in n for n in anim.notes)
    with pytest.raises(ImageRejected, match="animated"):
        load_image(tmp_path / "m" / "anim.gif", animated="skip")


def test_globs_files_and_missing(tmp_path):
    for i in range(2):
        make_scene(seed=i).save(tmp_path / f"a{i}.png")
    make_scene(seed=5).save(tmp_path / "b.jpg")
    c, s = discover(
        [str(tmp_path / "a*.png"), str(tmp_path / "b.jpg"), str(tmp_path / "nope"), str(tmp_path / "z*.png")]
    )
    assert sorted(p.name for p in c) == ["a0.png", "a1.png", "b.jpg"]
    assert {x.reason for x in s} == {"no such file or folder", "glob matched no files"}
