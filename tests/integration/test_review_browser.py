"""The review page in a real browser (Debian's Chromium, driven by Playwright): keyboard and mouse edit a
text, drop a row, redraw a box and approve; the new version is on disk, the old one unchanged, and
`finestyle train` reads the new one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from finestyle.core.fs import hash_tree
from finestyle.review.versions import dataset_key, load_rows
from tests.conftest import free_port, prepare_small_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM or not __import__("importlib").util.find_spec("playwright"):
    if os.environ.get("FINESTYLE_REQUIRE_BROWSER"):
        pytest.fail("the browser tests need Debian's chromium and playwright (.ci/run installs both)")
    pytest.skip("no Chromium (apt-get install chromium) or playwright", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time

    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-2000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout}s")


def test_review_page_in_chromium_edit_drop_redraw_approve_then_train(tmp_path):
    from playwright.sync_api import sync_playwright

    ds = prepare_small_dataset(tmp_path / "data")
    before, rows = hash_tree(ds), load_rows(ds)
    out, port = tmp_path / "reviewed", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finestyle.cli", "review", str(ds), "--port", str(port), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "api/dataset", proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url)
            page.wait_for_selector(".item")
            assert page.locator(".item").count() == len(rows)
            # row 0: edit its text with the keyboard
            page.keyboard.press("e")
            page.fill("#text", "a tiny red boat, in paper-cut style")
            page.keyboard.press("Enter")
            # row 1: drop it
            page.keyboard.press("j")
            page.keyboard.press("d")
            assert "dropped" in page.locator(".item").nth(1).get_attribute("class")
            # row 2: redraw its box with the mouse on the source image
            page.keyboard.press("j")
            page.keyboard.press("b")
            svg = page.locator("#source").bounding_box()
            page.mouse.move(svg["x"] + 2, svg["y"] + 2)
            page.mouse.down()
            page.mouse.move(svg["x"] + svg["width"] * 0.5, svg["y"] + svg["height"] * 0.6, steps=5)
            page.mouse.up()
            assert "(redrawn)" in page.locator("#box").inner_text()
            page.fill("#note", "boat text fixed, sky row dropped")
            page.click("#approve")
            page.wait_for_selector("#message.ok")
            assert "approved" in page.locator("#message").inner_text()
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    # the new version
    new = load_rows(out)
    assert len(new) == len(rows) - 1
    assert new[0]["text"] == "a tiny red boat, in paper-cut style"
    assert new[1]["text"] == rows[2]["text"] and new[1]["crop"] != rows[2]["crop"]
    assert max(new[1]["crop"][:2]) <= 4  # drawn from the source's top-left corner
    report = json.loads((out / "report.json").read_text())
    review = report["review"]
    assert review["approved"] and review["previous_key"] == dataset_key(ds)
    assert report["cache_key"] == dataset_key(out) != dataset_key(ds)
    assert review["note"] == "boat text fixed, sky row dropped"
    assert sorted(c["change"] for c in review["changes"]) == ["box", "dropped", "text"]
    assert "approved" in (out / "README.md").read_text()
    # the old version, unchanged
    assert hash_tree(ds) == before
    # an ordinary training run reads the new version
    run = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "train",
            str(out),
            "--base",
            "builtin:tiny-sd",
            "--out",
            str(run),
        ]
        + ["--steps", "2", "--resolution", "64", "--sample-every", "0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    trained = json.loads((run / "report.json").read_text())
    assert trained["dataset_fingerprint"] == dataset_key(out)
