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

import functools
import json
import logging
import os
import selectors
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
from adapter.errors import ModelLoadError
from adapter.logs import JsonFormatter

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


#: Set by `gunicorn_options` in the master before it forks (workers inherit it): how long a
#: client may take to send one whole request, and the body size buffered before a thread.
_buffering: dict[str, float] = {"timeout": 30.0, "max_body": 1_000_000}

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _head_limit(cfg: Any) -> int:
    """Bytes of a request head past which gunicorn's own parser refuses it (414 / 431)."""
    return (cfg.limit_request_line + 2 +
            max(1, cfg.limit_request_fields) * (cfg.limit_request_field_size + 2) + 2)


def _chunked_done(buf: bytes | bytearray, start: int, max_body: int) -> bool:
    """True once a chunked body starting at `start` is whole (last chunk and trailers), is
    malformed, or is over `max_body` (gunicorn answers the last two itself)."""
    pos, total = start, 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return len(buf) - pos > 1024  # a size line that long is malformed
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return True
        if size < 0:
            return True
        if size == 0:  # trailers (usually none), then an empty line
            if buf.startswith(b"\r\n", eol + 2):
                return True
            return buf.find(b"\r\n\r\n", eol) >= 0
        total += size
        if total > max_body:
            return True
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return False


def request_state(buf: bytes | bytearray, cfg: Any,
                  max_body: int) -> tuple[bool, bool]:
    """(whole, expects_continue) for the bytes of one HTTP/1.x request received so far.

    `whole` is also True when the request is malformed or over a limit: gunicorn's parser then
    finds the fault in the bytes at hand and answers it without waiting on the client.
    `expects_continue`: an HTTP/1.1 head with `Expect: 100-continue` whose body is missing."""
    end = buf.find(b"\r\n\r\n")
    bare = buf.find(b"\n\n")
    if 0 <= bare and (end < 0 or bare < end):
        return True, False  # bare LF line ends: gunicorn decides
    if end < 0:
        line_end = buf.find(b"\r\n")
        if line_end < 0 and len(buf) > cfg.limit_request_line + 2:
            return True, False  # request line too long: 414
        return len(buf) > _head_limit(cfg), False
    lines = bytes(buf[:end]).split(b"\r\n")
    length, chunked, expect = None, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return True, False
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = chunked or value.endswith(b"chunked")
            if not value.endswith(b"chunked"):
                return True, False
        elif name == b"expect" and value == b"100-continue":
            expect = lines[0].endswith(b"HTTP/1.1")
    start = end + 4
    if chunked:
        if length is not None:
            return True, False
        done = _chunked_done(buf, start, max_body)
        return done, expect and not done and len(buf) == start
    if not length:
        return True, False
    if length > max_body:
        return True, False  # the app answers 413 from Content-Length, unread
    have = len(buf) - start
    return have >= length, expect and have == 0


def _without_expect(data: bytes) -> bytes:
    """The request with its `Expect: 100-continue` line removed (already answered)."""
    end = data.find(b"\r\n\r\n")
    lines = data[:end].split(b"\r\n")
    kept = [ln for ln in lines if not (ln.partition(b":")[0].strip().lower() == b"expect" and
                                       ln.partition(b":")[2].strip().lower() == b"100-continue")]
    return b"\r\n".join(kept) + data[end:]


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
    """gunicorn's threaded worker, answering its own refusals as FHIR OperationOutcomes, and
    buffering each request before a thread serves it.

    Slow clients: gunicorn's thread reads a request with blocking reads, so 8 connections that
    each trickle a header line every few seconds held all 8 threads and the server answered
    nothing. Here the worker's event loop (one thread, non-blocking sockets) reads every
    request until it is whole: the head, and a body of up to `max_body_bytes` (Content-Length
    or chunked; `Expect: 100-continue` answered here). Only then does a thread get it, with
    the bytes already in hand. A request not whole within `server_request_timeout` seconds is
    answered 408 and closed. Malformed or over-limit heads go to gunicorn's parser at once,
    which refuses them from the bytes at hand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from collections import deque

        self.buffering: Any = deque()  # connections still receiving, oldest deadline first

    def enqueue_req(self, conn: Any) -> None:
        """Every way a connection reaches the thread pool (new, kept alive, pipelined) goes
        through the buffer first; a whole request goes on."""
        if getattr(conn, "fr_ready", None) is not None:
            super().enqueue_req(conn)
            return
        conn.sock.setblocking(False)
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.fr_buf = bytearray(held)
        conn.fr_continued = False
        conn.fr_deadline = time.monotonic() + _buffering["timeout"]
        if held and self._whole(conn):
            self._hand_over(conn)
            return
        self.buffering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             functools.partial(self._on_readable, conn))

    def _whole(self, conn: Any) -> bool:
        whole, expects = request_state(conn.fr_buf, self.cfg, int(_buffering["max_body"]))
        if expects and not conn.fr_continued:
            conn.fr_continued = True
            try:
                conn.sock.send(_CONTINUE)
            except OSError:
                return True  # gone: gunicorn finds out
        return whole

    def _hand_over(self, conn: Any) -> None:
        data = bytes(conn.fr_buf)
        conn.fr_buf = None
        conn.fr_ready = _without_expect(data) if conn.fr_continued else data
        super().enqueue_req(conn)

    def _forget(self, conn: Any) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        try:
            self.buffering.remove(conn)
        except ValueError:
            pass

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client sent all it will before its request was whole
            self._forget(conn)
            if conn.fr_buf:  # half-closed after part of a request: gunicorn's parser and the
                self._hand_over(conn)  # app answer the incomplete request (a 400), not silence
                return
            self.nr_conns -= 1
            conn.close()
            return
        conn.fr_buf += data
        if self._whole(conn):
            self._forget(conn)
            self._hand_over(conn)

    def murder_pending(self) -> None:
        """gunicorn's check of connections waiting for data, and the request deadline."""
        super().murder_pending()
        from adapter.metrics import REQUESTS

        now = time.monotonic()
        while self.buffering and self.buffering[0].fr_deadline <= now:
            conn = self.buffering.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            if conn.fr_buf:  # a request had begun: say why it ends
                REQUESTS.labels("malformed", "-", "408").inc()
                try:
                    conn.sock.send(outcome_bytes(
                        408, "Request Timeout", "timeout",
                        f"the request did not arrive whole within server_request_timeout = "
                        f"{_buffering['timeout']:g} s; send the whole request at once"))
                except OSError:
                    pass
            conn.close()

    def _cap_keepalive(self, deadline: float) -> None:
        """Stopping: requests still arriving get the same short linger as kept-alive ones."""
        super()._cap_keepalive(deadline)
        for conn in self.buffering:
            conn.fr_deadline = min(conn.fr_deadline, deadline)

    def handle(self, conn: Any) -> Any:
        """A thread serves a whole request: the buffered bytes go to gunicorn's parser."""
        data, conn.fr_ready = getattr(conn, "fr_ready", None), None
        if data is not None:
            try:
                conn.sock.setblocking(True)
                conn.init()
            except OSError:
                return False
            conn.parser.unreader.unread(data)
            conn.data_ready = True
        return super().handle(conn)

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

    # Imported here, not at the top: they import prometheus_client, which must not be loaded
    # before `serve` sets PROMETHEUS_MULTIPROC_DIR (see there).
    from adapter.api.app import create_app
    from adapter.api.state import state_of

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

    class JsonGunicornLogger(Logger):
        def _set_handler(self, log: Any, output: Any, fmt: Any, stream: Any = None) -> None:
            super()._set_handler(log, output, JsonFormatter(), stream)

    return JsonGunicornLogger


def gunicorn_options(settings: Settings, log_level: str = "info") -> dict[str, Any]:
    from adapter.metrics import mark_process_dead

    _buffering.update(timeout=float(max(1.0, settings.server_request_timeout)),
                      max_body=float(settings.max_body_bytes))
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
        "forwarded_allow_ips": ",".join(settings.forwarded_allow_ips),
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


def port_in_use(host: str, port: int) -> bool:
    """True when (host, port) cannot be bound because something listens there already."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def serve(settings: Settings, log_level: str = "info") -> int:
    """Run gunicorn in the foreground until stopped; 2 when the app cannot start."""
    if settings.port and port_in_use(settings.host, settings.port):  # one line, not gunicorn's ten
        log.error("port %d on %s is in use (another fhir-rerank serve?); pick a free one with "
                  "--port N, FHIR_RERANK_PORT=N or `make demo PORT=N`", settings.port,
                  settings.host)
        return 2
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
