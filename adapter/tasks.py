"""Reranking as a Celery task: queue routing, the Celery app factory, the task and its envelope.

The task holds no logic: it opens the payload that `adapter.pipeline.prepare_search` built in
the API process, calls `rank_prepared` with the worker's reranker and returns the Bundle.
`rank_job` / `job_error` are the same body without Celery; the in-process job runner calls them.

Routing rule (documented in docs/JOBS.md): a request's `model` goes to
  1. `rerank.<tier>` when `model_queues` holds "model=tier" for it (local dirs, custom ids);
  2. `rerank.<alias>` for a tier alias 0.6B / 4B / 8B or `Qwen/Qwen3-Reranker-<alias>`;
  3. `rerank.default` for anything else.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import time
import traceback
import uuid
import zlib
from typing import Any, Callable

from celery import Celery, shared_task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from kombu import Exchange, Queue

from adapter.config import Settings, load_settings
from adapter.errors import AdapterError, ModelLoadError, RerankerUnavailable

log = logging.getLogger(__name__)

TASK_NAME = "adapter.tasks.rerank"
TIER_ALIASES = ("0.6B", "4B", "8B")
QUEUE_PREFIX = "rerank."
DEFAULT_QUEUE = "rerank.default"
JOB_KEY_PREFIX = "fhir-rerank:job:"
_HF_TIER = re.compile(r"Qwen/Qwen3-Reranker-(0\.6B|4B|8B)")


class PayloadKeyError(RerankerUnavailable):
    """API and worker disagree on `payload_key`: a configuration fault, not worth a retry."""


class JobCancelled(Exception):
    """The job's record disappeared (DELETE or expiry) while it ran; stop scoring."""


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


# --- routing -----------------------------------------------------------------------------

def _tier_queue(tier: str) -> str:
    return tier if tier.startswith(QUEUE_PREFIX) else QUEUE_PREFIX + tier


def queue_for_model(settings: Settings, model: str) -> str:
    """The queue a job for `model` is sent to (see the module docstring for the rule)."""
    for entry in settings.model_queues:
        name, sep, tier = entry.rpartition("=")
        if sep and name.strip() == model:
            return _tier_queue(tier.strip())
    if model in TIER_ALIASES:
        return QUEUE_PREFIX + model
    match = _HF_TIER.fullmatch(model)
    return QUEUE_PREFIX + match.group(1) if match else DEFAULT_QUEUE


def queue_for_tier(settings: Settings, tier: str) -> str:
    """A worker's `--tiers` entry → its queue: a tier alias, "default", a queue name, or a model."""
    if tier in TIER_ALIASES or tier == "default" or tier.startswith(QUEUE_PREFIX):
        return _tier_queue(tier)
    return queue_for_model(settings, tier)


def known_models(settings: Settings) -> list[str]:
    """Every model a request may name: the default model and the allowlist."""
    return list(dict.fromkeys([settings.model, *settings.models_allowed]))


def models_for_queues(settings: Settings, queues: list[str]) -> list[str]:
    """The models a worker consuming `queues` must hold (loaded once per worker process)."""
    return [m for m in known_models(settings) if queue_for_model(settings, m) in queues]


def all_queues(settings: Settings) -> list[str]:
    names = [QUEUE_PREFIX + t for t in TIER_ALIASES] + [DEFAULT_QUEUE]
    names += [queue_for_model(settings, m) for m in known_models(settings)]
    names += [_tier_queue(e.rpartition("=")[2].strip()) for e in settings.model_queues if "=" in e]
    return list(dict.fromkeys(names))


def rerank_queue(name: str) -> Queue:
    """A queue bound to the default exchange: routing needs no binding key in Redis, so
    publishing still works right after Redis restarts empty."""
    return Queue(name, Exchange(""), routing_key=name)


# --- payload / result envelope -----------------------------------------------------------

def seal(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON that crosses Redis, zlib-compressed (flattened text and resources shrink
    10-17x) and Fernet-encrypted when a key is set."""
    raw = zlib.compress(json.dumps(data, separators=(",", ":")).encode("utf-8"))
    if not key:
        return {"zlib": base64.b64encode(raw).decode("ascii")}
    from cryptography.fernet import Fernet

    return {"fernet": Fernet(key.encode()).encrypt(raw).decode("ascii")}


def unseal(envelope: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON inside an envelope made by `seal`."""
    if "zlib" in envelope:
        return json.loads(zlib.decompress(base64.b64decode(envelope["zlib"])))
    if not key:
        raise PayloadKeyError("this process has no payload_key but the job is encrypted; "
                                  "give API and workers the same FHIR_RERANK_PAYLOAD_KEY")
    from cryptography.fernet import Fernet, InvalidToken

    try:
        raw = Fernet(key.encode()).decrypt(envelope["fernet"].encode("ascii"))
    except InvalidToken:
        raise PayloadKeyError("the job was encrypted with another payload_key; give API "
                                  "and workers the same FHIR_RERANK_PAYLOAD_KEY") from None
    return json.loads(zlib.decompress(raw))


def check_payload_key(key: str) -> None:
    """Fail at start-up, with the fix, when the configured key is not a Fernet key."""
    if not key:
        return
    from cryptography.fernet import Fernet

    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        raise ValueError("payload_key is not a Fernet key (32 url-safe base64 bytes); make one "
                         "with: python -c 'from cryptography.fernet import Fernet; "
                         "print(Fernet.generate_key().decode())'") from None


# --- the work, with and without Celery ---------------------------------------------------

def rank_job(payload: dict[str, Any], model: str, settings: Settings,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score the prepared candidates with the process-wide reranker for `model`; the Bundle."""
    from adapter.pipeline import rank_prepared
    from adapter.rerank import get_reranker

    # Concurrent jobs may share the reranker: the Qwen3 engine runs one forward at a time per
    # model, and `last_report` is per thread, so each job reads its own call's report.
    return rank_prepared(payload, get_reranker(settings, model), on_progress=on_progress)


def job_error(exc: BaseException, settings: Settings | None = None) -> dict[str, Any]:
    """What a failed job answers: status, FHIR issue code and a message free of patient data."""
    if isinstance(exc, AdapterError):
        return {"status": exc.status, "code": exc.code, "message": exc.message}
    if isinstance(exc, SoftTimeLimitExceeded):
        limit = settings.task_soft_time_limit if settings else "?"
        return {"status": 504, "code": "timeout",
                "message": f"reranking took longer than task_soft_time_limit ({limit} s); lower "
                           "`recall` or use a faster model tier"}
    incident = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("job failed, incident %s: %s\n%s", incident, type(exc).__name__, frames)
    return {"status": 500, "code": "exception",
            "message": f"reranking failed (incident {incident}); the worker log has the details"}


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: a model that could not load, a GPU out of memory."""
    if isinstance(exc, PayloadKeyError):
        return False
    return isinstance(exc, (RerankerUnavailable, ModelLoadError)) or \
        type(exc).__name__ == "OutOfMemoryError"


class _TaskProgress:
    """on_progress for a Celery task: PROGRESS state (throttled), and the cancel check."""

    def __init__(self, task: Any, client: Any, job_id: str, interval: float = 0.2) -> None:
        self.task, self.client, self.job_id, self.interval = task, client, job_id, interval
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        if not self.client.exists(job_key(self.job_id)):
            raise JobCancelled(self.job_id)
        self.task.update_state(state="PROGRESS", meta={"done": done, "total": total})


def _settings_of(app: Celery) -> Settings:
    settings = getattr(app, "fhir_settings", None)
    return settings if settings is not None else load_settings()


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def rerank(self: Any, envelope: dict[str, Any], model: str) -> dict[str, Any]:
    """Rerank one prepared search. Returns {"result": sealed Bundle} or {"error": {...}}."""
    settings = _settings_of(self.app)
    job_id = self.request.id
    client = self.app.backend.client
    key = job_key(job_id)
    # Cancelled/expired before it ran, or already answered (a copy redelivered after its worker
    # died between storing the result and acking): nothing to do, and no state write, so an
    # answered job's result is never overwritten.
    if not client.expire(key, settings.result_expires + settings.task_time_limit) or \
            self.backend.get_task_meta(job_id, cache=False).get("status") == "SUCCESS":
        raise Ignore()
    log.info("job %s: reranking with %s", job_id, model)
    self.update_state(state="PROGRESS", meta={"done": 0, "total": None})
    try:
        bundle = rank_job(unseal(envelope, settings.payload_key), model, settings,
                          _TaskProgress(self, client, job_id))
        answer: dict[str, Any] = {"result": seal(bundle, settings.payload_key)}
    except JobCancelled:
        log.info("job %s cancelled while running", job_id)
        self.backend.forget(job_id)  # a PROGRESS write may have raced the DELETE
        raise Ignore() from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OperationOutcome
        if is_transient(exc) and self.request.retries < settings.task_max_retries:
            countdown = 2 ** self.request.retries
            log.warning("job %s: transient %s, retry in %s s", job_id, type(exc).__name__,
                        countdown)
            raise self.retry(countdown=countdown, max_retries=settings.task_max_retries) from None
        answer = {"error": job_error(exc, settings)}
    answer["worker"] = self.request.hostname
    if not client.exists(key):  # cancelled during the last batch: store nothing
        self.backend.forget(job_id)
        raise Ignore()
    with client.pipeline() as pipe:  # readable for result_expires from now, like the result
        pipe.hset(key, "finished", "1").expire(key, settings.result_expires)
        pipe.execute()
    return answer


# --- the Celery app ----------------------------------------------------------------------

def make_celery(settings: Settings, *, set_as_current: bool = True) -> Celery:
    """A Celery app for `settings` (broker and results on `redis_url`), fail-fast timeouts."""
    if not settings.redis_url:
        raise ValueError("redis_url is empty; set FHIR_RERANK_REDIS_URL (e.g. "
                         "redis://127.0.0.1:6379/0) to run reranking on Celery workers")
    check_payload_key(settings.payload_key)
    from adapter.pipeline import apply_cache_size

    apply_cache_size(settings.doc_cache_size)
    timeout = settings.redis_timeout
    visibility = settings.broker_visibility_timeout
    if visibility <= settings.task_time_limit:
        log.warning("broker_visibility_timeout (%s s) is not above task_time_limit (%s s): a "
                    "long job may be delivered twice", visibility, settings.task_time_limit)
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
    return app
