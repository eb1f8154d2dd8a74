"""`reranker = remote` against a second adapter process serving the tiny model: the same
scores as the local engine, documents split across calls, usage read back, 429 then success."""
from __future__ import annotations

import http.server
import threading

import pytest
import requests

from adapter.config import load_settings
from adapter.errors import UpstreamThrottled
from adapter.runtime import Runtime
from adapter.rerank.qwen3 import Qwen3Reranker
from adapter.rerank.remote import RemoteReranker
from fixtures_jobs import free_port
from rerank_server import AdapterProcess

QUERY = "chest pain on exertion"
DOCS = ["Stable angina, exertional chest pain", "Ankle sprain", "", "Troponin negative",
        "Chest pain at rest, ECG normal", "Gastro-oesophageal reflux", "胸痛 2 天"]


@pytest.fixture(scope="module")
def second(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir)
    proc = AdapterProcess({"reranker": "qwen3", "model": model, "models_allowed": [model],
                           "device": "cpu", "dtype": "float32", "max_length": 512},
                          tmp_path_factory.mktemp("remote") / "serve.log")
    try:
        proc.wait_ready()
        yield proc, model
    finally:
        proc.stop()


def test_scores_equal_the_local_engine_split_across_calls(second, tiny_model_dir):
    proc, model = second
    local = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32",
                          max_length=512).score(QUERY, DOCS)
    remote = RemoteReranker(proc.url, model, max_documents=3)
    got = remote.score(QUERY, DOCS)
    assert max(abs(a - b) for a, b in zip(got.scores, local.scores)) <= 1e-6
    assert got.total_tokens == local.total_tokens  # usage read back, 3 calls
    assert got.empty_docs == [2] and got.model == model
    told = remote.score(QUERY, DOCS[:2], instruction="Find injuries")
    local_told = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32",
                               max_length=512).score(QUERY, DOCS[:2], "Find injuries")
    assert told.scores == pytest.approx(local_told.scores, abs=1e-6)


class _Throttle(http.server.BaseHTTPRequestHandler):
    """Answers the first `throttles` POSTs 429, then forwards to the real server."""

    target = ""
    throttles = 1
    seen: list[int] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if len(self.seen) < type(self).throttles:
            self.seen.append(429)
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "slow down", "type": "rate_limit_error", '
                             b'"code": "rate_limited"}}')
            return
        resp = requests.post(self.target + self.path, data=body,
                             headers={"Content-Type": "application/json"}, timeout=60)
        self.seen.append(resp.status_code)
        self.send_response(resp.status_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(resp.content)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def throttling(second):
    proc, model = second
    handler = type("Throttle", (_Throttle,), {"target": proc.url, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler, model
    server.shutdown()


def test_429_then_success(throttling, tiny_model_dir):
    url, handler, model = throttling
    local = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32",
                          max_length=512).score(QUERY, DOCS)
    got = RemoteReranker(url, model, backoff=0.01).score(QUERY, DOCS)
    assert handler.seen == [429, 200]
    assert max(abs(a - b) for a, b in zip(got.scores, local.scores)) <= 1e-6


def test_throttled_past_the_retries_is_a_named_error(throttling):
    url, handler, model = throttling
    handler.throttles = 10
    with pytest.raises(UpstreamThrottled, match="slow down"):
        RemoteReranker(url, model, retries=2, backoff=0.01).score(QUERY, DOCS)
    assert handler.seen == [429, 429, 429]


def test_the_backend_from_settings_with_the_key_from_the_environment(second, monkeypatch):
    proc, model = second
    monkeypatch.setenv("MY_RERANK_KEY", "secret-1")
    settings = load_settings({"reranker": "remote", "remote_url": proc.url, "model": model,
                              "remote_api_key_env": "MY_RERANK_KEY",
                              "remote_max_documents": 2}, env={})
    reranker = Runtime(settings).reranker()
    assert isinstance(reranker, RemoteReranker) and reranker.max_documents == 2
    assert reranker.session.headers["Authorization"] == "Bearer secret-1"
    assert len(reranker.score(QUERY, DOCS[:3]).scores) == 3
    with pytest.raises(ValueError, match="remote_url"):
        Runtime(load_settings({"reranker": "remote"}, env={})).reranker()
