"""`finestyle review`: the page's API writes new dataset versions (never in place), refuses bad edits and
stale pages without writing, and round-trips rows through Label Studio's task format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finestyle.core.fs import hash_tree
from finestyle.review.app import ReviewState, create_review_app
from finestyle.review.versions import dataset_key, load_rows
from tests.conftest import prepare_small_dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_small_dataset(tmp_path_factory.mktemp("review") / "data")


@pytest.fixture
def client(prepared, tmp_path):
    from fastapi.testclient import TestClient

    state = ReviewState(prepared, out=tmp_path / "v2")
    return TestClient(create_review_app(state)), state


def test_save_writes_a_new_version_with_its_key_and_review_record(client, prepared, tmp_path):
    c, state = client
    before = hash_tree(prepared)
    d = c.get("/api/dataset").json()
    assert d["key"] == dataset_key(prepared) and len(d["rows"]) >= 3
    assert c.get("/").status_code == 200 and "FineStyle review" in c.get("/").text
    assert c.get("/api/rows/0/crop.png").headers["content-type"] == "image/png"
    src = Image.open(__import__("io").BytesIO(c.get("/api/rows/0/source.png").content))
    assert list(src.size) == d["rows"][0]["source_size"]
    row0 = d["rows"][0]
    assert row0["view"]["kept"] == row0["text"].split() and row0["view"]["cut"] == []
    w, h = row0["source_size"]
    box = [4, 4, w // 2, h // 2]
    edits = {"texts": {"0": "a small red boat, in paper-cut style"}, "drops": [1], "boxes": {"2": box}}
    r = c.post("/api/save", json={"key": d["key"], "edits": edits, "note": "fixed boat"})
    assert r.status_code == 200, r.text
    rec = r.json()
    out = Path(rec["out"])
    assert out == tmp_path / "v2"
    assert hash_tree(prepared) == before  # the reviewed version is never changed in place
    old, new = load_rows(prepared), load_rows(out)
    assert len(new) == len(old) - 1
    assert new[0]["text"] == "a small red boat, in paper-cut style"
    assert new[1]["text"] == old[2]["text"] and new[1]["crop"] == box and new[1]["bbox"] == box
    source = Image.open(prepared.parent / "refs" / old[2]["source"]).convert("RGB")
    assert np.array_equal(np.asarray(new[1]["image"]), np.asarray(source.crop(box)))
    report = json.loads((out / "report.json").read_text())
    assert report["cache_key"] == rec["key"] == dataset_key(out) != dataset_key(prepared)
    assert report["review"]["previous_key"] == dataset_key(prepared)
    assert {c["change"] for c in report["review"]["changes"]} == {"text", "dropped", "box"}
    assert report["counts"]["rows"] == len(new)
    card = (out / "README.md").read_text()
    assert "## Review" in card and "fixed boat" in card and dataset_key(prepared) in card
    assert (out / "preview.png").is_file() and len(
        (out / "train" / "metadata.jsonl").read_text().splitlines()
    ) == len(new)
    # the page now reviews the new version: the old page's key is stale
    assert c.get("/api/dataset").json()["key"] == rec["key"]
    stale = c.post("/api/save", json={"key": d["key"], "edits": {"drops": [0]}})
    assert stale.status_code == 409 and "reload" in stale.json()["detail"]


def test_bad_edits_get_a_message_and_write_nothing(client, prepared, tmp_path):
    c, state = client
    d = c.get("/api/dataset").json()
    w, h = d["rows"][0]["source_size"]
    cases = [
        ({"texts": {"0": "   "}}, "row 0: the text is empty"),
        ({"boxes": {"0": [0, 0, w + 40, h]}}, "outside the"),
        ({"drops": list(range(len(d["rows"])))}, "every row is dropped"),
        ({"drops": [999]}, "row 999: there is no such row"),
        ({"texts": {"0": "word " * 80 + "in paper-cut style"}}, "falls past the text encoder's"),
    ]
    for edits, msg in cases:
        r = c.post("/api/save", json={"key": d["key"], "edits": edits})
        assert r.status_code == 422 and msg in r.json()["detail"], (edits, r.text)
    assert not (tmp_path / "v2").exists()


def test_a_dataset_prepared_again_makes_the_page_stale(prepared, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    state = ReviewState(copy, out=tmp_path / "v2")
    c = TestClient(create_review_app(state))
    key = c.get("/api/dataset").json()["key"]
    rep = json.loads((copy / "report.json").read_text())
    rep["cache_key"] = "prepared-again"
    (copy / "report.json").write_text(json.dumps(rep))
    r = c.post("/api/approve", json={"key": key, "edits": {}})
    assert r.status_code == 409 and "reload" in r.json()["detail"]
    assert not (tmp_path / "v2").exists()


def guide_commands(heading: str, dataset: Path) -> list[list[str]]:
    """The review guide's commands under `heading`, as argv for `python -m flows.cli`, DATASET filled in."""
    import re
    import shlex

    from tests.conftest import doc_section

    block = re.search(r"```bash\n(.*?)```", doc_section(heading, "docs/guides/review.md"), re.S).group(1)
    out = []
    for line in block.strip().splitlines():
        args = [str(dataset) if a == "DATASET" else a for a in shlex.split(line)]
        assert args[0] == "finestyle", line
        out.append([sys.executable, "-m", "flows.cli", *args[1:]])
    return out


def test_the_guide_opens_the_review_page_as_written(prepared, tmp_path):
    """ "## Open the review page": the command as written serves the page on 127.0.0.1:8765."""
    import httpx

    from tests.integration.test_review_browser import wait_http

    (cmd,) = guide_commands("## Open the review page", prepared)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http("http://127.0.0.1:8765/api/dataset", proc)
        assert httpx.get("http://127.0.0.1:8765/api/dataset").json()["key"] == dataset_key(prepared)
    finally:
        proc.terminate()
        proc.wait(30)


def test_label_studio_round_trip(prepared, tmp_path):
    """ "## Label Studio", as written: export to Label Studio's task format, relabel as a person would
    there (a text, a box, a drop), import Label Studio's JSON export: a new version with exactly those
    changes."""
    ls = tmp_path / "ls-tasks"
    export_cmd, import_cmd = guide_commands("## Label Studio", prepared)
    r = subprocess.run(export_cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    tasks = json.loads((ls / "tasks.json").read_text())
    rows = load_rows(prepared)
    assert len(tasks) == len(rows)
    config = (ls / "label_config.xml").read_text()
    assert '<RectangleLabels name="box"' in config and '<TextArea name="text"' in config
    t0 = tasks[0]
    assert (ls / t0["data"]["image"].split("?d=")[1]).is_file()
    res = {x["type"]: x for x in t0["annotations"][0]["result"]}
    v, W = res["rectanglelabels"]["value"], res["rectanglelabels"]["original_width"]
    assert round(v["x"] * W / 100) == rows[0]["crop"][0] and res["textarea"]["value"]["text"] == [
        rows[0]["text"]
    ]
    # a person's edits in Label Studio, as its export writes them
    res["textarea"]["value"]["text"] = ["a blue house, in paper-cut style"]
    v.update(x=0.0, y=0.0, width=50.0, height=50.0)
    tasks[1]["annotations"].append(
        {
            "result": [
                {"type": "choices", "from_name": "drop", "to_name": "image", "value": {"choices": ["drop"]}}
            ]
        }
    )
    exported = tmp_path / "ls-export.json"
    exported.write_text(json.dumps(tasks[:-1]))  # the last task deleted in Label Studio: dropped too
    r = subprocess.run(import_cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    new = load_rows(tmp_path / "reviewed")
    assert len(new) == len(rows) - 2
    H = res["rectanglelabels"]["original_height"]
    assert new[0]["text"] == "a blue house, in paper-cut style"
    assert new[0]["crop"] == [0, 0, round(W / 2), round(H / 2)]
    assert [r["text"] for r in new[1:]] == [r["text"] for r in rows[2:-1]]
    rec = json.loads((tmp_path / "reviewed" / "report.json").read_text())["review"]
    assert sorted(c["change"] for c in rec["changes"]) == ["box", "dropped", "dropped", "text"]
    # an export of another version is refused, naming what to do; nothing is written
    tasks[0]["data"]["finestyle_key"] = "0" * 64
    exported.write_text(json.dumps(tasks))
    r = subprocess.run([*import_cmd[:-1], str(tmp_path / "v3")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "export again" in r.stderr and not (tmp_path / "v3").exists()
