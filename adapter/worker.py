"""Celery workers for reranking: one worker serves the queues of the model tiers it is given.

Two ways to start one (same behaviour, same settings from config/ and FHIR_RERANK_*):

    fhir-rerank worker --tiers 0.6B,4B --concurrency 1
    celery -A celery_app worker -Q rerank.0.6B,rerank.4B --concurrency 1

Each worker process loads the reranker(s) for its queues once, at start (`worker_process_init`,
which warms each model up with one tiny scoring call), so the first job does not pay for it.
"""
from __future__ import annotations

import logging
import os

from celery import Celery, signals

from adapter.config import Settings, load_settings
from adapter.tasks import make_celery, models_for_queues, queue_for_tier

log = logging.getLogger(__name__)

#: Queues this worker consumes, set in the main process (`worker_init`) and inherited by the
#: prefork children, which load the matching models in `worker_process_init`.
_worker_queues: list[str] = []


def make_worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app a worker runs: the task registered, the start-up signals connected."""
    settings = settings or load_settings()
    app = make_celery(settings)
    import adapter.tasks  # noqa: F401 - registers the shared task on this app

    _quiet_task_results()
    signals.worker_init.connect(_remember_queues, weak=False, dispatch_uid="fhir-rerank-queues")
    signals.worker_process_init.connect(_load_models, weak=False,
                                        dispatch_uid="fhir-rerank-load-models")
    return app


def _quiet_task_results() -> None:
    """Celery logs every task's return value at INFO; ours is a Bundle of patient data."""
    from celery.app import trace

    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"


def _remember_queues(sender: object = None, **_: object) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        _worker_queues[:] = sorted(app.amqp.queues.consume_from or app.amqp.queues)


def _load_models(**_: object) -> None:
    """Load and warm the reranker(s) for this worker's queues, once per worker process."""
    from celery import current_app

    from adapter.rerank import get_reranker

    settings: Settings = getattr(current_app, "fhir_settings", None) or load_settings()
    models = models_for_queues(settings, _worker_queues)
    if not models:
        log.warning("worker queues %s match no allowed model (models_allowed, model_queues); "
                    "jobs will load their model on first use", ",".join(_worker_queues))
    for model in models:
        reranker = get_reranker(settings, model)
        log.info("worker process %s ready: %s", os.getpid(), reranker.describe())


def worker_queues(settings: Settings, tiers: list[str]) -> list[str]:
    """The queues for `--tiers` (tier aliases, "default", queue names or model values)."""
    return list(dict.fromkeys(queue_for_tier(settings, t) for t in tiers))


def run_worker(settings: Settings, tiers: list[str], concurrency: int = 1,
               pool: str = "prefork", loglevel: str = "INFO") -> None:
    """Run a Celery worker for `tiers` in this process until it is stopped (blocks)."""
    if not tiers:
        raise ValueError("no tiers given; e.g. --tiers 0.6B or --tiers 0.6B,4B")
    queues = worker_queues(settings, tiers)
    missing = [t for t, q in zip(tiers, queues) if not models_for_queues(settings, [q])]
    if missing:
        log.warning("tier(s) %s route no allowed model; check models_allowed / model_queues",
                    ",".join(missing))
    app = make_worker_app(settings)
    log.info("worker for queues %s (%s pool, concurrency %d)", ",".join(queues), pool,
             concurrency)
    app.worker_main(["worker", "-Q", ",".join(queues), "--concurrency", str(concurrency),
                     "--pool", pool, "--loglevel", loglevel, "--without-mingle",
                     "--without-gossip", "-n", f"rerank-{os.getpid()}@%h"])
