"""The Celery app factory: broker and results on `redis_url`, fail-fast timeouts, one queue
per model tier (adapter.jobs.routing)."""
from __future__ import annotations

import logging

from celery import Celery

from adapter.config import Settings
from adapter.jobs.envelope import resolve_payload_key
from adapter.jobs.routing import DEFAULT_QUEUE, all_queues, rerank_queue

log = logging.getLogger(__name__)


def make_celery(settings: Settings, *, set_as_current: bool = True,
                announce_key: bool = True) -> Celery:
    """A Celery app for `settings` (broker and results on `redis_url`), fail-fast timeouts.

    A job held by a dead worker is handed over by the heartbeat check (job_stale_after), not
    by the broker's visibility timeout, which only bounds a forgotten message's life.
    Jobs are always encrypted: an empty `payload_key` is filled in here with the key this
    machine keeps (adapter.jobs.envelope.resolve_payload_key), said in one log line now, or,
    without `announce_key`, left in `app.fhir_key_note` for a worker to say once it logs."""
    if not settings.redis_url:
        raise ValueError("redis_url is empty; set FHIR_RERANK_REDIS_URL (e.g. "
                         "redis://127.0.0.1:6379/0) to run reranking on Celery workers")
    settings.payload_key, key_note = resolve_payload_key(settings)
    if announce_key:
        log.info("%s", key_note)
    timeout = settings.redis_timeout
    visibility = settings.broker_visibility_timeout
    fast_retry = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                  "interval_max": 0.2}
    app = Celery("fhir_rerank", broker=settings.redis_url, backend=settings.redis_url,
                 set_as_current=set_as_current)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=False,  # the task writes PROGRESS itself, after its checks
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit, result_expires=settings.result_expires,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[rerank_queue(q) for q in all_queues(settings)],
        task_publish_retry=True, task_publish_retry_policy=fast_retry,
        broker_connection_timeout=timeout, broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, min(10, visibility // 5)),
            "unacked_restore_throttle": 1,
            "socket_timeout": max(5.0, timeout), "socket_connect_timeout": timeout,
        },
        redis_socket_timeout=max(5.0, timeout), redis_socket_connect_timeout=timeout,
        redis_retry_on_timeout=False,
        result_backend_transport_options={"retry_policy": fast_retry},
        worker_send_task_events=False, task_send_sent_event=False,
    )
    app.fhir_settings = settings  # type: ignore[attr-defined]
    app.fhir_key_note = key_note  # type: ignore[attr-defined]
    return app
