"""The server's life: start-up and drain, SIGHUP reloads, SIGTERM drains then exits 0, and a busy port
refused before any model loads.
"""

import asyncio
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

from finestyle.config import ServeConfig
from finestyle.core.errors import UserError
from finestyle.runtime.generate import (
    Backend,
    GenerationRequest,
    generate_batch,
    load_backend,
)
from finestyle.serve.batcher import Batcher
from finestyle.serve.metrics import Metrics


async def reload_styles(state: dict[str, Any]) -> Any:
    """Re-read a swappable export's styles without a restart (admin endpoint and SIGHUP)."""
    from fastapi.responses import JSONResponse

    be: Backend = state["backend"]
    if be.reload is None:
        return JSONResponse({"detail": "this export is not swappable: nothing to reload"}, status_code=409)
    try:
        styles = await asyncio.to_thread(be.reload)
    except UserError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)
    return {"styles": styles}


def shape_compiles(be: Backend | None) -> int:
    """Per-shape compiles the backend has done (OpenVINO compiles each input shape once)."""
    parts = be.parts.values() if be is not None else ()
    return sum(getattr(c, "compiles", 0) for c in parts)


def warm_up(be: Backend, cfg: ServeConfig) -> str | None:
    """One 1-step loop at each batch size the batcher can form (`batch_sizes`, or 1..max_batch; requests
    of one image at the model's native size and default guidance), so that no request waits for a
    compile."""
    if cfg.warmup == "off" or (cfg.warmup == "auto" and not be.name.startswith("openvino")):
        return None
    t0 = time.perf_counter()
    sizes = sorted(cfg.batch_sizes or range(1, cfg.max_batch + 1)) if cfg.batching else [1]
    for n in sizes:
        generate_batch(be, [GenerationRequest(prompt="warm-up", steps=1, seed=i) for i in range(n)])
    return (
        f"serve: warmed up batch sizes {', '.join(map(str, sizes))} in {time.perf_counter() - t0:.1f} s "
        f"({shape_compiles(be)} shape compiles; other sizes and guidance settings compile on first use)"
    )


def make_lifespan(cfg: ServeConfig, backend: Backend | None, state: dict[str, Any], metrics: Metrics) -> Any:
    """Start-up (load the export, start the batcher) and shutdown (drain, then stop the worker)."""

    @asynccontextmanager
    async def lifespan(app: Any):
        be = backend or await asyncio.get_running_loop().run_in_executor(
            None, lambda: load_backend(cfg.export, cfg.runtime, cfg.providers, dtype=cfg.dtype)
        )
        state["backend"] = be
        print(f"serve: runtime {be.name}", file=sys.stderr, flush=True)
        said = await asyncio.get_running_loop().run_in_executor(None, warm_up, be, cfg)
        if said:
            print(said, file=sys.stderr, flush=True)
        state["batcher"] = Batcher(be, cfg, metrics)
        state["batcher"].task = asyncio.create_task(state["batcher"].run())
        _on_sighup(state)
        _on_sigterm(state, cfg)
        state["ready"] = True
        try:
            yield
        finally:
            # drain: refuse new work, let accepted requests finish (bounded), then stop the worker
            state["draining"] = True
            state["ready"] = False
            t_end = time.monotonic() + cfg.drain_s
            while state["in_flight"] and time.monotonic() < t_end:
                await asyncio.sleep(0.05)
            state["batcher"].task.cancel()

    return lifespan


def _on_sighup(state: dict[str, Any]) -> None:
    """SIGHUP re-reads a swappable export's styles (where the loop runs in the main thread)."""
    import signal
    import sys

    if state["backend"].reload is None or not hasattr(signal, "SIGHUP"):
        return

    def hup() -> None:
        async def go() -> None:
            res = await reload_styles(state)
            msg = res.body.decode() if hasattr(res, "body") else f"styles {', '.join(res['styles'])}"
            print(f"serve: SIGHUP reload: {msg}", file=sys.stderr, flush=True)

        asyncio.ensure_future(go())

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. embedded)
        pass


async def drain_then_exit(state: dict[str, Any], cfg: ServeConfig) -> None:
    """SIGTERM: turn not-ready at once (new requests get 503 with Retry-After), let the accepted ones
    finish for up to `drain_s`, then stop the server, which exits 0."""
    import signal

    if state.get("terminating"):
        return
    state.update(terminating=True, draining=True, ready=False)
    print(
        f"serve: SIGTERM: not ready; draining {state['in_flight']} request(s) in flight (up to {cfg.drain_s:g} s)",
        file=sys.stderr,
        flush=True,
    )
    t_end = time.monotonic() + cfg.drain_s
    while state["in_flight"] and time.monotonic() < t_end:
        await asyncio.sleep(0.05)
    server = state.get("server")
    if server is not None:
        server.should_exit = True
    else:  # run by another launcher: hand it the usual graceful stop
        signal.raise_signal(signal.SIGINT)


def _on_sigterm(state: dict[str, Any], cfg: ServeConfig) -> None:
    """Take SIGTERM over from uvicorn (which would stop listening first and exit 143): drain, exit 0."""
    import signal

    try:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(drain_then_exit(state, cfg))
        )
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. embedded)
        pass
