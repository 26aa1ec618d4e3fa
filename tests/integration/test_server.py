"""The HTTP server: a real uvicorn on 127.0.0.1 and a real HTTP client."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from finestyle.config import EMPTY_PROMPT, ExportConfig, ServeConfig
from finestyle.core.errors import UserError
from finestyle.export.steps import run_export
from finestyle.serve.app import create_app


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("srv") / "e"
    run_export(
        ExportConfig(
            base="builtin:tiny-sd",
            adapter=None,
            out=str(out),
            device="cpu",
            check_bf16=False,  # not under test here (test_export)
            check_openvino=False,
        ),
        log=lambda m: None,
    )
    return out


def wait_ready(url: str, seconds: float) -> None:
    t_end = time.time() + seconds
    while time.time() < t_end:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not become ready in {seconds:g} s")


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_ready(self.url, 60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_good_request_bad_requests_and_metrics(export_dir):
    with Server(
        ServeConfig(export=str(export_dir), max_steps=10, max_size=128, max_images=2, max_body_bytes=2000)
    ) as s:
        r = httpx.post(
            s.url + "/v1/generate", json={"prompt": "a red boat", "steps": 2, "seed": 3}, timeout=60
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        import io

        im = Image.open(io.BytesIO(r.content))
        assert im.size == (64, 64) and im.text["finestyle:prompt"] == "a red boat"
        r = httpx.post(
            s.url + "/v1/generate",
            json={
                "prompt": "x",
                "steps": 2,
                "num_images": 2,
                "response_format": "json",
                "scheduler": "euler_a",
            },
            timeout=60,
        )
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        # no seed: a fresh random one each time, echoed so the image can be reproduced
        body = {"prompt": "a red boat", "steps": 2}
        r1, r2 = (httpx.post(s.url + "/v1/generate", json=body, timeout=60) for _ in range(2))
        assert r1.headers["X-Seed"] != r2.headers["X-Seed"] and r1.content != r2.content
        again = httpx.post(
            s.url + "/v1/generate", json=body | {"seed": int(r1.headers["X-Seed"])}, timeout=60
        )
        assert Image.open(io.BytesIO(again.content)).tobytes() == Image.open(io.BytesIO(r1.content)).tobytes()
        bad = [
            ({"prompt": ""}, EMPTY_PROMPT),
            ({"prompt": " \t "}, EMPTY_PROMPT),  # the CLI's own message (below)
            ({"prompt": "x", "steps": 0}, "steps"),
            ({"prompt": "x", "steps": 11}, "steps"),
            ({"prompt": "x", "width": 60}, "multiple of 8"),
            ({"prompt": "x", "height": 256}, "height"),
            ({"prompt": "x", "num_images": 3}, "num_images"),
            ({"prompt": "x", "colour": "red"}, "colour"),
            ({"prompt": "x", "guidance": -1}, "guidance"),
            ({"prompt": "word " * 40}, "tokens"),
            ({"prompt": "x", "style_guidance": 1.0}, "with-base-unet"),
            ({"prompt": "x", "scheduler": "plms"}, "unknown scheduler"),
        ]
        for body, word in bad:
            r = httpx.post(s.url + "/v1/generate", json=body, timeout=30)
            assert 400 <= r.status_code < 500, (body, r.status_code)
            assert word in r.text, (body, r.text)
        cli = subprocess.run(
            [sys.executable, "-m", "finestyle.cli", "generate", str(export_dir), " \t ", "--out", "x.png"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 2 and cli.stderr.strip() == f"error: {EMPTY_PROMPT}"
        r = httpx.post(
            s.url + "/v1/generate",
            content=b'{"prompt": "' + b"a" * 3000 + b'"}',
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 413
        health = httpx.get(s.url + "/healthz").json()
        # the default runtime is auto: it names what it chose on this machine, and why
        assert health["status"] == "ok" and "(auto: " in health["runtime"]
        info = httpx.get(s.url + "/v1/model").json()
        assert info["runtime"] == health["runtime"]
        assert info["base_model"] == "builtin:tiny-sd" and len(info["manifest_sha256"]) == 64
        m = httpx.get(s.url + "/metrics").text
        assert 'finestyle_requests_total{status="200"} 5.0' in m
        assert 'finestyle_requests_total{status="422"}' in m and "finestyle_queue_depth 0.0" in m
        assert "finestyle_images_total 6.0" in m
        assert f'finestyle_runtime{{runtime="{health["runtime"]}"}} 1.0' in m
        assert (
            'finestyle_request_seconds_bucket{le="+Inf"} 5.0' in m
            and "finestyle_request_seconds_count 5.0" in m
        )


def test_dynamic_batching_groups_concurrent_requests(export_dir):
    with Server(ServeConfig(export=str(export_dir), max_batch=8, max_wait_ms=200)) as s:
        with ThreadPoolExecutor(6) as ex:
            rs = list(
                ex.map(
                    lambda i: httpx.post(
                        s.url + "/v1/generate", json={"prompt": f"p{i}", "steps": 2, "seed": i}, timeout=60
                    ),
                    range(6),
                )
            )
        assert all(r.status_code == 200 for r in rs)
        m = httpx.get(s.url + "/metrics").text
        sizes = [
            int(line.split('size="')[1].split('"')[0])
            for line in m.splitlines()
            if line.startswith("finestyle_batch_size_total{")
        ]
        assert max(sizes) > 1, m


def test_flood_beyond_queue_gets_503_and_server_stays_up(export_dir):
    with Server(ServeConfig(export=str(export_dir), queue_size=2, max_batch=1, batching=False)) as s:

        def call(i):
            return httpx.post(s.url + "/v1/generate", json={"prompt": f"p{i}", "steps": 6}, timeout=120)

        with ThreadPoolExecutor(16) as ex:
            rs = list(ex.map(call, range(16)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 2, codes
        assert all(r.headers.get("retry-after") for r in rs if r.status_code == 503)
        assert httpx.get(s.url + "/healthz").status_code == 200
        m = httpx.get(s.url + "/metrics").text
        assert f'finestyle_requests_total{{status="503"}} {codes.count(503)}.0' in m


def test_batcher_stops_waiting_when_the_burst_is_over(monkeypatch):
    """Three same-shape requests arrive together: they run as one batch, and the batcher does not sit
    out the (long) max wait for a batch that cannot fill; it stops max_gap_ms after the last arrival."""
    import asyncio

    import finestyle.serve.app as srv
    import finestyle.serve.batcher as batcher
    from finestyle.runtime.generate import GenerationRequest

    sizes: list[int] = []

    def fake_generate_batch(backend, reqs):
        sizes.append(len(reqs))
        return [["img"] for _ in reqs]

    monkeypatch.setattr(batcher, "generate_batch", fake_generate_batch)

    async def scenario() -> float:
        cfg = ServeConfig(export="unused", max_batch=8, max_wait_ms=5000, max_gap_ms=20)
        b = srv.Batcher(backend=None, cfg=cfg, metrics=srv.Metrics())
        b.last_batch = 2  # there was concurrency: the batcher waits for company
        loop = asyncio.get_running_loop()
        jobs = [srv.Job(GenerationRequest(f"p{i}", steps=2), loop.create_future(), 0.0) for i in range(3)]
        for j in jobs:
            b.queue.put_nowait(j)
        t = time.perf_counter()
        b.task = asyncio.create_task(b.run())
        await asyncio.gather(*(j.future for j in jobs))
        b.task.cancel()
        return time.perf_counter() - t

    elapsed = asyncio.run(scenario())
    assert sizes == [3]
    assert elapsed < 2.5  # far below max_wait_ms=5000: the wait ended 20 ms after the last arrival


def test_the_batcher_forms_only_the_listed_batch_sizes(monkeypatch):
    """--batch-sizes 1,2,4: seven same-shape requests at once run as 4 + 2 + 1, never 7 or 3."""
    import asyncio

    import finestyle.serve.app as srv
    import finestyle.serve.batcher as batcher
    from finestyle.runtime.generate import GenerationRequest

    sizes: list[int] = []
    monkeypatch.setattr(
        batcher, "generate_batch", lambda be, reqs: sizes.append(len(reqs)) or [["i"] for _ in reqs]
    )

    async def scenario() -> None:
        cfg = ServeConfig(export="unused", max_batch=8, batch_sizes=[1, 2, 4], max_wait_ms=50, max_gap_ms=20)
        b = srv.Batcher(backend=None, cfg=cfg, metrics=srv.Metrics())
        loop = asyncio.get_running_loop()
        jobs = [srv.Job(GenerationRequest(f"p{i}", steps=2), loop.create_future(), 0.0) for i in range(7)]
        for j in jobs:
            b.queue.put_nowait(j)
        b.task = asyncio.create_task(b.run())
        await asyncio.gather(*(j.future for j in jobs))
        b.task.cancel()

    asyncio.run(scenario())
    assert sizes == [4, 2, 1], sizes
    with pytest.raises(UserError, match="serve.batch_sizes"):
        ServeConfig(export="unused", max_batch=4, batch_sizes=[8])


def test_torch_bf16_runtime_is_served_as_configured(export_dir):
    """`finestyle serve --runtime torch --dtype bf16` (the fast CPU path) really loads bf16 weights."""
    import io

    with Server(ServeConfig(export=str(export_dir), runtime="torch", dtype="bf16")) as s:
        assert httpx.get(s.url + "/v1/model").json()["runtime"] == "torch[cpu,bfloat16]"
        r = httpx.post(
            s.url + "/v1/generate", json={"prompt": "a red boat", "steps": 2, "seed": 1}, timeout=60
        )
        assert r.status_code == 200
        assert Image.open(io.BytesIO(r.content)).text["finestyle:runtime"] == "torch[cpu,bfloat16]"


def test_cli_serve_applies_every_limit_flag(export_dir, tmp_path):
    """`finestyle serve` flags and its YAML `serve:` section reach the running server."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve:\n  max_body_bytes: 300\n  min_steps: 3\n")
    args = [sys.executable, "-m", "finestyle.cli", "serve", str(export_dir), "--port", str(port)]
    args += ["--max-prompt-tokens", "6", "--max-steps", "4", "--config", str(cfg)]
    env = os.environ.copy()
    env["FINESTYLE_HOME"] = str(tmp_path / "state")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        assert httpx.get(url + "/v1/model").json()["limits"]["max_prompt_tokens"] == 6
        cases = [
            ({"prompt": "one two three four five six seven"}, 422, "limit is 6"),
            ({"prompt": "x", "steps": 2}, 422, "steps"),  # min_steps 3 from the YAML
            ({"prompt": "x", "steps": 5}, 422, "steps"),  # --max-steps 4
            ({"prompt": "x" * 400}, 413, "300"),  # max_body_bytes 300 from the YAML
        ]
        for body, code, word in cases:
            r = httpx.post(url + "/v1/generate", json=body, timeout=30)
            assert r.status_code == code and word in r.text, (body, r.status_code, r.text)
        assert (
            httpx.post(url + "/v1/generate", json={"prompt": "x", "steps": 3}, timeout=60).status_code == 200
        )
        # a second server on the same (now busy) port: one line, exit 2, before loading anything
        busy = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2, busy.stderr
        assert busy.stderr.strip().splitlines() == [
            f"error: cannot listen on 127.0.0.1:{port} (Address already in use); stop what uses that port "
            "or pass another --port"
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_size_limit_follows_the_model(export_dir):
    """No --max-size: twice the model's native size (the tiny builtin's 64 px gives 128)."""
    with Server(ServeConfig(export=str(export_dir), max_steps=4)) as s:
        assert httpx.get(s.url + "/v1/model").json()["limits"]["max_size"] == 128
        r = httpx.post(s.url + "/v1/generate", json={"prompt": "x", "steps": 1, "width": 256}, timeout=60)
        assert r.status_code == 422
        r = httpx.post(s.url + "/v1/generate", json={"prompt": "x", "steps": 1, "width": 128}, timeout=60)
        assert r.status_code == 200


def test_sigterm_drains_requests_in_flight_and_exits_0(export_dir, tmp_path):
    """Kubernetes' stop: SIGTERM with 8 requests in flight. Readiness turns 503 at once, liveness stays
    200, a new request gets 503 with Retry-After, all 8 accepted requests complete 200, exit code 0."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    args = [sys.executable, "-m", "finestyle.cli", "serve", str(export_dir), "--port", str(port)]
    args += ["--max-batch", "1", "--max-steps", "200", "--drain-s", "300", "--timeout-s", "600"]
    env = {**os.environ, "FINESTYLE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        body = {"prompt": "a red boat", "steps": 60, "seed": 1}  # 8 in a row: seconds on a quiet CPU
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(httpx.post, url + "/v1/generate", json=body, timeout=300) for _ in range(8)]
            t_end = time.monotonic() + 60
            while time.monotonic() < t_end:  # all 8 accepted (queued or running)
                m = httpx.get(url + "/metrics").text
                if "finestyle_in_flight 8.0" in m:
                    break
                time.sleep(0.05)
            assert "finestyle_in_flight 8.0" in m
            proc.send_signal(signal.SIGTERM)
            t_end = time.monotonic() + 10
            while httpx.get(url + "/health/ready").status_code != 503 and time.monotonic() < t_end:
                time.sleep(0.02)
            assert httpx.get(url + "/health/ready").status_code == 503
            assert httpx.get(url + "/health/live").status_code == 200
            late = httpx.post(url + "/v1/generate", json={"prompt": "x", "steps": 2}, timeout=30)
            assert late.status_code == 503 and late.headers.get("Retry-After")
            codes = [f.result().status_code for f in futs]
        assert codes == [200] * 8
        assert proc.wait(60) == 0
        assert "SIGTERM: not ready; draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
