"""`finestyle run CONFIG --review` under a real Prefect server: the run pauses after prepare; the review
page's Approve resumes it with the reviewed version, which trains; a Reject in Prefect's Resume form
(its API) fails the run with one line and trains nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.conftest import free_port as _free_port
from tests.flows.test_production import _api, _healthy, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true",  # the artifact page is checked in Prefect's own UI
    )
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _healthy(api), 120, "the Prefect server")
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def guide_blocks() -> list[list[str]]:
    """The commands of the review guide's "## A pipeline that waits for review" (two bash blocks)."""
    import re
    import shlex

    from tests.conftest import doc_section

    text = doc_section("## A pipeline that waits for review", "docs/guides/review.md")
    return [shlex.split(b.strip()) for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _start_run(tmp_path: Path, env: dict, page_port: int, timeout_s: int = 600) -> subprocess.Popen:
    """The guide's `finestyle run configs/example.yaml --review`, with tiny parameters."""
    run = guide_blocks()[0]
    assert run[:2] == ["finestyle", "run"] and "--review" in run
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        *[str(REPO / a) if a.endswith(".yaml") else a for a in run[1:]],
    ]
    for s in (
        f"workdir={tmp_path / 'wd'}",
        "train.steps=2",
        "prepare.concepts=grid",
        "export.parity_steps=2",
        "export.with_base_unet=false",
        "export.check_bf16=false",
        "export.check_openvino=false",
        "generate_prompt=",
        f"review_port={page_port}",
        f"review_timeout={timeout_s}",
    ):
        args += ["--set", s]
    env = {**env, "FINESTYLE_HOME": str(tmp_path / "state")}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _paused_run(api: str, proc: subprocess.Popen) -> dict:
    def paused():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        runs = _api(
            api, "POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}
        )
        return runs[0] if runs else None

    return _wait_for(paused, 300, "the pipeline run to pause for review")


def test_review_page_approve_resumes_the_run_with_the_reviewed_version(prefect_server, tmp_path):
    api, env = prefect_server
    page_port = _free_port()
    proc = _start_run(tmp_path, env, page_port)
    try:
        run = _paused_run(api, proc)
        assert not (tmp_path / "wd" / "train").exists()  # nothing trains before the review
        page = f"http://127.0.0.1:{page_port}"
        _wait_for(lambda: _ok(page + "/api/dataset"), 60, "the review page")
        d = httpx.get(page + "/api/dataset").json()
        assert d["flow_run"] and len(d["rows"]) > 2
        keys = _artifacts(api, run["id"])
        assert (
            "review-waiting" in keys
            and page in keys["review-waiting"]
            and "data:image/png" in keys["review-waiting"]
        )
        r = httpx.post(
            page + "/api/approve",
            json={"key": d["key"], "edits": {"drops": [0]}, "note": "row 0 off"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        rec = r.json()
        assert "resumed" in rec["resumed"]
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _api(api, "GET", f"/flow_runs/{run['id']}")["state_type"] == "COMPLETED"
    reports = list((tmp_path / "wd" / "train").glob("*/report.json"))
    assert len(reports) == 1
    import json

    from finestyle.review.versions import dataset_key

    assert json.loads(reports[0].read_text())["dataset_fingerprint"] == rec["key"] == dataset_key(rec["out"])
    assert "review approved" in out + err
    _artifact_pictures_in_prefects_ui(api, run["id"])


def _artifact_pictures_in_prefects_ui(api: str, run_id: str) -> None:
    """Prefect's UI (in Chromium) shows the pipeline artifact's pictures, not file paths."""
    from tests.integration.test_review_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM:
        return  # the review page's browser test says why (FINESTYLE_REQUIRE_BROWSER in CI)
    from playwright.sync_api import sync_playwright

    rows = _api(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    summary = next(a for a in rows if a.get("key") == "pipeline-summary")
    ui = api.removesuffix("/api")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{ui}/artifacts/artifact/{summary['id']}")
        page.wait_for_selector('img[src^="data:image/png"]', timeout=60_000)
        imgs = page.locator('img[src^="data:image/png"]')
        assert imgs.count() >= 2  # the dataset preview and the loss curve
        assert imgs.first.evaluate("i => i.complete && i.naturalWidth > 0")
        if os.environ.get("FINESTYLE_DOC_SHOTS"):
            page.screenshot(path=os.environ["FINESTYLE_DOC_SHOTS"] + "/prefect-artifact.png", full_page=True)
        browser.close()


def test_review_from_another_process_by_flow_run_id_rejects(prefect_server, tmp_path):
    """The guide's `finestyle review DATASET --flow-run FLOW_RUN_ID`: its Reject resumes the run, which fails."""
    api, env = prefect_server
    proc = _start_run(tmp_path, env, 0)
    page_port = _free_port()
    try:
        run = _paused_run(api, proc)
        cmd = guide_blocks()[1]
        cmd = [
            str(tmp_path / "wd" / "dataset") if a == "DATASET" else run["id"] if a == "FLOW_RUN_ID" else a
            for a in cmd
        ]
        page = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *cmd[1:], "--port", str(page_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{page_port}"
            _wait_for(lambda: _ok(url + "/api/dataset"), 120, "the review page")
            r = httpx.post(url + "/api/reject", json={"note": "sky crops"}, timeout=60)
            assert r.status_code == 200 and "resumed" in r.json()["resumed"], r.text
        finally:
            page.terminate()
            page.wait(30)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "review rejected: sky crops; nothing was trained" in err, err[-3000:]
    assert not (tmp_path / "wd" / "train").exists()


def test_reject_in_prefects_resume_form_fails_the_run_and_trains_nothing(prefect_server, tmp_path):
    api, env = prefect_server
    proc = _start_run(tmp_path, env, 0)  # no page: the decision comes from Prefect's UI form
    try:
        run = _paused_run(api, proc)
        # what the UI's Resume form posts for a paused run waiting for a ReviewDecision
        _api(
            api,
            "POST",
            f"/flow_runs/{run['id']}/resume",
            {"run_input": {"approved": False, "note": "wrong crops"}},
        )
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "review rejected: wrong crops; nothing was trained" in err and "Traceback" not in err
    assert _api(api, "GET", f"/flow_runs/{run['id']}")["state_type"] == "FAILED"
    assert not (tmp_path / "wd" / "train").exists()


def test_a_review_with_no_decision_in_time_fails_the_run(prefect_server, tmp_path):
    api, env = prefect_server
    proc = _start_run(tmp_path, env, 0, timeout_s=3)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "review: no decision within 3 s; nothing was trained" in err, err[-3000:]
    assert not (tmp_path / "wd" / "train").exists()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _artifacts(api: str, run_id: str) -> dict[str, str]:
    time.sleep(0.5)
    rows = _api(api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"]: str(a.get("data")) for a in rows if a.get("key")}
