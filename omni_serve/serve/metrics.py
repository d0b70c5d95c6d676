"""Prometheus metrics of the controller and the worker, each in its own registry.

One registry per app (never prometheus-client's process-wide default) so that several apps can live
in one test process. Values that mirror live state (registered workers, queue lengths, requests in
flight) are read at scrape time by a collector instead of being copied into gauges that go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds; first audio of the 8B model on a GPU is ~0.2 s, on a CPU worker seconds.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


# {metric name: (help, {label values: value}, label names)}
LiveValues = dict[str, tuple[str, dict[tuple[str, ...], float], tuple[str, ...]]]


class LiveGauges(Collector):
    """Gauges computed when scraped from what `read()` returns."""

    def __init__(self, read: Callable[[], LiveValues]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (doc, values, labels) in self.read().items():
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family


class ControllerMetrics:
    def __init__(self, read_live: Callable[[], LiveValues]) -> None:
        self.registry = CollectorRegistry()
        self.dispatches = Counter("omni_controller_dispatches", "worker addresses handed out, by model and outcome",
                                  ["model", "outcome"], registry=self.registry)
        self.registrations = Counter("omni_controller_registrations", "worker registrations, by outcome",
                                     ["outcome"], registry=self.registry)
        self.removals = Counter("omni_controller_worker_removals", "workers dropped, by reason",
                                ["reason"], registry=self.registry)
        self.errors = Counter("omni_controller_errors", "refused or failed controller requests, by code",
                              ["code"], registry=self.registry)
        self.registry.register(LiveGauges(read_live))


class WorkerMetrics:
    def __init__(self, read_live: Callable[[], LiveValues]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("omni_worker_requests", "generation requests accepted, by request shape",
                                ["shape"], registry=self.registry)
        self.errors = Counter("omni_worker_errors", "requests refused or failed, by code", ["code"],
                              registry=self.registry)
        self.first_audio = Histogram("omni_worker_first_audio_seconds", "request arrival to first audio chunk",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(LiveGauges(read_live))


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
