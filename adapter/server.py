"""The production server: gunicorn running `create_app()`, configured from Settings.

`fhir-rerank serve` calls `serve(settings)`: gunicorn's threaded worker with one change
(`OutcomeWorker`): requests gunicorn itself refuses before the app sees them (a malformed or
over-long request line, too many or too large headers, a bad HTTP version) are answered with
an OperationOutcome instead of gunicorn's HTML page, and logged without the request line
(it may hold a patient id or a question); and a body the app did not read (a 413) is read and
dropped after the answer, within a bound, so that a client still sending gets that answer.
Workers, threads and timeouts come from the `server_*` settings, request limits from
`max_request_line` / `max_header_*`.

Without `redis_url` jobs run in the API process, so `server_workers = 0` (auto) starts one
server process: a job polled through another process would not be found there. An explicit
`server_workers` above 1 is honoured with a warning (fine for synchronous searches only).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from adapter.config import Settings

log = logging.getLogger("adapter.server")
FHIR_JSON = "application/fhir+json; charset=utf-8"
APP_LOAD_ERROR = 4  # gunicorn's exit status when a worker cannot load the app


def _refusal(exc: BaseException, cfg: Any) -> tuple[int, str, str, str]:
    """(status, reason, issue code, message) for a request gunicorn refused to parse."""
    if isinstance(exc, http_errors.LimitRequestLine):
        return (414, "URI Too Long", "too-costly",
                f"the request line is longer than max_request_line = {cfg.limit_request_line} "
                "bytes; send long searches as POST $rerank with a Parameters body")
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return (431, "Request Header Fields Too Large", "too-costly",
                f"too many header fields or one too large (max_header_count = "
                f"{cfg.limit_request_fields}, max_header_bytes = "
                f"{cfg.limit_request_field_size}); send fewer or smaller headers")
    if isinstance(exc, http_errors.InvalidHTTPVersion):
        return (400, "Bad Request", "invalid",
                "the HTTP version of the request line is not supported; use HTTP/1.1")
    if isinstance(exc, http_errors.ExpectationFailed):
        return 417, "Expectation Failed", "invalid", "only `Expect: 100-continue` is supported"
    if isinstance(exc, (http_errors.InvalidHeader, http_errors.InvalidHeaderName,
                        http_errors.ObsoleteFolding)):
        return (400, "Bad Request", "invalid",
                "a request header is malformed (name, value or line folding); check the headers")
    if isinstance(exc, http_errors.UnsupportedTransferCoding):
        return (400, "Bad Request", "not-supported",
                "the Transfer-Encoding is not supported; send the body with Content-Length or "
                "chunked")
    return (400, "Bad Request", "invalid",
            "the request line is malformed: it must be `METHOD /path?query HTTP/1.1` with the "
            "URL percent-encoded (no spaces, tabs or other whitespace inside it)")


def _client_error_types() -> tuple[type[BaseException], ...]:
    return tuple(getattr(http_errors, name) for name in (
        "ParseException", "NoMoreData", "InvalidRequestLine", "InvalidRequestMethod",
        "InvalidHTTPVersion", "InvalidHeader", "InvalidHeaderName", "LimitRequestLine",
        "LimitRequestHeaders", "InvalidProxyLine", "ForbiddenProxyRequest",
        "InvalidSchemeHeaders", "UnsupportedTransferCoding", "ObsoleteFolding",
        "ExpectationFailed", "InvalidChunkSize", "ChunkMissingTerminator",
        "InvalidChunkExtension", "ConfigurationProblem") if hasattr(http_errors, name))


def outcome_bytes(status: int, reason: str, code: str, message: str,
                  incident: str | None = None) -> bytes:
    """A whole HTTP/1.1 response carrying one OperationOutcome; the connection closes after."""
    outcome: dict[str, Any] = {"resourceType": "OperationOutcome",
                               "issue": [{"severity": "error", "code": code,
                                          "diagnostics": message}]}
    if incident:
        outcome["id"] = incident
    body = json.dumps(outcome).encode("utf-8")
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {FHIR_JSON}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _close_gently(sock: socket.socket, budget_s: float = 1.0, max_bytes: int = 1 << 20) -> None:
    """Half-close, then read what the client still sends (bounded), so that closing with
    unread input does not reset the connection before the client has read our answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline, drained = time.monotonic() + budget_s, 0
        while time.monotonic() < deadline and drained < max_bytes:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def discard_body(body: Any, sock: socket.socket, max_bytes: int, budget_s: float) -> bool:
    """Read and drop what is left of a request body (at most `max_bytes`, `budget_s`
    seconds); True when it was read to its end."""
    deadline, drained, prior = time.monotonic() + budget_s, 0, None
    try:
        if sock.fileno() < 0:
            return False  # gunicorn closed it already (an error while answering)
        prior = sock.gettimeout()
        while drained <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            sock.settimeout(remaining)
            data = body.read(65536)
            if not data:
                return True
            drained += len(data)
        return False
    except Exception:  # a malformed chunk, a timeout, a client gone: the connection closes
        return False
    finally:
        try:
            sock.settimeout(prior)
        except OSError:
            pass


class OutcomeWorker(ThreadWorker):
    """gunicorn's threaded worker, answering its own refusals as FHIR OperationOutcomes."""

    #: A body the app did not read (a 413 answered from Content-Length alone) is read and
    #: dropped after the answer, up to this many bytes and seconds: closing with unread input
    #: resets the connection, and a client still sending would lose the answer. Beyond the
    #: bound the connection closes (gunicorn's own drain is 64 KiB).
    DISCARD_BYTES = 64 << 20
    DISCARD_SECONDS = 5.0

    #: after a request body of at least this many bytes, free memory goes back to the system
    TRIM_AFTER_BYTES = 64 << 10

    def handle_request(self, req: Any, conn: Any) -> bool:
        keepalive = super().handle_request(req, conn)
        body = getattr(req, "body", None)
        drained = body is None or discard_body(body, conn.sock, self.DISCARD_BYTES,
                                               self.DISCARD_SECONDS)
        try:
            length = int(next((v for k, v in getattr(req, "headers", ())
                               if k.upper() == "CONTENT-LENGTH"), 0))
        except ValueError:
            length = 0
        if length >= self.TRIM_AFTER_BYTES or any(
                k.upper() == "TRANSFER-ENCODING" for k, _ in getattr(req, "headers", ())):
            release_free_memory()
        return keepalive and drained

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        from adapter.metrics import REQUESTS

        if isinstance(exc, _client_error_types()):
            status, reason, code, message = _refusal(exc, self.cfg)
            incident = None
            # The exception text quotes the request line or header: patient data. Type only.
            log.warning("refused a malformed request: %s (%s)", type(exc).__name__, status)
        else:
            status, reason, code = 500, "Internal Server Error", "exception"
            incident = uuid.uuid4().hex[:12]
            message = (f"internal error {incident}; the server log has the details under "
                       "this id")
            log.error("internal error %s in the HTTP layer: %s", incident, type(exc).__name__)
        REQUESTS.labels("malformed", "-", str(status)).inc()
        try:
            client.sendall(outcome_bytes(status, reason, code, message, incident))
            _close_gently(client)
        except OSError:
            log.debug("could not send the error answer")


class ProductionServer(BaseApplication):
    """gunicorn configured from a dict of options; each worker builds its own app."""

    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return build_app(self.settings)


#: The gunicorn worker of this process (set by the post_fork hook), kept alive while loading.
_booting: dict[str, Any] = {}


def _heartbeat_while_loading(stop: threading.Event) -> None:
    """A model load may outlast `server_timeout`; gunicorn would kill a silent booting worker."""
    worker = _booting.get("worker")
    while worker is not None and not stop.wait(2.0):
        worker.notify()


def build_app(settings: Settings) -> Any:
    """Create the app in this (worker) process and load its reranker before serving."""
    import sys

    from adapter import create_app
    from adapter.api.state import state_of
    from adapter.errors import ModelLoadError

    stop = threading.Event()
    threading.Thread(target=_heartbeat_while_loading, args=(stop,), daemon=True,
                     name="boot-heartbeat").start()
    try:
        app = create_app(settings)
        if not settings.redis_url:
            try:
                reranker = state_of(app).runtime.reranker()
            except ModelLoadError as exc:
                log.error("refusing to start (reranker_required=true): %s", exc.message)
                sys.exit(APP_LOAD_ERROR)
            if not getattr(reranker, "fallback_reason", None):  # else loading said why
                log.info("reranker: %s", reranker.describe())
        if settings.embedder.strip():  # dense recall runs here, in the API process
            embedder = state_of(app).runtime.embedder()  # one warning when it cannot load
            if not isinstance(embedder, str):
                log.info("dense recall: %s fused with BM25 (rrf_k=%d)",
                         embedder.describe(), settings.rrf_k)  # type: ignore[attr-defined]
    finally:
        stop.set()
    return app


def server_processes(settings: Settings) -> int:
    """`server_workers`, or when 0: twice the CPU count with Redis (a process's threads share
    one GIL and wait on the FHIR server, so one process per core leaves cores idle: 4 processes
    served 42.3 requests/s on 2 cores where 2 served 31.4, bench/load.py), 1 without
    (in-process jobs live in one process)."""
    if settings.server_workers > 0:
        return settings.server_workers
    return 2 * max(1, os.cpu_count() or 1) if settings.redis_url else 1


def _json_gunicorn_logger() -> type:
    """gunicorn's logger with JSON lines (`log_format = json`): its own lines (booting,
    worker exits) then read like the app's."""
    from gunicorn.glogging import Logger

    from adapter.logs import JsonFormatter

    class JsonGunicornLogger(Logger):
        def _set_handler(self, log: Any, output: Any, fmt: Any, stream: Any = None) -> None:
            super()._set_handler(log, output, JsonFormatter(), stream)

    return JsonGunicornLogger


def gunicorn_options(settings: Settings, log_level: str = "info") -> dict[str, Any]:
    from adapter.metrics import mark_process_dead

    extra: dict[str, Any] = {}
    if settings.log_format == "json":
        extra["logger_class"] = _json_gunicorn_logger()
    return {**extra,
        "bind": f"{settings.host}:{settings.port}",
        "workers": server_processes(settings),
        "threads": max(1, settings.server_threads),
        "worker_class": "adapter.server.OutcomeWorker",
        "timeout": settings.server_timeout,
        "graceful_timeout": settings.server_graceful_timeout,
        "keepalive": settings.server_keepalive,
        "limit_request_line": settings.max_request_line,
        "limit_request_fields": settings.max_header_count,
        "limit_request_field_size": settings.max_header_bytes,
        "accesslog": None,  # the app logs each request (adapter.access) without its query
        "errorlog": "-",
        "loglevel": log_level.lower(),
        "proc_name": "fhir-rerank",
        "control_socket_disable": True,
        "post_fork": lambda _arbiter, worker: _booting.update(worker=worker),
        "child_exit": lambda _arbiter, worker: mark_process_dead(worker.pid),
    }


def release_free_memory() -> None:
    """Give memory the allocator holds free back to the system (glibc `malloc_trim`): a large
    request's buffers, once freed, otherwise stay in the process's RSS. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before gunicorn forks (the workers inherit it): by default
    each of a process's threads may grow an arena of its own, which reads as RSS growth under
    load (what MALLOC_ARENA_MAX does, set here since the environment is read at start-up only).
    A no-op where libc has no mallopt (musl, macOS)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def serve(settings: Settings, log_level: str = "info") -> int:
    """Run gunicorn in the foreground until stopped; 2 when the app cannot start."""
    # Not imported from adapter.metrics: importing prometheus_client before this variable is
    # set would fix every process of the tree in single-process mode.
    MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
    master = os.getpid()  # gunicorn forks workers inside run(): they unwind through here too
    own_dir = not os.environ.get(MULTIPROC_ENV)
    metrics_dir = tempfile.mkdtemp(prefix="fhir-rerank-metrics-") if own_dir \
        else os.environ[MULTIPROC_ENV]
    os.environ[MULTIPROC_ENV] = metrics_dir  # before any metric exists in this process tree
    try:
        from adapter.startup import report_dependencies

        report_dependencies(settings)
        if not settings.redis_url and settings.server_workers > 1:
            log.warning("server_workers = %d without redis_url: each process keeps its own "
                        "in-process jobs, so a 202's Content-Location may be answered 404 by "
                        "another process; set redis_url for asynchronous searches",
                        settings.server_workers)
        log.info("serving http://%s:%s/fhir with gunicorn: %d process(es) x %d threads",
                 settings.host, settings.port, server_processes(settings),
                 max(1, settings.server_threads))
        _limit_malloc_arenas()
        ProductionServer(settings, gunicorn_options(settings, log_level)).run()
    except SystemExit as exc:
        if os.getpid() != master:
            raise
        return 0 if exc.code in (0, None) else 2
    finally:
        if own_dir and os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
    return 0
