"""The server's Prometheus metrics: requests by status, the latency histogram, queue depth, batch sizes."""

from finestyle.runtime.generate import (
    GenerationRequest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))


class Metrics:
    """Prometheus metrics in a registry of this app's own (prometheus_client's exposition format and
    histogram semantics); several apps in one process never share counters."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "finestyle_requests",
            "Requests to the generation endpoints by HTTP status.",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "finestyle_request_seconds",
            "Latency of successful generation requests.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.style_requests = Counter(
            "finestyle_style_requests",
            "Generation requests by style and HTTP status.",
            ["style", "status"],
            registry=r,
        )
        self.style_images = Counter(
            "finestyle_style_images", "Images generated, by style.", ["style"], registry=r
        )
        self.batch_sizes = Counter(
            "finestyle_batch_size", "Denoising loops run, by images in the batch.", ["size"], registry=r
        )
        self.images = Counter("finestyle_images", "Images generated.", registry=r)
        self.queue_depth = Gauge(
            "finestyle_queue_depth", "Requests waiting for the inference worker.", registry=r
        )
        self.in_flight = Gauge("finestyle_in_flight", "Requests accepted and not yet answered.", registry=r)
        self.compiles = Gauge(
            "finestyle_shape_compiles",
            "Input shapes the runtime has compiled (OpenVINO: one per shape; 0 for shape-dynamic runtimes).",
            registry=r,
        )
        self.runtime = Gauge(
            "finestyle_runtime",
            "The runtime serving requests (1), labelled with its name and, under --runtime auto, why.",
            ["runtime"],
            registry=r,
        )

    def observe(self, status: int, seconds: float | None, style: str | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if style is not None:
            self.style_requests.labels(style=style, status=str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def batch(self, reqs: list[GenerationRequest], styles: list[str | None]) -> None:
        n = sum(r.num_images for r in reqs)
        self.batch_sizes.labels(size=str(n)).inc()
        self.images.inc(n)
        for r, st in zip(reqs, styles, strict=True):
            if st is not None:
                self.style_images.labels(style=st).inc(r.num_images)

    def render(self, queue_depth: int, in_flight: int, compiles: int = 0, runtime: str = "") -> bytes:
        from prometheus_client import generate_latest

        if runtime:
            self.runtime.labels(runtime=runtime).set(1)
        self.queue_depth.set(queue_depth)
        self.in_flight.set(in_flight)
        self.compiles.set(compiles)
        return generate_latest(self.registry)
