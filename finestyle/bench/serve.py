"""`finestyle bench serve`: the server under load (throughput, latency percentiles, batching, soak)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finestyle.bench.common import free_port
from finestyle.config import ExportConfig
from finestyle.export.steps import run_export


class ServerProcess:
    """`finestyle serve` in a subprocess on 127.0.0.1; stopped with SIGTERM (drains)."""

    def __init__(self, export: str, extra: list[str], env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finestyle.cli.app", "serve", export, "--port", str(self.port), *extra],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> ServerProcess:
        import httpx

        t_end = time.time() + 300  # a cold OpenVINO warm-up compiles every batch size first
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def builtin_export(out: str) -> str:
    """A fresh export of the tiny builtin (no adapter) to serve."""
    run_export(ExportConfig(base="builtin:tiny-sd", adapter=None, out=out, device="cpu"), log=lambda m: None)
    return out


def load_level(
    url: str,
    concurrency: int,
    n_requests: int | None,
    steps: int,
    time_limit: float,
    size: int | None = None,
    styles: list[str] | None = None,
) -> dict[str, Any]:
    import itertools
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

    counter = iter(range(n_requests)) if n_requests else itertools.count()
    take = threading.Lock()

    def client() -> None:
        # closed loop: each client sends its next request when the previous one is answered
        while time.time() <= deadline:
            with take:
                i = next(counter, None)
            if i is None:
                return
            one(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(client) for _ in range(concurrency)]:
            f.result()
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
        "max_s": float(max(lat)) if lat else float("nan"),
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
        export = export or builtin_export(f"{d}/export")
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


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def metric_shape_compiles(url: str) -> int:
    """The server's `finestyle_shape_compiles` gauge."""
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("finestyle_shape_compiles "):
            return int(float(line.split()[1]))
    return 0


def soak_once(
    export: str, runtime: str, warmup: str, seconds: float, concurrency: int, steps: int
) -> dict[str, Any]:
    """One server under `concurrency` closed-loop clients for `seconds`: errors, latency, compiles
    and resident memory (sampled each second). The OpenVINO compile cache starts empty, as on a
    fresh host."""
    import tempfile
    import threading

    import numpy as np

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        with ServerProcess(
            export,
            ["--runtime", runtime, "--warmup", warmup, "--max-batch", "8", "--queue-size", "64"],
            env={"FINESTYLE_OV_CACHE": cache},
        ) as s:
            start_s = time.perf_counter() - t0
            compiles_at_ready = metric_shape_compiles(s.url)
            rss: list[tuple[float, int]] = []
            stop = threading.Event()

            def sample() -> None:
                t = time.perf_counter()
                while not stop.wait(1.0):
                    rss.append((time.perf_counter() - t, rss_bytes(s.proc.pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            level = load_level(s.url, concurrency, None, steps, seconds)
            stop.set()
            sampler.join()
            compiles_at_end = metric_shape_compiles(s.url)
    # memory after the first tenth of the run (allocator pools and first batches settled) vs the end
    settled = [b for t, b in rss if t >= seconds / 10] or [b for _, b in rss]
    first, last = float(np.median(settled[: max(1, len(settled) // 5)])), float(np.median(settled[-5:]))
    return {
        **level,
        "warmup": warmup,
        "seconds": seconds,
        "start_to_ready_s": start_s,
        "shape_compiles_at_ready": compiles_at_ready,
        "shape_compiles_during_load": compiles_at_end - compiles_at_ready,
        "rss_settled_bytes": first,
        "rss_end_bytes": last,
        "rss_growth": last / first - 1,
        "rss_samples": len(rss),
    }


def bench_soak(
    export: str | None = None,
    runtime: str = "openvino",
    seconds: float = 120.0,
    concurrency: int = 4,
    steps: int = 4,
    modes: tuple[str, ...] = ("off", "on"),
) -> dict[str, Any]:
    """The server soak: `seconds` at `concurrency`, warm-up off then on, side by side in one run."""
    import tempfile

    from finestyle.core.env import cpu_name

    with tempfile.TemporaryDirectory() as d:
        export = export or builtin_export(f"{d}/export")
        runs = {m: soak_once(export, runtime, m, seconds, concurrency, steps) for m in modes}
    out: dict[str, Any] = {"cpu": cpu_name(), "runtime": runtime, "concurrency": concurrency, "runs": runs}
    if "off" in runs and "on" in runs and runs["on"]["p95_s"]:
        for q in ("p95", "p99", "max"):
            out[f"{q}_off_over_on"] = runs["off"][f"{q}_s"] / runs["on"][f"{q}_s"]
    return out
