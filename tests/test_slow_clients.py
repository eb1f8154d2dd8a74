"""Slow clients (slowloris) against a real `fhir-rerank serve` (gunicorn) over raw sockets.

Eight and more connections that trickle one header line (or a body) every few seconds must
not stop the server: the worker buffers each request in its event loop until it is whole and
only then gives it a thread (adapter.server.OutcomeWorker), so `/healthz` keeps answering.
A client that takes longer than `server_request_timeout` for one request gets a 408
OperationOutcome and is closed. Every loop here is bounded and runs on loopback only.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = "f201"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_answer(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Read until EOF, or until a whole answer (head + Content-Length body) has arrived."""
    sock.settimeout(limit_s)
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        while sep and head.startswith(b"HTTP/1.1 100"):  # interim answer: skip it
            data = body
            head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _json_body(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def probe_healthz(port: int, timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET /healthz; status 0 when no answer came in `timeout`."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = _read_answer(sock, timeout)
    except OSError:
        answer = b""
    return _status(answer), time.monotonic() - start


def start_serve(tmp_path: Path, **env_settings: str) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env.update(PYTHONPATH=str(ROOT), **{"FHIR_RERANK_" + k.upper(): v
                                        for k, v in env_settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--reranker", "none",
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        if probe_healthz(port, 2.0)[0] == 200:
            return proc, port, log_path
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"serve did not come up: {log_path.read_text()}")


def stop_serve(proc: subprocess.Popen, log_path: Path) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("serve did not stop within 40 s of SIGTERM")
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    return text


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`fhir-rerank serve` with the default settings (1 process x 8 threads, no Redis)."""
    proc, port, log_path = start_serve(tmp_path_factory.mktemp("slow"))
    yield port
    stop_serve(proc, log_path)


class SlowClients:
    """`n` connections that each send a request line, then one header line every `every`
    seconds, never finishing the head; all driven by one thread for at most `for_s` seconds."""

    def __init__(self, port: int, n: int, every: float, for_s: float,
                 first: bytes = b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n",
                 line: bytes = b"X-Slow: a\r\n") -> None:
        self.port, self.n, self.every, self.for_s = port, n, every, for_s
        self.first, self.line = first, line
        self.socks: list[socket.socket] = []
        self.answers: dict[int, bytes] = {}
        self.lines_sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SlowClients":
        for _ in range(self.n):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(self.first)
            self.socks.append(sock)
        self._thread.start()
        return self

    def _run(self) -> None:
        stop_at = time.monotonic() + self.for_s
        while time.monotonic() < stop_at:
            time.sleep(min(self.every, max(0.0, stop_at - time.monotonic())))
            for i, sock in enumerate(self.socks):
                if i in self.answers:
                    continue
                try:
                    sock.sendall(self.line)
                    self.lines_sent += 1
                except OSError:  # the server closed it: read what it answered
                    self.answers[i] = _read_answer(sock, 2.0)

    def __exit__(self, *_: object) -> None:
        self._thread.join(timeout=self.for_s + 30)
        for sock in self.socks:
            sock.close()

    def collect(self) -> None:
        """Read what the server answered on connections it closed (after the trickle)."""
        for i, sock in enumerate(self.socks):
            if i not in self.answers:
                sock.settimeout(0.5)
                try:
                    self.answers[i] = _read_answer(sock, 1.0)
                except OSError:
                    self.answers[i] = b""


def test_healthz_answers_under_eight_slow_header_clients(default_server, capsys):
    """The issue's probe: 8 connections sending one header line every 3 s stopped the default
    server (0 of 6 /healthz probes answered in 40 s). Here 10 for 21 s."""
    latencies: list[float] = []
    with SlowClients(default_server, n=10, every=3.0, for_s=21.0) as slow:
        time.sleep(1.5)  # every slow connection is open and has sent its first bytes
        for _ in range(6):
            status, seconds = probe_healthz(default_server, timeout=5.0)
            assert status == 200, f"/healthz got {status or 'no answer'} in {seconds:.1f} s " \
                                  "under 10 slow clients"
            latencies.append(seconds)
            time.sleep(2.5)
        assert slow.lines_sent >= 10, "the slow clients did not trickle"
        assert not slow.answers, "no slow client is cut off before server_request_timeout"
    with capsys.disabled():
        print(f"\n/healthz under 10 slow clients: {len(latencies)} of 6 answered, latency "
              f"max {max(latencies) * 1000:.1f} ms, median "
              f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert max(latencies) < 2.0, latencies


def test_slow_bodies_do_not_hold_threads(default_server):
    """POST bodies trickled 10 bytes a second by 10 clients: /healthz still answers at once."""
    first = (b"POST /fhir/$rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
             b"application/fhir+json\r\nContent-Length: 5000\r\n\r\n{")
    with SlowClients(default_server, n=10, every=1.0, for_s=8.0, first=first, line=b" " * 10):
        time.sleep(1.0)
        for _ in range(4):
            status, seconds = probe_healthz(default_server)
            assert status == 200 and seconds < 2.0, (status, seconds)
            time.sleep(1.0)


def test_a_trickled_request_is_answered_whole(default_server):
    """Buffering changes nothing for a slow but complete request: a POST body trickled in
    pieces, a chunked body, `Expect: 100-continue`, and two requests on one connection."""
    body = json.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "pain"},
        {"name": "patient", "valueString": SMALL}]}).encode()
    request = (b"POST /fhir/$rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/fhir+json\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", default_server), timeout=10) as sock:
        for i in range(0, len(request), 40):
            sock.sendall(request[i:i + 40])
            time.sleep(0.02)
        answer = _read_answer(sock)
    assert _status(answer) == 200, answer[:300]
    assert _json_body(answer)["resourceType"] == "Bundle"

    chunked = (b"POST /fhir/$rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/fhir+json\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n")
    pieces = [body[:30], body[30:]]
    with socket.create_connection(("127.0.0.1", default_server), timeout=10) as sock:
        sock.sendall(chunked)
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.2)
        sock.sendall(b"0\r\n\r\n")
        answer = _read_answer(sock)
    assert _status(answer) == 200, answer[:300]

    expect = (b"POST /fhir/$rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
              b"application/fhir+json\r\nExpect: 100-continue\r\nContent-Length: " +
              str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", default_server), timeout=10) as sock:
        sock.sendall(expect)
        sock.settimeout(5)
        interim = sock.recv(100)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        sock.sendall(body)
        answer = rest + _read_answer(sock)
    assert _status(answer) == 200, answer[:300]
    assert b"100 Continue" not in answer, "one interim answer only"

    two = (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
           b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", default_server), timeout=10) as sock:
        sock.sendall(two[:30])
        time.sleep(0.3)
        sock.sendall(two[30:])
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2, data[:500]
    assert b"CapabilityStatement" in data


def test_a_client_slower_than_the_request_timeout_gets_408(tmp_path):
    """`server_request_timeout` bounds one request's arrival: then 408 + OperationOutcome naming
    the setting, and the connection closes; /healthz answered throughout."""
    proc, port, log_path = start_serve(tmp_path, server_request_timeout="3", server_threads="2")
    try:
        with SlowClients(port, n=8, every=1.0, for_s=7.0) as slow:
            time.sleep(1.0)
            assert probe_healthz(port)[0] == 200
            time.sleep(5.0)
        slow.collect()
        assert len(slow.answers) == 8
        for answer in slow.answers.values():
            assert _status(answer) == 408, answer[:300]
            outcome = _json_body(answer)
            assert outcome["resourceType"] == "OperationOutcome"
            assert "server_request_timeout" in outcome["issue"][0]["diagnostics"]
    finally:
        text = stop_serve(proc, log_path)
    assert "X-Slow" not in text and "metadata" not in text  # nothing of the request logged
