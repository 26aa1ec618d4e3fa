"""Dynamic batching: a bounded queue, and one worker that runs requests of the same shape in one
denoising loop, waiting at most `max_wait_ms` for company.
"""

import asyncio
import io
import time
from dataclasses import dataclass
from typing import Any

from finestyle.config import ServeConfig
from finestyle.runtime.generate import (
    Backend,
    GenerationRequest,
    generate_batch,
    shape_key,
)
from finestyle.serve.metrics import Metrics


@dataclass
class Job:
    req: GenerationRequest
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Pulls jobs from the queue, groups same-shape jobs, runs them in a worker thread."""

    def __init__(self, backend: Backend, cfg: ServeConfig, metrics: Metrics) -> None:
        self.backend, self.cfg, self.metrics = backend, cfg, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=cfg.queue_size)
        self.pending: list[Job] = []  # taken from the queue but not matching the current batch
        self.busy = False
        self.last_batch = 1
        self.task: asyncio.Task | None = None

    def depth(self) -> int:
        return self.queue.qsize() + len(self.pending)

    def _take_nowait(self) -> Job | None:
        if self.pending:
            return self.pending.pop(0)
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _next(self, timeout: float | None) -> Job | None:
        if self.pending:
            return self.pending.pop(0)
        try:
            if timeout is None:
                return await self.queue.get()
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first is None:
                continue
            batch = [first]
            n = first.req.num_images
            key = shape_key(first.req)
            if self.cfg.batching:
                # Wait for company only when there is concurrency (the last loop was a batch, or
                # requests are queued): a lone client then pays no batching latency.
                # The wait ends at max_wait_ms, or earlier once the burst is over: no arrival for
                # max_gap_ms (closed-loop clients re-send within a few ms of their answers, so
                # waiting on for a batch that cannot fill only adds latency).
                wait_s = self.cfg.max_wait_ms / 1000 if (self.last_batch > 1 or self.depth() > 0) else 0.0
                deadline = loop.time() + wait_s
                gap_s = self.cfg.max_gap_ms / 1000
                held: list[Job] = []
                cap = max(self.cfg.batch_sizes or [self.cfg.max_batch])
                while n < cap:
                    nxt = self._take_nowait()
                    if nxt is None:
                        left = min(deadline - loop.time(), gap_s)
                        if left <= 0:
                            break
                        nxt = await self._next(left)
                        if nxt is None:
                            break
                    if shape_key(nxt.req) == key and n + nxt.req.num_images <= cap:
                        batch.append(nxt)
                        n += nxt.req.num_images
                    else:
                        held.append(nxt)
                allowed = self.cfg.batch_sizes
                while allowed and n not in allowed and len(batch) > 1:
                    # run the largest allowed size; the rest go first in the next loop
                    extra = batch.pop()
                    n -= extra.req.num_images
                    held.insert(0, extra)
                self.pending = held + self.pending
            self.last_batch = len(batch)
            batch = [j for j in batch if not j.future.done()]  # timed-out clients
            if not batch:
                continue
            self.busy = True
            try:
                results = await loop.run_in_executor(
                    None, generate_batch, self.backend, [j.req for j in batch]
                )
                self.metrics.batch([j.req for j in batch], [style_of(self.backend, j.req) for j in batch])
                for j, imgs in zip(batch, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(imgs)
            except Exception as exc:  # noqa: BLE001 - answer every waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            finally:
                self.busy = False


def style_of(be: Backend | None, req: GenerationRequest) -> str | None:
    """The style a request runs in (a swappable export's name), for the per-style metrics."""
    if be is None or be.kv is None:
        return None
    return req.style or be.default_style


def encode_pngs(images: list[Any], meta: dict[str, str]) -> list[bytes]:
    """PNG bytes with the provenance text chunks."""
    from PIL.PngImagePlugin import PngInfo

    out = []
    for im in images:
        info = PngInfo()
        for k, v in meta.items():
            info.add_itxt(k, v)
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=info)
        out.append(buf.getvalue())
    return out


async def submit_request(state: dict[str, Any], cfg: ServeConfig, req: GenerationRequest) -> tuple[int, Any]:
    """Queue a request and wait: (200, images) or (status, message)."""
    batcher: Batcher = state["batcher"]
    fut = asyncio.get_running_loop().create_future()
    try:
        batcher.queue.put_nowait(Job(req, fut, time.monotonic()))
    except asyncio.QueueFull:
        return 503, f"queue full ({cfg.queue_size} waiting); retry later"
    state["in_flight"] += 1
    try:
        return 200, await asyncio.wait_for(fut, cfg.timeout_s)
    except asyncio.TimeoutError:
        return 504, f"timed out after {cfg.timeout_s:g} s"
    finally:
        state["in_flight"] -= 1
