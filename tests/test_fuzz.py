"""Hostile input against a real `fhir-rerank serve` (gunicorn) process over raw sockets.

Hypothesis generates request lines, headers, query strings, paths and POST bodies (deep JSON,
odd Parameters). Every request must get an HTTP answer (no dropped connection), never a 500,
and every error body must be a FHIR OperationOutcome in JSON. At least 2,000 requests per run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ROOT = Path(__file__).resolve().parent.parent
SMALL = "f201"  # a fixture patient with 10 resources: real searches stay cheap
BIG = "79a66c97-6131-3213-f3c9-4606946ab056"
SENT = {"count": 0}
FUZZ = settings(deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`fhir-rerank serve` (gunicorn) over the fixtures with reranker none; yields the port."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("fuzz") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env.update(PYTHONPATH=str(ROOT), FHIR_RERANK_SERVER_THREADS="16")
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--reranker", "none",
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if _status(exchange(port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Connection: close\r\n\r\n", count=False)) == 200:
                break
        except OSError:
            time.sleep(0.3)
    else:
        raise AssertionError(f"serve did not come up: {log_path.read_text()}")
    yield port
    proc.terminate()
    proc.wait(timeout=20)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def exchange(port: int, data: bytes, *, count: bool = True, half_close: bool = False) -> bytes:
    """Send raw bytes, read the answer to EOF. A reset before any byte is a dropped connection.
    `half_close`: shut the sending side after the bytes (the client has sent all it will)."""
    if count:
        SENT["count"] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed; the answer is still to be read
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    assert answer, f"dropped connection (no answer) for {data[:200]!r}"
    return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def check_answer(answer: bytes, request: bytes, *, head: bool = False) -> int:
    """One well-formed HTTP answer: not a 500, errors as OperationOutcome JSON."""
    head_part, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, f"incomplete answer {answer[:200]!r} to {request[:200]!r}"
    status_line, *header_lines = head_part.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1."), status_line
    status = int(status_line.split(" ", 2)[1])
    assert status < 500, f"{status} for {request[:300]!r}: {body[:300]!r}"  # files: no upstream
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in header_lines)}
    if head or status in (204, 304):
        return status
    assert "json" in headers.get("content-type", ""), (status, headers, body[:200])
    parsed = json.loads(body)
    if status >= 400:
        assert parsed["resourceType"] == "OperationOutcome", parsed
        assert parsed["issue"] and all(i.get("diagnostics") for i in parsed["issue"])
    return status


def get(port: int, target: bytes, extra: bytes = b"", method: bytes = b"GET") -> int:
    request = (method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + extra +
               b"Connection: close\r\n\r\n")
    return check_answer(exchange(port, request), request, head=method == b"HEAD")


def post(port: int, target: bytes, body: bytes, ctype: bytes = b"application/fhir+json") -> int:
    request = (b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + ctype +
               b"\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\nConnection: close\r\n\r\n" + body)
    return check_answer(exchange(port, request), request)


# --- strategies ------------------------------------------------------------------------------

WHITESPACE = st.sampled_from([b"\t", b"\x0b", b"\x0c", b"\xa0", "\u00a0".encode(), b"\x85",
                              "\u2003".encode(), b"\x1c", b"\x00", b"  ", b"\r", b"\n"])
PATHS = st.sampled_from([b"/fhir/Condition", b"/fhir/Observation", b"/fhir/$rerank",
                         b"/fhir/DocumentReference", f"/fhir/Patient/{SMALL}/$rerank".encode(),
                         b"/fhir/metadata", b"/fhir/_async/x", b"/healthz", b"/fhir/Patient/x",
                         b"//fhir//metadata", b"/fhir/Binary/1", b"/", b"*", b"/fhir/%00"])
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
PARAM_NAMES = st.sampled_from(["patient", "subject", "_content", "query", "_count", "_offset",
                               "recall", "instruction", "model", "_type", "_sort", "_format",
                               "date", "code", "status", "category", "_elements",
                               "clinical-status"]) | TEXT


def _param_value(name: str) -> st.SearchStrategy[str]:
    if name in ("patient", "subject"):
        return st.sampled_from([SMALL, "Patient/" + SMALL, "nobody", "", "Observation/1"]) | TEXT
    if name in ("_count", "_offset", "recall"):
        return st.integers(-10, 10**12).map(str) | TEXT
    return TEXT


QUERY = st.lists(PARAM_NAMES.flatmap(lambda n: st.tuples(st.just(n), _param_value(n))),
                 max_size=8)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12)
VALUE_KEYS = st.sampled_from(["valueString", "valueInteger", "valueReference", "valueBoolean",
                              "valueCode", "value", "name", "part", "resource"]) | TEXT
PARAMETER = st.dictionaries(VALUE_KEYS, JSON | PARAM_NAMES, max_size=3) | JSON


# --- generated requests ----------------------------------------------------------------------

@settings(FUZZ, max_examples=550)
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS",
                               b"BREW", b"get", b""]),
       path=PATHS, junk=st.lists(WHITESPACE | st.binary(max_size=6), max_size=3),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ",
                                b"HTTP/3", b"http/1.1", b"", b"HTTP/1.1\t", b"HTTP/11"]),
       where=st.integers(0, 2))
def test_request_lines(server, method, path, junk, version, where):
    extra = b"".join(junk)
    parts = [method, path, version]
    parts[where] = parts[where] + extra
    request = b" ".join(parts) + b"\r\nHost: localhost\r\nContent-Length: 0\r\n" \
                                 b"Connection: close\r\n\r\n"
    check_answer(exchange(server, request), request, head=method == b"HEAD")


@settings(FUZZ, max_examples=350)
@given(headers=st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=60)),
                        max_size=6),
       host=st.sampled_from([b"localhost", b"127.0.0.1", b"evil.example", b"", b"localhost:1",
                             b"[::1]", b"a" * 300, b"localhost\x00"]) | st.binary(max_size=12))
def test_headers(server, headers, host):
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers
                     if name.lower().strip() not in (b"content-length", b"transfer-encoding",
                                                     b"connection", b"expect", b"upgrade"))
    request = (b"GET /fhir/Condition?patient=" + SMALL.encode() + b"&_content=pain HTTP/1.1\r\n"
               b"Host: " + host + b"\r\n" + lines + b"Connection: close\r\n\r\n")
    check_answer(exchange(server, request), request)


@settings(FUZZ, max_examples=500)
@given(path=PATHS, query=QUERY, strict=st.booleans())
def test_query_strings(server, path, query, strict):
    target = path + (b"?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                                      for k, v in query).encode() if query else b"")
    extra = b"Prefer: handling=strict\r\n" if strict else b""
    get(server, target, extra)


@settings(FUZZ, max_examples=400)
@given(params=st.lists(PARAMETER, max_size=6), query=QUERY,
       target=st.sampled_from([b"/fhir/$rerank", f"/fhir/Patient/{SMALL}/$rerank".encode()]))
def test_parameters_bodies(server, params, query, target):
    body = {"resourceType": "Parameters",
            "parameter": params + [{"name": k, "valueString": v} for k, v in query]}
    post(server, target, json.dumps(body).encode())


@settings(FUZZ, max_examples=300)
@given(body=JSON | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
       depth=st.integers(0, 3000), opener=st.sampled_from(["[", "{\"a\":", "[{\"b\":["]),
       ctype=st.sampled_from([b"application/fhir+json", b"text/plain", b"application/xml",
                              b"application/json; charset=latin-1"]))
def test_odd_bodies(server, body, depth, opener, ctype):
    closer = "".join({"[": "]", "{": "}"}[c] for c in reversed(opener) if c in "[{")
    raw = opener * depth + json.dumps(body) + closer * depth
    post(server, b"/fhir/$rerank", raw.encode("utf-8", "surrogatepass"), ctype)


GENERATED = ("test_request_lines", "test_headers", "test_query_strings", "test_parameters_bodies",
             "test_odd_bodies")


@pytest.fixture(autouse=True)
def _each_generated_test_sends_its_examples(request):
    """A generated test sends one request per example it runs, and runs its max_examples
    (checked after each test, so it holds whatever order or subset of tests runs)."""
    before = SENT["count"]
    yield
    if request.function.__name__ in GENERATED:
        wanted = request.function._hypothesis_internal_use_settings.max_examples
        assert SENT["count"] - before >= 0.9 * wanted, (request.function.__name__,
                                                        SENT["count"] - before, wanted)


def test_at_least_2000_requests_are_generated():
    """The generated tests are set to send at least 2,000 requests per run; the autouse
    fixture above checks that each one sent its share (independent of the other tests)."""
    total = sum(globals()[name]._hypothesis_internal_use_settings.max_examples
                for name in GENERATED)
    assert total >= 2000, total


# --- failures found by fuzzing, kept as plain regressions ------------------------------------

@pytest.mark.parametrize("request_line", [
    b"GET /fhir/Condition?patient=" + BIG.encode() + b"\t&_content=x HTTP/1.1",  # TAB
    b"GET /fhir/Condition?_content=a\xa0b HTTP/1.1",  # NBSP (latin-1)
    "GET /fhir/Condition?_content=a\u00a0b HTTP/1.1".encode(),  # NBSP (UTF-8)
    b"GET /fhir/Condition?_content=a\x0bb HTTP/1.1",  # vertical tab
    b"GET /fhir/metadata HTTP/2.0",
    b"PRI * HTTP/2.0",
    b"GET /fhir/Condition?q=" + b"a" * 70_000 + b" HTTP/1.1",  # over 64 KiB
])
def test_malformed_request_lines_get_an_operation_outcome(server, request_line):
    request = request_line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    status = check_answer(exchange(server, request), request)
    assert status in (400, 414)


@pytest.mark.parametrize("body", [
    b"[" * 976 + b"]" * 976,
    b'{"resourceType": "Parameters", "parameter": 5}',
    b'{"resourceType": "Parameters", "parameter": [{"name": 5, "valueString": "x"}]}',
    b'{"resourceType": "Parameters", "parameter": {"name": "query"}}',
])
def test_bodies_that_once_raised_are_400(server, body):
    assert post(server, b"/fhir/$rerank", body) == 400


def test_huge_headers_are_431(server):
    many = b"".join(b"X-%d: y\r\n" % i for i in range(300))
    assert get(server, b"/fhir/metadata", many) == 431
    assert get(server, b"/fhir/metadata", b"X-Big: " + b"a" * 20_000 + b"\r\n") == 431


def _requests_counted(port: int) -> tuple[float, str]:
    answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n", count=False)
    text = answer.partition(b"\r\n\r\n")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fhir_rerank_requests_total{")), text


def test_metrics_add_up_across_gunicorn_and_the_app(server):
    """Multiprocess mode: the app's counters and the HTTP layer's refusals reach /metrics.
    It sends what it counts (app requests, a 400 and a 414 refused by gunicorn), so it holds
    alone, first or last."""
    before, _ = _requests_counted(server)
    for _ in range(20):
        get(server, b"/fhir/metadata")
    for line in (b"GET /fhir/metadata HTTP/2.0", b"GET /fhir/x?q=" + b"a" * 9000 + b" HTTP/1.1"):
        request = line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        check_answer(exchange(server, request), request)
    after, text = _requests_counted(server)
    assert after - before >= 22, (before, after)
    assert 'route="malformed",status="400"' in text and 'route="malformed",status="414"' in text

