"""Liveness in Redis: which workers consume which queue, and which jobs are still making
progress. Both survive nothing but the processes that write them, so a SIGKILLed worker
(main process and children, as when its machine dies) is noticed within `job_stale_after`
seconds whatever the broker's visibility timeout.

Keys (all small; no patient data, no job ids — a job is named by its `ref`, a digest of
its id, see adapter.jobs.runners.job_ref):
- `fhir-rerank:workers:<queue>`  sorted set: worker hostname → last heartbeat (unix time)
- `fhir-rerank:running`          sorted set: job ref → last heartbeat of the running task
- `fhir-rerank:lease:<ref>`      the hostname running the job; expires after job_stale_after
- `fhir-rerank:degraded:<queue>` hash: worker hostname → why it serves BM25 keyword order (its
                                 model could not load); read only for live hostnames

Every worker's main process runs one `WorkerBeat` thread: it refreshes its queues'
heartbeats and hands each job whose heartbeat went stale back to its queue (the job record
keeps the sealed payload), claimed with an atomic ZREM so exactly one worker re-sends it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from adapter.config import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "fhir-rerank:"
RUNNING_KEY = KEY_PREFIX + "running"
JOB_KEY_PREFIX = KEY_PREFIX + "job:"

#: Sends a job to a queue again: resend(ref, sealed envelope, model, needs, queue). The
#: Celery module (adapter.jobs.celery_backend) gives one; nothing here knows Celery.
Resend = Callable[[str, dict[str, Any], str, "dict[str, Any] | None", str], None]


def job_key(ref: str) -> str:
    return JOB_KEY_PREFIX + ref


def workers_key(queue: str) -> str:
    return f"{KEY_PREFIX}workers:{queue}"


def degraded_key(queue: str) -> str:
    return f"{KEY_PREFIX}degraded:{queue}"


def mark_degraded(settings: Settings, hostname: str, queues: list[str], reason: str) -> None:
    """Say (for /readyz) that the worker `hostname` serves keyword order on `queues`."""
    client = _redis(settings)
    try:
        with client.pipeline() as pipe:
            for queue in queues:
                pipe.hset(degraded_key(queue), hostname, reason[:500])
            pipe.execute()
    finally:
        client.close()


def degraded_workers(settings: Settings, client: Any = None) -> dict[str, str]:
    """{queue: reason} for each queue one of whose live workers serves keyword order."""
    now = time.time()
    own = client is None
    client = client or _redis(settings)
    try:
        out: dict[str, str] = {}
        for key in client.scan_iter(match=degraded_key("*"), count=100):
            queue = key.removeprefix(KEY_PREFIX + "degraded:")
            live = set(client.zrangebyscore(workers_key(queue), now - settings.job_stale_after,
                                            "+inf"))
            reasons = {h: r for h, r in client.hgetall(key).items() if h in live}
            if reasons:
                out[queue] = next(iter(reasons.values()))
    finally:
        if own:
            client.close()
    return out


def lease_key(ref: str) -> str:
    return f"{KEY_PREFIX}lease:{ref}"


def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                                socket_connect_timeout=settings.redis_timeout,
                                decode_responses=True)


#: HSETNX on a job record only while it exists (a cancel deletes it: never bring it back
#: without its expiry); 1 when this call set the field
_STAMP_IF_PRESENT = ("if redis.call('exists', KEYS[1]) == 1 then "
                     "return redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) end return 0")


def stamp_once(client: Any, key: str, field: str, value: str) -> bool:
    """Set `field` of the job record `key` unless it is set already or the record is gone;
    True for the one call that set it (the first reader, the first start)."""
    return bool(client.eval(_STAMP_IF_PRESENT, 1, key, field, value))


def redis_time(client: Any) -> float:
    """Redis' clock (seconds): job stamps written by the API and by workers on other machines
    compare without clock skew."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def live_workers(settings: Settings, client: Any = None) -> dict[str, int]:
    """{queue: number of workers whose heartbeat is younger than job_stale_after}, for every
    queue some worker announced (read now; `LiveWorkers` keeps a short-lived copy). Raises
    Redis errors to the caller."""
    now = time.time()
    own = client is None
    client = client or _redis(settings)
    try:
        counts: dict[str, int] = {}
        for key in client.scan_iter(match=workers_key("*"), count=100):
            queue = key.removeprefix(KEY_PREFIX + "workers:")
            live = client.zcount(key, now - settings.job_stale_after, "+inf")
            if live:
                counts[queue] = int(live)
    finally:
        if own:
            client.close()
    return counts


class LiveWorkers:
    """`live_workers` as the API asks it on each job submit: read at most every `ttl` seconds
    (one per job runner, so each app keeps its own view)."""

    def __init__(self, settings: Settings, client: Any, ttl: float = 2.0) -> None:
        self.settings, self.client, self.ttl = settings, client, ttl
        self._seen: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, int]:
        with self._lock:
            seen = self._seen
        if seen and time.monotonic() - seen[0] < self.ttl:
            return dict(seen[1])
        counts = live_workers(self.settings, self.client)
        with self._lock:
            self._seen = (time.monotonic(), counts)
        return dict(counts)

    def forget(self) -> None:
        with self._lock:
            self._seen = None


# --- a running job's heartbeat (in the process that runs it) -----------------------------

def claim_lease(client: Any, ref: str, holder: str, settings: Settings) -> bool:
    """Take the job's lease; False while another live worker holds it (a duplicate delivery)."""
    ttl = max(1, int(settings.job_stale_after))
    if client.set(lease_key(ref), holder, nx=True, ex=ttl):
        return True
    return client.get(lease_key(ref)) == holder


class JobBeat:
    """While a job runs: its heartbeat in `fhir-rerank:running` and its lease, renewed every
    `job_heartbeat_interval` seconds from a thread. `with JobBeat(...):` around the work."""

    def __init__(self, client: Any, ref: str, holder: str, settings: Settings) -> None:
        self.client, self.ref, self.holder, self.settings = client, ref, holder, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)

    def beat(self) -> None:
        ttl = max(1, int(self.settings.job_stale_after))
        with self.client.pipeline() as pipe:
            pipe.zadd(RUNNING_KEY, {self.ref: time.time()}).set(lease_key(self.ref), self.holder,
                                                               ex=ttl)
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.job_heartbeat_interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: the next beat may succeed
                log.warning("job heartbeat failed: %s", type(exc).__name__)

    def __enter__(self) -> "JobBeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.client.pipeline() as pipe:
                pipe.zrem(RUNNING_KEY, self.ref).delete(lease_key(self.ref))
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the entry goes stale and is checked later
            log.warning("could not clear a job heartbeat: %s", type(exc).__name__)


# --- the worker's own heartbeat and the hand-over of stale jobs --------------------------

def hand_over_stale_jobs(client: Any, resend: Resend, settings: Settings) -> int:
    """Re-send each job whose heartbeat is older than job_stale_after to its queue; returns
    how many (`resend` sends one). The ZREM is the claim: of several workers checking, one
    re-sends a job."""
    ceiling = time.time() - settings.job_stale_after
    handed = 0
    for ref in client.zrangebyscore(RUNNING_KEY, "-inf", ceiling, start=0, num=50):
        if not client.zrem(RUNNING_KEY, ref):
            continue  # another worker claimed it
        record = client.hgetall(job_key(ref))
        if not record or record.get("finished") or not record.get("envelope"):
            continue  # cancelled, expired or answered meanwhile
        needs = json.loads(record["needs"]) if record.get("needs") else None
        resend(ref, json.loads(record["envelope"]), record["model"], needs, record["queue"])
        handed += 1
    if handed:
        log.warning("%d job(s) stopped making progress (no heartbeat for %.0f s; their worker "
                    "is gone); handed to another worker", handed, settings.job_stale_after)
    return handed


class WorkerBeat:
    """The worker's main-process thread: queue heartbeats, the heartbeat of every job this
    worker holds, and the stale-job check.

    It starts when the worker starts (`worker_init`), before the pool has loaded its models:
    a job received meanwhile is in `fhir-rerank:running` at once (`hold`) and beaten each
    round, so when the whole worker is killed before the job starts it goes stale and is
    handed over like a running one. The queue heartbeats (what readiness counts) begin once
    the worker consumes (`consuming()`, at `worker_ready`).

    What it needs of the worker comes in as callables: `held()` lists the refs of the jobs the
    worker holds, `resend` sends a stale job to its queue again (see Resend)."""

    def __init__(self, resend: Resend, held: Callable[[], list[str]], settings: Settings,
                 hostname: str, queues: list[str]) -> None:
        self.resend, self.held = resend, held
        self.settings, self.hostname, self.queues = settings, hostname, queues
        self.client = _redis(settings)
        self.is_consuming = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def beat(self) -> None:
        now = time.time()
        held = self.held()
        with self.client.pipeline() as pipe:
            if self.is_consuming:
                for queue in self.queues:
                    pipe.zadd(workers_key(queue), {self.hostname: now})
                    pipe.zremrangebyscore(workers_key(queue), "-inf", now - 3600)
            if held:
                pipe.zadd(RUNNING_KEY, {ref: now for ref in held})
            pipe.execute()

    def hold(self, ref: str) -> None:
        """A job was just received: its heartbeat starts now, not at the next round."""
        try:
            self.client.zadd(RUNNING_KEY, {ref: time.time()})
        except Exception as exc:  # noqa: BLE001 - the next round beats it
            log.warning("job heartbeat failed: %s", type(exc).__name__)

    def start(self, consuming: bool = True) -> "WorkerBeat":
        self.is_consuming = consuming
        self.beat()
        self._thread.start()
        return self

    def consuming(self) -> None:
        """The worker consumes its queues now: the queue heartbeats begin."""
        self.is_consuming = True
        self.beat()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.job_heartbeat_interval):
            try:
                self.beat()
                hand_over_stale_jobs(self.client, self.resend, self.settings)
            except Exception as exc:  # noqa: BLE001 - Redis down: try again next round
                log.warning("worker heartbeat failed: %s", type(exc).__name__)

    def stop(self) -> None:
        """Leave: the API at once stops counting this worker for its queues."""
        self._stop.set()
        try:
            with self.client.pipeline() as pipe:
                for queue in self.queues:
                    pipe.zrem(workers_key(queue), self.hostname)
                    pipe.hdel(degraded_key(queue), self.hostname)
                pipe.execute()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove the worker heartbeat: %s", type(exc).__name__)
