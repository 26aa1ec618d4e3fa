"""`finestyle bench serve`: the server under load (throughput, latency percentiles, batching, soak)."""

from __future__ import annotations

import time
from typing import Any

from finestyle.bench.common import free_port
from finestyle.config import ExportConfig
from finestyle.export.steps import run_export


class ServerProcess:
    """`finestyle serve` in a subprocess on 127.0.0.1; stopped with SIGTERM (drains)."""

    def __init__(self, export: str, extra: list[str]) -> None:
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finestyle.cli.app", "serve", export, "--port", str(self.port), *extra],
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> ServerProcess:
        import httpx

        t_end = time.time() + 120
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def load_level(
    url: str,
    concurrency: int,
    n_requests: int,
    steps: int,
    time_limit: float,
    size: int | None = None,
    styles: list[str] | None = None,
) -> dict[str, Any]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import numpy as np

    lat: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.time() + time_limit
    local = threading.local()  # one keep-alive connection per client thread, as a real load generator

    def one(i: int) -> None:
        if time.time() > deadline:
            return
        t = time.perf_counter()
        try:
            body: dict[str, Any] = {"prompt": f"a red boat {i}", "steps": steps, "seed": i}
            if styles:
                body["style"] = styles[i % len(styles)]
            if size:
                body.update(width=size, height=size)
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            r = local.client.post(url + "/v1/generate", json=body)
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        codes[code] = codes.get(code, 0) + 1
        if code == 200:
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    q = np.percentile(lat, [50, 95, 99]) if lat else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "requests": sum(codes.values()),
        "ok": ok,
        "errors": sum(v for k, v in codes.items() if k != 200),
        "codes": codes,
        "p50_s": float(q[0]),
        "p95_s": float(q[1]),
        "p99_s": float(q[2]),
        "img_per_s": ok / wall,
    }


def bench_serve(
    export: str | None = None,
    levels: tuple[int, ...] = (1, 2, 4, 8),
    requests_per_level: int = 64,
    steps: int = 4,
    time_limit: float = 60.0,
    queue_size: int = 64,
    size: int | None = None,
    max_wait_ms: float = 60.0,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Throughput and latency with dynamic batching on and off, then an overload check."""
    import tempfile

    import httpx

    with tempfile.TemporaryDirectory() as d:
        if export is None:
            export = f"{d}/export"
            run_export(
                ExportConfig(base="builtin:tiny-sd", adapter=None, out=export, device="cpu"),
                log=lambda m: None,
            )
        out: dict[str, Any] = {
            "export": export,
            "steps": steps,
            "size": size,
            "max_wait_ms": max_wait_ms,
            "runtime": runtime,
            "levels": {},
        }
        for batching in (True, False):
            flag = "--batching" if batching else "--no-batching"
            with ServerProcess(
                export,
                [
                    flag,
                    "--queue-size",
                    str(queue_size),
                    "--max-batch",
                    "8",
                    "--max-wait-ms",
                    str(max_wait_ms),
                    "--runtime",
                    runtime,
                ],
            ) as s:
                load_level(s.url, 1, 2, steps, time_limit, size)  # warm-up
                out["levels"]["on" if batching else "off"] = [
                    load_level(s.url, c, max(requests_per_level, 2 * c), steps, time_limit, size)
                    for c in levels
                ]
        on8 = out["levels"]["on"][-1]["img_per_s"]
        off8 = out["levels"]["off"][-1]["img_per_s"]
        out["batching_ratio_at_max_concurrency"] = on8 / off8 if off8 else float("nan")
        # overload: a small queue and a flood; only 503s beyond it, and the server stays up
        with ServerProcess(export, ["--queue-size", "4", "--max-batch", "2", "--runtime", runtime]) as s:
            flood = load_level(s.url, 24, 48, steps, time_limit, size)
            alive = httpx.get(s.url + "/healthz", timeout=5).status_code == 200
        out["overload"] = {
            "queue_size": 4,
            "concurrency": 24,
            "codes": flood["codes"],
            "server_alive": alive,
            "only_503_beyond_queue": set(flood["codes"]) <= {200, 503},
        }
    return out
