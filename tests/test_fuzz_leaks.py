"""Leaks a hostile upstream or a crafted record could cause, tried over real loopback sockets
(issue 16, items 4, 5, 6 and 14): the caller's token never reaches a path outside the FHIR base
however the URL hides `..`; the remote reranker never follows a redirect with patient data;
a malformed upstream header line puts no patient id into any log line."""
from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
import requests

from adapter.errors import UpstreamError
from adapter.fhir.client import FhirRestSource
from adapter.rerank.remote import RemoteReranker

TOKEN = f"Bearer tok{uuid.uuid4().hex[:8]}"


class Recorder:
    """A loopback HTTP server that records every request (method, path as sent, headers,
    body) and answers with `answer(handler) -> (status, headers, body)`."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], tuple[int, dict, bytes]]
                 ) -> None:
        self.seen: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.seen.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                status, headers, payload = answer(self)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _any  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fhir_answer(handler: BaseHTTPRequestHandler) -> tuple[int, dict, bytes]:
    """/fhir/... answers like a FHIR server; anything else is the "admin" page a leaked
    token would open (it answers 200 with a Bundle, as the probe's did)."""
    json_type = {"Content-Type": "application/fhir+json"}
    if handler.path.startswith("/fhir/Binary/"):
        return 200, {"Content-Type": "text/plain"}, b"an attachment under the base"
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Condition", "id": "c1", "code": {"text": "x"}}}]}
    if handler.path.startswith("/fhir/Condition"):
        next_link = getattr(handler.server, "next_link", None)
        if next_link and "page=2" not in handler.path:
            bundle["link"] = [{"relation": "next", "url": next_link}]
    return 200, json_type, json.dumps(bundle).encode()


@pytest.fixture()
def upstream():
    server = Recorder(_fhir_answer)
    yield server
    server.close()


def _evil_urls(origin: str) -> list[str]:
    """Attachment URLs and paging links that leave `/fhir` once a server reads them."""
    host = origin.removeprefix("http:")
    return [
        f"{origin}/fhir/../admin/requests",
        f"{host}/fhir/../admin/requests",  # scheme-relative
        f"{origin}/fhir/Binary/../../admin/requests",
        f"{origin}/fhir/./../admin/requests",
        f"{origin}/fhir/%2e%2e/admin/requests",
        f"{origin}/fhir/%2E%2E/admin/requests",
        f"{origin}/fhir/.%2e/admin/requests",
        f"{origin}/fhir/%2e%2e%2fadmin/requests",
        f"{origin}/fhir/..%2Fadmin/requests",
        f"{origin}/fhir/%252e%252e/admin/requests",  # encoded twice
        f"{origin}/fhir/..\\admin/requests",
        f"{origin}/fhir\\..\\admin/requests",
        f"{origin}/fhir/..;/admin/requests",
        f"{origin}/fhir/Binary/..%5c..%5cadmin",
        "../admin/requests",
        "Binary/../../admin/requests",
        "Binary/%2e%2e/%2e%2e/admin/requests",
    ]


def _outside_base(seen: list[dict[str, Any]]) -> list[str]:
    return [r["path"] for r in seen if not r["path"].startswith("/fhir/")]


def test_attachment_urls_with_dot_segments_get_no_token(upstream):
    source = FhirRestSource(f"{upstream.origin}/fhir", retries=0)
    for url in _evil_urls(upstream.origin):
        assert source.fetch_attachment(url, TOKEN) is None, url
    assert upstream.seen == [], [r["path"] for r in upstream.seen]
    # Dots that stay under the base are followed, normalised, with the token.
    inside = f"{upstream.origin}/fhir/DocumentReference/../Binary/b1"
    assert source.fetch_attachment(inside, TOKEN) == ("text/plain",
                                                      b"an attachment under the base")
    assert [(r["path"], r["headers"]["Authorization"]) for r in upstream.seen] == \
        [("/fhir/Binary/b1", TOKEN)]


@pytest.mark.parametrize("case", range(len(_evil_urls("http://h"))))
def test_paging_links_with_dot_segments_are_not_followed(upstream, case):
    upstream.server.next_link = _evil_urls(upstream.origin)[case]
    source = FhirRestSource(f"{upstream.origin}/fhir", retries=0)
    with pytest.raises(UpstreamError, match="outside the FHIR base"):
        source.search("Condition", [("patient", "p1")], TOKEN)
    assert _outside_base(upstream.seen) == [] and len(upstream.seen) == 1
    assert all(r["headers"].get("Authorization") == TOKEN for r in upstream.seen)


def test_a_paging_link_under_the_base_is_followed(upstream):
    upstream.server.next_link = f"{upstream.origin}/fhir/x/../Condition?page=2"
    source = FhirRestSource(f"{upstream.origin}/fhir", retries=0)
    result = source.search("Condition", [("patient", "p1")], TOKEN)
    assert len(upstream.seen) == 2 and upstream.seen[1]["path"] == "/fhir/Condition?page=2"
    assert len(result.resources) == 1  # the same Condition on both pages: kept once


# --- item 5: the remote reranker never follows a redirect with patient data -----------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_remote_reranker_does_not_follow_redirects(status):
    target = Recorder(lambda h: (200, {"Content-Type": "application/json"}, json.dumps(
        {"results": [{"index": 0, "relevance_score": 0.9}]}).encode()))
    redirector = Recorder(lambda h: (status, {"Location": f"{target.origin}/v1/rerank"}, b""))
    question, note = f"qcanary{uuid.uuid4().hex[:6]}", f"ncanary{uuid.uuid4().hex[:6]}"
    try:
        remote = RemoteReranker(redirector.origin, "m", api_key="k", retries=2, backoff=0)
        with pytest.raises(UpstreamError) as raised:
            remote.score(question, [f"Patient note: {note}"])
    finally:
        target.close()
        redirector.close()
    assert f"answered {status}" in str(raised.value) and "remote_url" in str(raised.value)
    assert target.seen == []  # nothing at all reached the other server
    assert len(redirector.seen) == 1 and note.encode() in redirector.seen[0]["body"]


# --- item 6: a malformed upstream header line puts no patient id into any log line ---------

class BrokenHeaderUpstream:
    """A raw-socket "FHIR server" whose every answer has a header line without a colon (urllib3
    then logs "Failed to parse headers (url=…)" at WARNING, with the request's query)."""

    def __init__(self, secret_header: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}/fhir"
        self.secret_header = secret_header
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(65536).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    continue
                self.requests.append(line)
                path = line.split(" ")[1] if " " in line else ""
                if "/Patient/" in path:
                    body = {"resourceType": "Patient", "id": path.rsplit("/", 1)[-1]}
                else:
                    body = {"resourceType": "Bundle", "type": "searchset", "entry": []}
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                             b"Connection: close\r\n" + self.secret_header.encode() +
                             b" broken header line\r\n\r\n" + json.dumps(body).encode())

    def close(self) -> None:
        self.sock.close()


def test_malformed_upstream_headers_leave_no_canary_in_the_logs(tmp_path):
    from test_phi_canary import ServeProcess

    from fixtures_jobs import settings_env

    tag = uuid.uuid4().hex[:6]
    canaries = {"pid": f"cnrypid{tag}", "code": f"cnrycode{tag}", "q": f"cnryq{tag}",
                "header": f"cnryheader{tag}"}
    upstream = BrokenHeaderUpstream(f"X-Note-{canaries['header']}")
    api = ServeProcess("api-broken-headers", settings_env(
        {"fhir_base_url": upstream.base, "reranker": "none", "fhir_retries": 0}), tmp_path)
    try:
        for url in (f"{api.base}/Condition?patient={canaries['pid']}&_content={canaries['q']}"
                    f"&code={canaries['code']}",
                    f"{api.base}/Patient/{canaries['pid']}/$rerank?query={canaries['q']}"):
            assert requests.get(url, timeout=30).status_code == 200
    finally:
        log = api.stop()
        upstream.close()
    assert any(canaries["pid"] in r for r in upstream.requests)  # the query did go upstream
    assert "Failed to parse headers" in log  # urllib3 met the broken header and said so
    leaked = [line for line in log.splitlines() if any(c in line for c in canaries.values())]
    assert leaked == [], leaked[:5]


def test_debug_logging_is_refused_without_log_phi_at_debug(tmp_path):
    import subprocess
    import sys
    import time

    from fixtures_jobs import REPO_ROOT, free_port, settings_env

    def serve(extra: dict) -> tuple[int | None, str]:
        """(exit code or None when it served /metadata, its output)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
        env.update(settings_env({"reranker": "none", **extra}), PYTHONPATH=str(REPO_ROOT))
        port, out = free_port(), tmp_path / f"serve{len(extra)}.log"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "adapter.cli", "--log-level", "DEBUG", "serve",
                 "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env,
                stdout=sink, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        if requests.get(f"http://127.0.0.1:{port}/fhir/metadata",
                                        timeout=2).status_code == 200:
                            break
                    except requests.RequestException:
                        time.sleep(0.2)
                code = proc.poll()
            finally:
                proc.terminate()
                proc.wait(15)
        return code, out.read_text(errors="replace")

    code, output = serve({})
    assert code == 2, output[-2000:]
    assert "log_phi_at_debug" in output and "--log-level INFO" in output
    code, output = serve({"log_phi_at_debug": True})
    assert code is None, output[-2000:]  # it served
    assert "DEBUG" in output and "log_phi_at_debug" not in output


@pytest.mark.parametrize("escape", ["..", "%2e%2e", "%2E%2e"])
def test_the_real_fhir_servers_admin_page_is_not_read_through_an_attachment(fhir, escape):
    """The Node test server (like the probe's target) reads `/fhir/%2e%2e/admin/requests` as
    `/admin/requests`, a page listing requests and their Authorization headers."""
    from adapter.fhir.flatten import flatten_documents

    tag = uuid.uuid4().hex[:8]
    resource = {"resourceType": "DocumentReference", "id": f"dots-{tag}", "status": "current",
                "content": [{"attachment": {"contentType": "application/json",
                                            "url": f"{fhir.base_url}/{escape}/admin/requests"}}]}
    source = FhirRestSource(fhir.base_url, retries=0)
    asked: list[Any] = []

    def loader(url: str) -> Any:
        asked.append(source.fetch_attachment(url, TOKEN))
        return asked[-1]

    docs, _ = flatten_documents([resource], ["x"], loader, validate=False)
    assert asked == [None]  # refused before any request
    assert "authorization" not in docs[0].text.lower() and TOKEN not in docs[0].text
    assert not any(r.get("authorization") == TOKEN for r in fhir.requests())
