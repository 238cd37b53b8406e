"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Request, engine and job metrics (names prefixed ``difflora_``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("difflora_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "difflora_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_LAT,
            registry=r,
        )
        self.queue_depth = Gauge("difflora_queue_depth", "model requests waiting for the worker", registry=r)
        self.rejected = Counter("difflora_queue_rejected", "requests refused because the queue was full", registry=r)
        self.batch_images = Histogram(
            "difflora_batch_images", "images per model call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.batches = Counter(
            "difflora_batches",
            "model calls by how they got their adapters (merged | per_sample)",
            ["mode"],
            registry=r,
        )
        self.batch_identities = Histogram(
            "difflora_batch_identities",
            "distinct adapters per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.predict_seconds = Histogram(
            "difflora_predict_seconds", "hypernet predict seconds", buckets=_LAT, registry=r
        )
        self.apply_seconds = Histogram(
            "difflora_apply_seconds",
            "adapter apply/restore seconds",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
            registry=r,
        )
        self.step_seconds = Histogram(
            "difflora_step_seconds", "seconds per denoising step (whole batch)", buckets=_LAT, registry=r
        )
        self.generate_seconds = Histogram(
            "difflora_generate_seconds", "model seconds per batch", buckets=_LAT, registry=r
        )
        self.face_seconds = Histogram(
            "difflora_face_seconds", "face embedding seconds per identity", buckets=_LAT, registry=r
        )
        self.cache = Counter("difflora_adapter_cache", "adapter cache lookups", ["result"], registry=r)
        self.jobs = Gauge("difflora_jobs", "batch jobs by state", ["state"], registry=r)
        self.ready = Gauge("difflora_ready", "1 when models are loaded and warmed up", registry=r)
