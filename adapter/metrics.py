"""Every Prometheus metric the adapter exports, defined in one place.

Labels are of low cardinality only: a route template, a method, a status, a stage, a job state,
a cache name, a backend. Never a patient id, a question, a URL or a job id.

Under gunicorn (`fhir-rerank serve`) each process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (set by `serve` before any worker starts) and `/metrics` merges them;
without that variable (tests, `--dev`) the process's own registry is served. Add new metrics
here (e.g. tokens scored per tier) so every process defines the same set.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter,
                               Histogram, generate_latest)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("fhir_rerank_requests_total", "HTTP requests answered",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("fhir_rerank_request_duration_seconds",
                            "Time to answer an HTTP request", ["route", "method"],
                            buckets=LATENCY_BUCKETS)
JOBS = Counter("fhir_rerank_jobs_total",
               "Search jobs by state reached (submitted, done, failed, cancelled); a finished "
               "job counts once, when its answer is first read", ["state"])
QUEUE_WAIT = Histogram("fhir_rerank_job_queue_wait_seconds",
                       "Time a job waited in its queue before a worker started it (observed "
                       "once per job, when its answer is first read)", buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram("fhir_rerank_stage_duration_seconds",
                          "Time per pipeline stage (fetch, flatten, recall, rerank)", ["stage"],
                          buckets=LATENCY_BUCKETS)
MODEL_LOADS = Counter("fhir_rerank_model_loads_total",
                      "Reranker loads by backend and outcome (loaded, fallback, failed)",
                      ["backend", "outcome"])
USAGE_TOKENS = Counter("fhir_rerank_usage_tokens_total",
                       "Prompt tokens scored, as billed, by API (fhir, rerank) and model tier",
                       ["api", "tier"])
USAGE_COST = Counter("fhir_rerank_usage_cost_usd_total",
                     "Cost of the tokens scored at list price (USD), by API and model tier",
                     ["api", "tier"])
CACHE_LOOKUPS = Counter("fhir_rerank_cache_lookups_total",
                        "Per-process cache lookups by cache and result (hit, miss)",
                        ["cache", "result"])


@contextmanager
def timed_stage(stage: str) -> Iterator[None]:
    """Observe the wall time of one pipeline stage."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage).observe(time.perf_counter() - start)


def cache_lookup(cache: str | None, hit: bool) -> None:
    if cache:
        CACHE_LOOKUPS.labels(cache, "hit" if hit else "miss").inc()


def exposition() -> tuple[bytes, str]:
    """The text format of every metric: merged across processes under gunicorn."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a gone gunicorn worker's live gauges (counters and histograms are kept)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
