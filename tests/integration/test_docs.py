"""The documentation site: built as the README says (`mkdocs build --strict`), served, every internal
link and anchor of the built HTML resolves, and every bash block of every page is run by a test."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO, doc_pages, doc_section

pytestmark = pytest.mark.slow

DOCS_HEADING = "## Documentation"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag in ("a", "link", "img", "script") and (a.get("href") or a.get("src")):
            self.hrefs.append(a.get("href") or a.get("src") or "")


def _parse(page: Path) -> _Links:
    p = _Links()
    p.feed(page.read_text(errors="replace"))
    return p


def _target(page: Path, href: str, site: Path) -> tuple[Path, str]:
    path, _, anchor = href.partition("#")
    if path.startswith("/"):  # from the site's root (the 404 page's links)
        t = (site / path.lstrip("/")).resolve()
    else:
        t = page if not path else (page.parent / path).resolve()
    if t.is_dir():
        t = t / "index.html"
    return t, anchor


def _broken_links(site: Path) -> list[str]:
    parsed = {p: _parse(p) for p in site.rglob("*.html")}
    bad = []
    for page, links in parsed.items():
        for href in links.hrefs:
            if re.match(r"^[a-z]+:", href) or href.startswith("//"):
                continue  # external
            t, anchor = _target(page, href, site)
            if not t.exists():
                bad.append(f"{page.relative_to(site)} -> {href} (no file)")
            elif anchor and t.suffix == ".html" and anchor not in parsed.get(t, _parse(t)).ids:
                bad.append(f"{page.relative_to(site)} -> {href} (no anchor)")
    return bad


def test_site_builds_strict_serves_and_its_links_resolve(tmp_path):
    """The README's docs command, as written, in a copy of the docs sources: the strict build passes
    (a broken link, anchor or missing page fails it), and the served site answers."""
    (cmd,) = [
        ln
        for ln in re.findall(r"```bash\n(.*?)```", doc_section(DOCS_HEADING), re.S)[0].splitlines()
        if ln.strip()
    ]
    assert "mkdocs build --strict" in cmd and "--bind 127.0.0.1" in cmd
    for item in ("README.md", "mkdocs.yml", "docs", "scripts/docs_hooks.py"):
        src, dst = REPO / item, tmp_path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.Popen(
        ["bash", "-c", cmd],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        port = int(re.search(r"http\.server -d site (\d+)", cmd).group(1))
        pages = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(pages) < 3:
            try:
                for path in ("/", "/guides/stages/", "/reference/cli/"):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        pages[path] = (r.status, r.read().decode())
            except OSError:
                time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert set(pages) == {"/", "/guides/stages/", "/reference/cli/"}
    assert all(status == 200 for status, _ in pages.values())
    home, stages, cli = (pages[p][1] for p in ("/", "/guides/stages/", "/reference/cli/"))
    assert "The two commands" in home and 'href="guides/stages/"' in home  # the navigation
    assert "prepare" in stages and "finestyle prepare" in cli and "finestyle world train" in cli
    site = tmp_path / "site"
    assert not _broken_links(site), _broken_links(site)[:20]
    # the generated reference pages hold what the code says
    assert "min_crop" in (site / "reference/config/index.html").read_text()
    assert "/v1/images/generations" in (site / "reference/server-api/index.html").read_text()
    assert "run_train" in (site / "reference/api/index.html").read_text()


def test_every_bash_block_is_run_by_a_test():
    """Each bash block's heading is named by a test that reads its commands from that heading."""
    tests_text = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))
    missing = []
    for page in doc_pages():
        heading = None
        in_block = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                if not in_block and line.strip() == "```bash":
                    if heading is None or f'"{heading}"' not in tests_text:
                        missing.append(f"{page.relative_to(REPO)}: {heading}")
                in_block = not in_block
            elif not in_block and re.match(r"^#{1,4} ", line):
                heading = line.strip()
    assert not missing, missing


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    # every page of the site is linked from the README
    text = "\n".join(lines)
    pages = [p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md") if p.name != "index.md"]
    assert not [p for p in pages if f"({p})" not in text], pages
