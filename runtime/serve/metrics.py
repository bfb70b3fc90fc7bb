"""Prometheus metrics of one server, in a registry of its own (never the process-global one).

- ``gemma4_requests_total{route, status}``: requests answered, by route template and HTTP status;
- ``gemma4_prompt_tokens_total``, ``gemma4_generated_tokens_total``: tokens of finished requests;
- ``gemma4_queue_depth``, ``gemma4_busy_slots``, ``gemma4_max_batch``: read from ``engine.stats()`` at scrape time;
- ``gemma4_time_to_first_token_seconds``: submit to first generated token;
- ``gemma4_inter_token_latency_seconds``: between consecutive generated tokens of one request.

Does not time anything itself: the routes report what they measured.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Gauges read from ``engine.stats()`` when scraped."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def collect(self):
        stats = self._engine.stats()
        for key, doc in (("queue_depth", "requests waiting for a slot"), ("busy_slots", "slots generating"),
                         ("max_batch", "slots in the engine")):
            yield GaugeMetricFamily(f"gemma4_{key}", doc, value=float(stats.get(key, 0)))

    def describe(self):
        return []


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("gemma4_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gemma4_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("gemma4_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("gemma4_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gemma4_inter_token_latency_seconds", "time between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
