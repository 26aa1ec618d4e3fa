"""Styles added and removed while requests stream: `finestyle serve` on a swappable export keeps 4
requests in flight for 60 s while a style is removed and added back five times each, reloaded through
`POST /v1/admin/reload` and through SIGHUP. Every answer is a 200 whose image is its style's own, or a
404 for a style that was not live while the request was in flight; no 5xx; memory stays flat."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from finestyle.bench.serve import rss_bytes
from finestyle.config import TrainConfig
from finestyle.export.swappable import add_style, remove_style, run_swappable_export
from finestyle.train.loop import run_train
from tests.conftest import prepare_small_dataset
from tests.integration.test_server import wait_ready

pytestmark = pytest.mark.slow

Q = {"log": lambda m: None}
STYLES = ("ink", "chalk", "ember")
MOVING = "ember"  # removed and added back; the others stay live
LOAD_S = 60.0
BODY = {"prompt": "a red boat", "seed": 7, "steps": 2, "width": 64, "height": 64, "response_format": "png"}


def _image(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("reload")
    ds = prepare_small_dataset(root / "data")
    adapters = {}
    for seed, name in enumerate(STYLES):
        cfg = TrainConfig(
            dataset=str(ds),
            base="builtin:tiny-sd",
            out=str(root / name),
            steps=4,
            lr=5e-2,
            resolution=64,
            rank=4,
            samples=False,
            seed=seed,
        )
        adapters[name] = Path(run_train(cfg, **Q).adapter)
    out = root / "studio"
    run_swappable_export("builtin:tiny-sd", [str(adapters[n]) for n in STYLES], list(STYLES), str(out), **Q)
    return out, adapters


def _live_after(url: str, style: str, present: bool, timeout: float = 60) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        ids = [d["id"] for d in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
        if (style in ids) == present:
            return
        time.sleep(0.1)
    raise AssertionError(f"{style} {'never appeared' if present else 'never left'}: {ids}")


def test_styles_change_under_load_without_a_failed_request(studio):
    export, adapters = studio
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    token = "reload-token"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finestyle.cli",
            "serve",
            str(export),
            "--port",
            str(port),
            "--max-batch",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FINESTYLE_ADMIN_TOKEN": token},
    )
    try:
        wait_ready(url, 120)
        refs = {}
        for name in STYLES:  # each style's image, alone on an idle server
            r = httpx.post(url + "/v1/generate", json={**BODY, "style": name}, timeout=120)
            assert r.status_code == 200, r.text
            refs[name] = _image(r.content)
        assert (
            max(np.abs(refs["ink"] - refs["ember"]).max(), np.abs(refs["ink"] - refs["chalk"]).max()) > 0.05
        )

        results: list[tuple[float, float, str, int, bytes]] = []
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(timeout=120) as c:
                i = k
                while not stop.is_set():
                    name = STYLES[i % len(STYLES)]
                    i += 1
                    t0 = time.monotonic()
                    r = c.post(url + "/v1/generate", json={**BODY, "style": name})
                    results.append((t0, time.monotonic(), name, r.status_code, r.content))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(10)  # warm up first: the runtime's memory grows to the batch shapes the load forms
        # (start, end, live after): while a change is under way the style may be either
        changes: list[tuple[float, float, bool]] = []
        rss_first, rss = None, []
        for _cycle in range(5):
            t0 = time.monotonic()
            remove_style(str(export), MOVING, **Q)
            r = httpx.post(url + "/v1/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=60)
            assert r.status_code == 200 and MOVING not in r.json()["styles"], r.text
            changes.append((t0, time.monotonic(), False))
            rss.append(rss_bytes(proc.pid) >> 20)
            if rss_first is None:
                rss_first = rss_bytes(proc.pid)
            time.sleep(2)
            t0 = time.monotonic()
            add_style(str(export), str(adapters[MOVING]), MOVING, **Q)
            proc.send_signal(signal.SIGHUP)
            _live_after(url, MOVING, True)
            changes.append((t0, time.monotonic(), True))
            time.sleep(2)
        time.sleep(max(0.0, LOAD_S - (time.monotonic() - t_start)))
        stop.set()
        for t in threads:
            t.join(timeout=180)
        rss_last = rss_bytes(proc.pid)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=60)

    # MOVING's state over time: live, dead, or either while a change is under way
    segments, t, state = [], float("-inf"), "live"
    for start, end, after in changes:
        segments += [(t, start, state), (start, end, "either")]
        t, state = end, "live" if after else "dead"
    segments.append((t, float("inf"), state))

    def could_be(want: str, t0: float, t1: float) -> bool:
        return any(a <= t1 and t0 <= b and st in (want, "either") for a, b, st in segments)

    statuses: dict[int, int] = {}
    for t0, t1, name, status, content in results:
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 404), (status, content[:300])
        if status == 404:
            assert name == MOVING and could_be("dead", t0, t1), (name, t0 - t_start, t1 - t_start)
        else:
            assert name != MOVING or could_be("live", t0, t1), (name, t0 - t_start, t1 - t_start)
            diff = np.abs(_image(content) - refs[name]).max()
            assert diff <= 1 / 255 + 1e-6, (name, diff)
    assert statuses.get(200, 0) >= 40, statuses  # the load really ran through the changes
    assert rss_last <= 1.10 * rss_first, (rss, rss_last >> 20)
    print(
        f"reload under load: {statuses} over {len(changes)} reloads; RSS {rss_first >> 20} -> {rss_last >> 20} MiB"
    )
