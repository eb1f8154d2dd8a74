"""Everything in adapter/jobs that knows Celery: the one module that imports celery and kombu.

The job logic underneath takes plain values and callables and imports no Celery: routing
(adapter.jobs.routing) names queues, the job body (adapter.jobs.work) ranks a payload, the
Redis bookkeeping (adapter.jobs.heartbeat) gets the request ids the worker holds and a
function that re-sends a job. This module turns those into Celery:

    the app        `make_celery`: broker and results on `redis_url`, fail-fast timeouts, one
                   kombu queue per model tier (`rerank_queue`); `send_job` publishes a job
    the task       `rerank` (name TASK_NAME, "adapter.jobs.rerank", which queued messages
                   name): opens the sealed payload, calls `rank_job` with the worker's
                   reranker, keeps a heartbeat and a lease in Redis (a job whose worker died
                   goes to another one; a duplicate delivery of a job a live worker runs is
                   dropped), stores a failure as the job's OperationOutcome (`job_error`)
    the worker     `make_worker_app` (`celery -A celery_app worker`) and `run_worker`
                   (`fhir-rerank worker`): the task registered, start-up signals connected;
                   each worker process loads and warms the reranker(s) for its queues at start
                   (`worker_process_init`); the main process runs adapter.jobs.heartbeat's
                   WorkerBeat with `held_job_refs` (celery.worker.state) and `send_job`
    the runner     `CeleryJobRunner`: a small record per job in Redis (`fhir-rerank:job:<ref>`:
                   owner identity, model, queue, stage, the sealed payload until answered) lets
                   only its creator read or cancel it and lets another worker take over a job
                   whose worker died; a down Redis, or a tier no live worker consumes (naming
                   the command that starts one), is `QueueUnavailable` (503), never a 500

Loaded only with `redis_url` (adapter.jobs.make_job_runner) or by a worker: an API without
Redis never imports Celery.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Any

from celery import Celery, shared_task, signals, states
from celery.exceptions import BackendError, Ignore, SoftTimeLimitExceeded
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from adapter.config import Settings, load_settings
from adapter.errors import JobTimeout, QueueUnavailable
from adapter.jobs.envelope import resolve_payload_key, seal, unseal
from adapter.jobs.heartbeat import (JOB_KEY_PREFIX, JobBeat, LiveWorkers, WorkerBeat,
                                    claim_lease, job_key, mark_degraded, redis_time, stamp_once)
from adapter.jobs.routing import (DEFAULT_QUEUE, TASK_NAME, all_queues, models_for_queues,
                                  queue_for_model, tier_of, worker_command, worker_queues)
from adapter.jobs.runners import JobCancelled, JobRunner, JobStatus, job_ref, not_found
from adapter.jobs.work import is_transient, job_error, rank_job, scoring_settings, \
    settings_differ
from adapter.logs import install_redaction, use_format
from adapter.runtime import Runtime

log = logging.getLogger(__name__)


# --- the app ------------------------------------------------------------------------------

def rerank_queue(name: str) -> Queue:
    """A queue bound to the default exchange: routing needs no binding key in Redis, so
    publishing still works right after Redis restarts empty."""
    return Queue(name, Exchange(""), routing_key=name)


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


def send_job(app: Celery, ref: str, envelope: dict[str, Any], model: str,
             needs: dict[str, Any] | None, queue: str, since: float | None = None) -> None:
    """Publish the rerank task for job `ref` on `queue` (its sealed payload shown as
    `<payload>` in Celery's own logs)."""
    kwargs: dict[str, Any] = {"needs": needs}
    if since is not None:
        kwargs["since"] = since
    app.send_task(TASK_NAME, args=[envelope, model], kwargs=kwargs, task_id=ref,
                  queue=rerank_queue(queue), argsrepr="(<payload>, model)", kwargsrepr="{}")


# --- the task -----------------------------------------------------------------------------

def _timed_out(exc: BaseException, settings: Settings) -> BaseException:
    """Celery's soft time limit as the JobTimeout a caller reads; other errors as they are."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobTimeout(f"reranking took longer than task_soft_time_limit "
                          f"({settings.task_soft_time_limit} s); lower `recall` or use a "
                          "faster model tier")
    return exc


class _TaskProgress:
    """on_progress for a Celery task: PROGRESS state (throttled), and the cancel check."""

    def __init__(self, task: Any, client: Any, ref: str, interval: float = 0.2) -> None:
        self.task, self.client, self.ref, self.interval = task, client, ref, interval
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        if not self.client.exists(job_key(self.ref)):
            raise JobCancelled()
        self.task.update_state(state="PROGRESS", meta={"done": done, "total": total})


def _settings_of(app: Celery) -> Settings:
    settings = getattr(app, "fhir_settings", None)
    return settings if settings is not None else load_settings()


def runtime_of(app: Celery) -> Runtime:
    """The worker app's runtime (its caches and models), made on first use when the app was
    built without one."""
    runtime = getattr(app, "fhir_runtime", None)
    if runtime is None:
        runtime = app.fhir_runtime = Runtime(_settings_of(app))
    return runtime


#: seconds a worker whose scoring settings differ waits before it hands a job back
BOUNCE_PAUSE_S = 0.2


def _other_settings(task: Any, client: Any, ref: str, envelope: dict[str, Any], model: str,
                    needs: dict[str, Any], since: float | None, differ: list[str],
                    settings: Settings) -> dict[str, Any] | None:
    """This worker's scoring settings differ from the job's: hand the job back to its queue
    for another worker (None), for up to `job_stale_after` seconds from the first hand-back;
    then the job's answer is a 503 naming the settings."""
    now = redis_time(client)
    if since is None:
        log.warning("job %s: this worker's scoring settings differ from the API's: %s; "
                    "handed back to its queue for a worker with the API's settings",
                    ref[:12], "; ".join(differ))
        since = now
    if now - since < settings.job_stale_after:
        time.sleep(BOUNCE_PAUSE_S)  # another worker waiting on the queue takes it first
        queue = client.hget(job_key(ref), "queue") or \
            (task.request.delivery_info or {}).get("routing_key")
        send_job(task.app, ref, envelope, model, needs, queue, since=since)
        return None
    return {"error": {"status": 503, "code": "transient", "expression": "model",
                      "message": "no worker with the API's scoring settings took this job "
                                 f"within job_stale_after = {settings.job_stale_after:g} s; "
                                 f"the worker's differ: {'; '.join(differ)}. Give the API and "
                                 "the workers the same settings (FHIR_RERANK_* or "
                                 "FHIR_RERANK_CONFIG)"}}


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def rerank(self: Any, envelope: dict[str, Any], model: str, needs: dict[str, Any] | None = None,
           since: float | None = None) -> dict[str, Any]:
    """Rerank one prepared search. Returns {"result": sealed Bundle, "worker": hostname}.

    `needs`: the API's scoring settings (SCORING_SETTINGS); a worker whose own differ hands
    the job back instead (`since`: when the first worker did)."""
    settings = _settings_of(self.app)
    ref = self.request.id  # the job's ref (a digest of its id), never the id itself
    client = self.app.backend.client
    key = job_key(ref)
    # Cancelled/expired before it ran, or already answered (a copy redelivered after its worker
    # died between storing the result and acking): nothing to do, and no state write, so an
    # answered job's result is never overwritten.
    if not client.expire(key, settings.result_expires + settings.task_time_limit) or \
            self.backend.get_task_meta(ref, cache=False).get("status") == states.SUCCESS:
        raise Ignore()
    differ = settings_differ(needs, settings) if needs else []
    if differ:
        refused = _other_settings(self, client, ref, envelope, model, needs or {}, since,
                                  differ, settings)
        if refused is None:
            raise Ignore()
        refused["worker"] = self.request.hostname
        with client.pipeline() as pipe:
            pipe.hset(key, "finished", "1").hdel(key, "envelope")
            pipe.expire(key, settings.result_expires)
            pipe.execute()
        self.backend.store_result(ref, refused, states.SUCCESS, request=self.request)
        log.error("job %s failed: 503 transient (scoring settings differ)", ref[:12])
        raise Ignore()
    holder = f"{self.request.hostname}/{os.getpid()}"
    if not claim_lease(client, ref, holder, settings):
        log.info("dropped a duplicate delivery of a job a live worker is running")
        raise Ignore()
    stamp_once(client, key, "started", f"{redis_time(client):.6f}")  # queue wait: first start
    failure: BaseException | None = None
    with JobBeat(client, ref, holder, settings):
        log.info("job %s: reranking with %s", ref[:12], model if "/" not in model else "a model")
        self.update_state(state="PROGRESS", meta={"done": 0, "total": None})
        try:
            bundle = rank_job(unseal(envelope, settings.payload_key), model,
                              runtime_of(self.app), _TaskProgress(self, client, ref))
            answer: dict[str, Any] = {"result": seal(bundle, settings.payload_key)}
        except JobCancelled:
            log.info("job %s cancelled while running", ref[:12])
            self.backend.forget(ref)  # a PROGRESS write may have raced the DELETE
            raise Ignore() from None
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OperationOutcome
            if is_transient(exc) and self.request.retries < settings.task_max_retries:
                countdown = 2 ** self.request.retries
                log.warning("job %s: transient %s, retry in %s s", ref[:12],
                            type(exc).__name__, countdown)
                raise self.retry(countdown=countdown,
                                 max_retries=settings.task_max_retries) from None
            failure, answer = exc, {"error": job_error(_timed_out(exc, settings))}
    answer["worker"] = self.request.hostname
    if not client.exists(key):  # cancelled during the last batch: store nothing
        self.backend.forget(ref)
        raise Ignore()
    with client.pipeline() as pipe:  # readable for result_expires from now, like the result
        pipe.hset(key, "finished", "1").hdel(key, "envelope").expire(key, settings.result_expires)
        pipe.execute()
    if failure is not None:
        # Stored as the job's answer, and logged as what it is: a failure, not "succeeded".
        self.backend.store_result(ref, answer, states.SUCCESS, request=self.request)
        log.error("job %s failed: %s %s (%s)", ref[:12], answer["error"]["status"],
                  answer["error"]["code"], type(failure).__name__)
        raise Ignore()
    return answer


# --- the worker -------------------------------------------------------------------------

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
    beat = WorkerBeat(functools.partial(send_job, app), held_job_refs, settings,
                      sender.hostname, queues)
    _beat.append(beat.start(consuming))
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


def held_job_refs() -> list[str]:
    """Refs of the rerank jobs this worker (main process) holds: received and waiting for a
    pool process (the pool may still be loading its model), waiting for a retry, or running.
    Celery drops a request from `state.requests` once it is done, whatever the outcome."""
    from celery.worker import state

    for _ in range(3):
        try:
            return [req.id for req in list(state.requests.values())
                    if getattr(req, "name", None) == TASK_NAME and req.id]
        except RuntimeError:  # changed size while copied (the consumer thread): again
            continue
    return []


# --- the runner -------------------------------------------------------------------------

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{32}")
#: KEYS[1] the caller's set of job refs. Drops refs whose record is gone or finished (and
#: any older than a job can live), then adds ARGV[4] unless ARGV[3] (> 0) are left: -1.
_COUNT_CALLER_JOB = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[2])
local live = 0
for _, ref in ipairs(redis.call('zrange', KEYS[1], 0, -1)) do
  local key = ARGV[5] .. ref
  if redis.call('exists', key) == 0 or redis.call('hget', key, 'finished') then
    redis.call('zrem', KEYS[1], ref)
  else
    live = live + 1
  end
end
if tonumber(ARGV[3]) > 0 and live >= tonumber(ARGV[3]) then return -1 end
redis.call('zadd', KEYS[1], ARGV[1], ARGV[4])
redis.call('expire', KEYS[1], ARGV[6])
return live + 1
"""


def caller_jobs_key(owner: str) -> str:
    """The Redis set of a caller's job refs (the owner is already a digest or "anonymous")."""
    return "fhir-rerank:caller:" + hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]


PREPARE_TTL_S = 600  # a record whose API process died while preparing it goes away


def _queue_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, BackendError, ConnectionError, TimeoutError)


class CeleryJobRunner(JobRunner):
    """Jobs as Celery tasks on Redis, routed by model tier."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        super().__init__(settings, runtime)
        import redis

        self.app = make_celery(settings, set_as_current=False)
        self.records = redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout, retry_on_timeout=False,
            decode_responses=True)
        self._errors = _queue_errors()
        self.live_workers = LiveWorkers(settings, self.records)

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        log.warning("job queue unreachable: %s", type(exc).__name__)
        return QueueUnavailable("the job queue (Redis) is unreachable; retry in a few seconds",
                                headers={"Retry-After": "5"})

    def check_worker(self, queue: str) -> None:
        """503 naming the tier and the command that starts a worker when none consumes it."""
        try:
            live = self.live_workers()
        except self._errors as exc:
            raise self._unavailable(exc) from None
        if not live.get(queue):
            tier = tier_of(queue)
            raise QueueUnavailable(
                f"no worker consumes the {tier} tier (queue {queue}); start one with "
                f"`{worker_command(queue)}`", expression="model", headers={"Retry-After": "5"})

    def _create(self, job_id: str, model: str, owner: str) -> None:
        queue = queue_for_model(self.settings, model)
        self.check_worker(queue)
        record = {"owner": owner, "model": model, "queue": queue, "stage": "fetching",
                  "submitted": f"{time.time():.3f}"}
        key = job_key(job_ref(job_id))
        try:
            self._count_caller_job(owner, job_ref(job_id))
            with self.records.pipeline() as pipe:
                pipe.hset(key, mapping=record).expire(key, PREPARE_TTL_S)
                pipe.execute()
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def _count_caller_job(self, owner: str, ref: str) -> None:
        """Count the job against its caller's `max_jobs_per_caller` (across API processes:
        one set per caller in Redis, checked and added atomically); 429 when at the cap."""
        cap = self.settings.max_jobs_per_caller
        life = PREPARE_TTL_S + self.settings.result_expires + self.settings.task_time_limit
        now = time.time()
        held = self.records.eval(_COUNT_CALLER_JOB, 1, caller_jobs_key(owner), f"{now:.3f}",
                                 f"{now - life:.3f}", str(cap), ref, JOB_KEY_PREFIX, str(life))
        if int(held) < 0:
            raise self._jobs_cap_error()

    def _set_stage(self, job_id: str, stage: str) -> None:
        key = job_key(job_ref(job_id))
        if not self.records.exists(key):
            raise JobCancelled()
        self.records.hset(key, "stage", stage)

    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        key = job_key(job_ref(job_id))
        if not self.records.exists(key):
            return  # cancelled while it was being prepared
        with self.records.pipeline() as pipe:
            pipe.hset(key, mapping={"error": json.dumps(error), "finished": "1", "stage": ""})
            pipe.expire(key, self.settings.result_expires)
            pipe.execute()

    def submit(self, payload: dict[str, Any], model: str, owner: str,
               job_id: str | None = None) -> str:
        if job_id is None:
            job_id = self._create_sync(model, owner)
        ref = job_ref(job_id)
        queue = queue_for_model(self.settings, model)
        envelope = seal(payload, self.settings.payload_key)
        ttl = self.settings.result_expires + self.settings.task_time_limit
        key = job_key(ref)
        try:
            if not self.records.exists(key):
                return job_id  # cancelled while it was being prepared
            queued = redis_time(self.records)  # the worker stamps "started" on Redis' clock too
            needs = scoring_settings(self.settings)  # a worker scores it only with these
            with self.records.pipeline() as pipe:
                pipe.hset(key, mapping={"stage": "", "envelope": json.dumps(envelope),
                                        "queued": f"{queued:.6f}", "needs": json.dumps(needs)})
                pipe.expire(key, ttl)
                pipe.execute()
            send_job(self.app, ref, envelope, model, needs, queue)
        except self._errors as exc:
            raise self._unavailable(exc) from None
        log.info("job %s queued on %s", ref[:12], queue)
        return job_id

    def _record(self, job_id: str, owner: str) -> dict[str, str]:
        if not _JOB_ID.fullmatch(job_id):
            raise not_found(job_id)
        try:
            record = self.records.hgetall(job_key(job_ref(job_id)))
        except self._errors as exc:
            raise self._unavailable(exc) from None
        if not record or record.get("owner") != owner:
            raise not_found(job_id)
        return record

    def _first_read(self, job_id: str) -> bool:
        """True for exactly one read of a finished job, across every API process (a record
        deleted meanwhile, by a cancel, is not brought back without its expiry)."""
        try:
            return stamp_once(self.records, job_key(job_ref(job_id)), "delivered", "1")
        except self._errors:
            return False

    @staticmethod
    def _queue_wait(record: dict[str, str]) -> float | None:
        try:
            return max(0.0, float(record["started"]) - float(record["queued"]))
        except (KeyError, ValueError):
            return None

    def status(self, job_id: str, owner: str) -> JobStatus:
        record = self._record(job_id, owner)
        if record.get("error"):
            return JobStatus("failed", error=json.loads(record["error"]),
                             first_read=self._first_read(job_id))
        if record.get("stage"):
            return JobStatus("preparing", stage=record["stage"])
        ref = job_ref(job_id)
        try:
            meta = self.app.backend.get_task_meta(ref, cache=False)
        except self._errors as exc:
            raise self._unavailable(exc) from None
        state, info = meta.get("status"), meta.get("result")
        if state == "SUCCESS" and isinstance(info, dict):
            once = {"first_read": self._first_read(job_id),
                    "queue_wait_s": self._queue_wait(record)}
            if "error" in info:
                return JobStatus("failed", error=info["error"], worker=info.get("worker"),
                                 **once)
            bundle = unseal(info["result"], self.settings.payload_key)
            return JobStatus("done", bundle=bundle, worker=info.get("worker"), **once)
        if state == "PROGRESS" and isinstance(info, dict):
            return JobStatus("running", int(info.get("done", 0)), info.get("total"))
        if state in ("STARTED", "RETRY"):
            return JobStatus("running")
        if state == "FAILURE":
            return JobStatus("failed", error=self._failure(ref, info),
                             first_read=self._first_read(job_id),
                             queue_wait_s=self._queue_wait(record))
        if state == "REVOKED" or record.get("finished"):
            raise not_found(job_id)  # result gone (expired) or never to come
        return JobStatus("queued")

    @staticmethod
    def _failure(ref: str, exc: Any) -> dict[str, Any]:
        name = type(exc).__name__
        log.error("job %s failed on the worker: %s", ref[:12], name)
        if name == "TimeLimitExceeded":
            return {"status": 504, "code": "timeout",
                    "message": "reranking passed task_time_limit and was stopped; lower "
                               "`recall` or use a faster model tier"}
        return {"status": 500, "code": "exception",
                "message": f"reranking failed on the worker ({name}); the worker log has details"}

    def cancel(self, job_id: str, owner: str) -> None:
        self._record(job_id, owner)
        self.forget(job_id)
        try:
            self.app.control.revoke(job_ref(job_id))  # a queued copy is dropped; a running
        except self._errors as exc:  # one sees its record gone at the next batch and stops
            raise self._unavailable(exc) from None

    def forget(self, job_id: str) -> None:
        self._sync_leave(job_id)
        ref = job_ref(job_id)
        try:
            self.records.delete(job_key(ref))
            self.app.backend.forget(ref)
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def close(self) -> None:
        super().close()
        self.records.close()
        self.app.close()
