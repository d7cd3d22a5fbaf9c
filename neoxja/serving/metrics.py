"""Prometheus metrics under vLLM's names with a `neoxja:` prefix, so vLLM dashboards work unchanged."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """Called from the engine's thread (prometheus_client is thread-safe)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("neoxja:time_to_first_token_seconds", "Time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("neoxja:inter_token_latency_seconds", "Inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e_latency = Histogram("neoxja:e2e_request_latency_seconds", "End to end request latency in seconds.",
                                     labels, buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("neoxja:request_queue_time_seconds", "Time spent waiting for a slot in seconds.",
                               labels, buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.running = Gauge("neoxja:num_requests_running", "Number of requests in model execution batches.",
                             labels, registry=r).labels(model_name)
        self.waiting = Gauge("neoxja:num_requests_waiting", "Number of requests waiting to be processed.",
                             labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("neoxja:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("neoxja:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(model_name)
        self._success = Counter("neoxja:request_success", "Count of successfully processed requests.",
                                labels + ["finished_reason"], registry=r)
        self.model_name = model_name

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def queue_time(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, request, reason: str) -> None:
        import time

        self.prompt_tokens.inc(request.num_prefilled)
        self.generation_tokens.inc(len(request.output_ids))
        if reason != "abort":
            self._success.labels(self.model_name, reason).inc()
            self.e2e_latency.observe(time.monotonic() - request.arrival_time)
