"""Readiness probes: is each dependency of the API usable right now?

Used by `GET /readyz` and by `fhir-rerank serve` at start-up (one log line per dependency).
Each probe returns a `Check` and never raises; each is bounded by `readyz_timeout`.
- fhir: the FHIR server answers `GET [base]/metadata` (any status below 500), or the file
  source holds resources;
- redis: `PING` answers (only when `redis_url` is set);
- workers: a live Celery worker consumes the queue of every model in `models_allowed` (the
  workers' heartbeats in Redis, `adapter.jobs.live_workers`);
- models: in-process mode only: the reranker of every allowed model is loaded.

A reranker that could not load its model serves BM25 keyword order: that is not ready (503,
the reason in the check) unless `allow_keyword_fallback` says keyword order is acceptable, when
the check passes as `degraded` and /readyz answers 200 "degraded".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from adapter.config import Settings
from adapter.jobs import live_workers
from adapter.jobs.heartbeat import degraded_workers
from adapter.jobs.routing import queue_for_model, worker_command
from adapter.runtime import Runtime


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    degraded: bool = False  # passes only because allow_keyword_fallback accepts keyword order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def probe_source(source: Any, timeout: float) -> Check:
    base = getattr(source, "base_url", None)
    if base:
        import requests

        where = urlsplit(base)._replace(query="", fragment="").geturl()
        try:
            resp = requests.get(base + "/metadata", timeout=timeout,
                                headers={"Accept": "application/fhir+json"})
        except requests.RequestException as exc:
            return Check("fhir", False, f"{where} unreachable ({type(exc).__name__})")
        ok = resp.status_code < 500
        return Check("fhir", ok, f"{where} answered {resp.status_code} to /metadata")
    try:
        count = source.count()
    except Exception as exc:  # unreadable directory and the like
        return Check("fhir", False, f"file source unreadable ({type(exc).__name__})")
    return Check("fhir", count > 0, f"file source with {count} resources")


def redis_where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials."""
    return url.split("@")[-1].split("://")[-1]


def probe_redis(settings: Settings) -> Check:
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.readyz_timeout,
                                      socket_connect_timeout=settings.readyz_timeout)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as exc:
        return Check("redis", False, f"{redis_where(settings.redis_url)} unreachable "
                                     f"({type(exc).__name__})")
    return Check("redis", True, f"{redis_where(settings.redis_url)} answers PING")


def expected_queues(settings: Settings) -> dict[str, list[str]]:
    """queue name → the allowed models whose jobs go there."""
    queues: dict[str, list[str]] = {}
    for model in dict.fromkeys([settings.model, *settings.models_allowed]):
        queues.setdefault(queue_for_model(settings, model), []).append(model)
    return queues


def probe_workers(settings: Settings) -> Check:
    """Every allowed model's queue has a live worker (names the command when not). Reads the
    workers' own heartbeats in Redis (`adapter.jobs.live_workers`), the same view that turns
    a job for an unconsumed queue into a 503, so readiness and job submission agree."""
    try:
        consumers = live_workers(settings)
        degraded = degraded_workers(settings)
    except Exception as exc:  # broker down: redis errors of several kinds
        return Check("workers", False, f"could not ask the workers ({type(exc).__name__})")
    missing = [(q, models) for q, models in expected_queues(settings).items()
               if not consumers.get(q)]
    if missing:
        return Check("workers", False, "; ".join(
            f"no worker consumes {q} (models {', '.join(m)}); start one with "
            f"`{worker_command(q)}`" for q, m in missing))
    live = ", ".join(f"{q}: {consumers[q]} worker(s)" for q in expected_queues(settings))
    keyword = [(q, r) for q, r in degraded.items() if q in expected_queues(settings)]
    if keyword:
        detail = live + "; " + "; ".join(
            f"a worker on {q} serves BM25 keyword order, its model is unavailable: {r}"
            for q, r in keyword)
        return _fallback("workers", detail, settings)
    return Check("workers", True, live)


def _fallback(name: str, detail: str, settings: Settings) -> Check:
    """A check whose backend serves keyword order: degraded when allowed, else not ready."""
    if settings.allow_keyword_fallback:
        return Check(name, True, detail + " (allow_keyword_fallback = true)", degraded=True)
    return Check(name, False, detail + "; fix the model, or set allow_keyword_fallback = true "
                                       "to accept keyword order as ready (degraded)")


def probe_models(runtime: Runtime) -> Check:
    """In-process mode: each allowed model's reranker is loaded in the app's runtime."""
    settings = runtime.settings
    parts, ok, keyword = [], True, False
    for model in dict.fromkeys([settings.model, *settings.models_allowed]):
        reranker = runtime.loaded_reranker(model)
        if reranker is None:
            ok = False
            parts.append(f"{model}: not loaded")
        elif getattr(reranker, "fallback_reason", None):
            keyword = True
            parts.append(f"{model}: unavailable, serving BM25 keyword order: "
                         f"{reranker.fallback_reason}")
        else:
            parts.append(f"{model}: {reranker.describe()}")
    if ok and keyword:
        return _fallback("models", "; ".join(parts), settings)
    return Check("models", ok, "; ".join(parts))


def readiness(settings: Settings, source: Any, runtime: Runtime) -> list[Check]:
    checks = [probe_source(source, settings.readyz_timeout)]
    if settings.redis_url:
        checks.append(probe_redis(settings))
        checks.append(probe_workers(settings) if checks[-1].ok else
                      Check("workers", False, "unknown: Redis is unreachable"))
    else:
        checks.append(probe_models(runtime))
    return checks
