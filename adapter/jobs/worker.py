"""Celery workers for reranking: one worker serves the queues of the model tiers it is given.

Two ways to start one (same behaviour, same settings from config/ and FHIR_RERANK_*):

    fhir-rerank worker --tiers 0.6B,4B --concurrency 1
    celery -A celery_app worker -Q rerank.0.6B,rerank.4B --concurrency 1

Each worker process loads the reranker(s) for its queues once, at start (`worker_process_init`,
which warms each model up with one tiny scoring call), so the first job does not pay for it.
The main process keeps the worker's heartbeat per queue in Redis and hands jobs whose worker
died to their queue again (`worker_ready` → adapter.jobs.heartbeat.WorkerBeat).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from adapter.config import Settings, load_settings
from adapter.jobs.app import make_celery
from adapter.jobs.heartbeat import WorkerBeat, mark_degraded
from adapter.jobs.routing import TASK_NAME, models_for_queues, queue_for_model, worker_queues
from adapter.jobs.task import runtime_of  # importing it registers the shared task
from adapter.logs import install_redaction, use_format
from adapter.runtime import Runtime

log = logging.getLogger(__name__)

#: Queues this worker consumes, set in the main process (`worker_init`) and inherited by the
#: prefork children, which load the matching models in `worker_process_init`.
_worker_queues: list[str] = []
#: This worker's node name (`worker_init`), which its heartbeats and degraded marks use.
_worker_name: list[str] = []


def make_worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app a worker runs: the task registered, the start-up signals connected, and
    its runtime (`app.fhir_runtime`: caches and models; each prefork child loads its own)."""
    install_redaction()  # `celery -A celery_app worker` does not go through the CLI
    settings = settings or load_settings()
    app = make_celery(settings, announce_key=False)  # said once Celery's logging is up
    app.fhir_runtime = Runtime(settings)

    _quiet_task_results()
    signals.worker_init.connect(_remember_queues, weak=False, dispatch_uid="fhir-rerank-queues")
    signals.worker_init.connect(_start_beat_early, weak=False,
                                dispatch_uid="fhir-rerank-beat-early")
    signals.task_received.connect(_job_received, weak=False, dispatch_uid="fhir-rerank-received")
    signals.worker_ready.connect(_start_beat, weak=False, dispatch_uid="fhir-rerank-beat")
    signals.worker_ready.connect(_say_key, weak=False, dispatch_uid="fhir-rerank-key")
    signals.worker_shutdown.connect(_stop_beat, weak=False, dispatch_uid="fhir-rerank-unbeat")
    signals.worker_process_init.connect(_load_models, weak=False,
                                        dispatch_uid="fhir-rerank-load-models")
    if not settings.log_phi_at_debug:
        signals.after_setup_logger.connect(_no_debug, weak=False,
                                           dispatch_uid="fhir-rerank-no-debug")
    if settings.log_format == "json":
        for signal in (signals.after_setup_logger, signals.after_setup_task_logger):
            signal.connect(_json_lines, weak=False, dispatch_uid=f"fhir-rerank-json-{signal}")
    return app


def _say_key(sender: Any = None, **_: object) -> None:
    """The payload key's one line (made or kept, where; never the key) in the worker's log."""
    note = getattr(getattr(sender, "app", None), "fhir_key_note", None)
    if note:
        logging.getLogger("adapter.jobs.envelope").info("%s", note)


def _no_debug(logger: logging.Logger | None = None, **_: object) -> None:
    """`celery worker --loglevel DEBUG` without `log_phi_at_debug`: INFO, said in one line
    (`fhir-rerank worker` refuses DEBUG before it starts)."""
    if logger is not None and logger.level < logging.INFO:
        logger.setLevel(logging.INFO)
        logger.warning("log level DEBUG refused: its lines hold patient data; logging at INFO "
                       "(set log_phi_at_debug = true to allow DEBUG)")


def _json_lines(logger: logging.Logger | None = None, **_: object) -> None:
    """`log_format = json`: Celery's handlers (worker and task loggers) write JSON lines."""
    if logger is not None:
        use_format(logger, "json")


def _quiet_task_results() -> None:
    """Celery logs every task's return value at INFO; ours is a Bundle of patient data."""
    from celery.app import trace

    trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
    trace.LOG_IGNORED = "Task %(name)s[%(id)s] ended without a new result (%(description)s)"


_beat: list[WorkerBeat] = []


def _new_beat(sender: Any, consuming: bool) -> None:
    app = sender.app
    settings: Settings = getattr(app, "fhir_settings", None) or load_settings()
    queues = sorted(app.amqp.queues.consume_from or app.amqp.queues)
    _beat.append(WorkerBeat(app, settings, sender.hostname, queues).start(consuming))
    log.info("worker heartbeat every %g s for queues %s", settings.job_heartbeat_interval,
             ",".join(queues))


def _start_beat_early(sender: Any = None, **_: object) -> None:
    """In the main process as the worker starts, before its pool has loaded the models: the
    heartbeats of jobs it receives meanwhile, and the stale-job check."""
    try:
        _new_beat(sender, consuming=False)
    except Exception as exc:  # noqa: BLE001 - worker_ready tries again
        log.warning("could not start the worker heartbeat yet: %s", type(exc).__name__)


def _job_received(request: Any = None, **_: object) -> None:
    if _beat and request is not None and getattr(request, "name", None) == TASK_NAME:
        _beat[0].hold(request.id)


def _start_beat(sender: Any = None, **_: object) -> None:
    """In the main process once the worker consumes: the queue heartbeats begin."""
    if _beat:
        _beat[0].consuming()
    else:
        _new_beat(sender, consuming=True)


def _stop_beat(**_: object) -> None:
    while _beat:
        _beat.pop().stop()


def _remember_queues(sender: object = None, **_: object) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        _worker_queues[:] = sorted(app.amqp.queues.consume_from or app.amqp.queues)
        _worker_name[:] = [getattr(sender, "hostname", "")]


def _load_models(**_: object) -> None:
    """Load and warm the reranker(s) for this worker's queues, once per worker process."""
    from celery import current_app

    settings: Settings = getattr(current_app, "fhir_settings", None) or load_settings()
    runtime = runtime_of(current_app)
    models = models_for_queues(settings, _worker_queues)
    if not models:
        log.warning("worker queues %s match no allowed model (models_allowed, model_queues); "
                    "jobs will load their model on first use", ",".join(_worker_queues))
    for model in models:
        reranker = runtime.reranker(model)
        log.info("worker process %s ready: %s", os.getpid(), reranker.describe())
        reason = getattr(reranker, "fallback_reason", None)
        if reason and _worker_name and _worker_name[0]:  # /readyz: degraded, not ready
            queues = [q for q in _worker_queues if q == queue_for_model(settings, model)]
            try:
                mark_degraded(settings, _worker_name[0], queues, f"{model}: {reason}")
            except Exception as exc:  # noqa: BLE001 - Redis down: the heartbeat says so
                log.warning("could not record the keyword fallback: %s", type(exc).__name__)


def run_worker(settings: Settings, tiers: list[str], concurrency: int = 1,
               pool: str = "prefork", loglevel: str = "INFO", name: str | None = None) -> None:
    """Run a Celery worker for `tiers` in this process until it is stopped (blocks). `name`
    is its node name (default `rerank-<pid>@%h`; `--devices` names its children)."""
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
    quiet = ["--quiet"] if settings.log_format == "json" else []  # no text banner
    app.worker_main([*quiet, "worker", "-Q", ",".join(queues), "--concurrency", str(concurrency),
                     "--pool", pool, "--loglevel", loglevel, "--without-mingle",
                     "--without-gossip", "-n", name or f"rerank-{os.getpid()}@%h"])
