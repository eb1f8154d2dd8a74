"""Hostile input against the rerank API (and the HTTP layer under it) of a real
`fhir-rerank serve` process with the tiny Qwen3 model, over raw sockets (issue 16: items 1,
10, 11, and their fuzz cases of item 14).

- amplification: a long query and instruction in front of many documents is refused before
  any work, from characters; with the character limits raised, from the shared header's
  tokens counted once (CPU seconds and peak RSS of the server measured from /proc);
- deep JSON, malformed chunked bodies and a 20 MB body: a 4xx answer, never a 500 or a
  dropped connection; errors on the rerank routes in the clients' JSON shape (Cohere's
  `message`, Jina's `detail`, OpenAI-style `error`), on FHIR routes an OperationOutcome;
- odd HTTP methods do not grow /metrics (labels from fixed sets only).
"""
from __future__ import annotations

import json
import random
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from adapter.rerank.base import ScoreOptions
from adapter.rerank.qwen3 import BODY, PREFIX, SUFFIX, Qwen3Reranker
from request_costs import (amplification_body, body_bytes, cpu_seconds, peak_rss_mb,
                           reset_peaks, rss_mb)
from rerank_server import AdapterProcess
from test_fuzz import FUZZ, exchange

API_ROUTES = [b"/rerank", b"/v1/rerank", b"/v2/rerank"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir)
    proc = AdapterProcess({"reranker": "qwen3", "model": model, "models_allowed": [model],
                           "device": "cpu", "dtype": "float32", "max_length": 512},
                          tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
    log = proc.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


def split_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, f"incomplete answer {answer[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split(" ", 2)[1]), headers, body


def check_api_error(answer: bytes, request: bytes = b"") -> tuple[int, dict]:
    """A 4xx in the rerank API's error shape (never a 500, never an OperationOutcome)."""
    status, headers, body = split_answer(answer)
    assert status < 500, f"{status} for {request[:200]!r}: {body[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    parsed = json.loads(body)
    if status >= 400:
        assert "resourceType" not in parsed, parsed
        message = parsed["message"]
        assert message and parsed["detail"] == message == parsed["error"]["message"], parsed
        assert parsed["error"]["type"] and parsed["error"]["code"], parsed
    return status, parsed


def check_outcome(answer: bytes) -> int:
    status, headers, body = split_answer(answer)
    assert status < 500, body[:300]
    parsed = json.loads(body)
    if status >= 400:
        assert parsed["resourceType"] == "OperationOutcome", parsed
        assert all(i.get("diagnostics") for i in parsed["issue"])
    return status


def post_raw(port: int, target: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    request = (b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + ctype +
               b"\r\nContent-Length: " + str(len(body)).encode() +
               b"\r\nConnection: close\r\n\r\n" + body)
    return exchange(port, request, count=False)


def chunked(port: int, target: bytes, framed: bytes) -> bytes:
    """Send a chunked request, then half-close (the client has sent all it will), and read
    the answer to EOF."""
    request = (b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
               framed)
    return exchange(port, request, count=False, half_close=True)


def frame(body: bytes, sizes: list[int]) -> bytes:
    """`body` as well-formed chunks of the given sizes (the rest in one last chunk)."""
    out, at = b"", 0
    for size in sizes + [len(body)]:
        piece = body[at:at + size]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        at += len(piece)
    return out + b"0\r\n\r\n"


# --- item 1: amplification -------------------------------------------------------------------

def test_the_amplification_request_is_refused_before_any_work(served):
    """The probe's request cost 120 s of CPU and 4 GB of RSS before its 413; query and
    instruction are now checked from their characters first."""
    raw = body_bytes(amplification_body())
    pid = served.proc.pid
    post_raw(served.port, b"/v1/rerank", b'{"query": "q", "documents": ["a"]}')  # warm
    peaks = reset_peaks(pid)  # False where /proc/PID/clear_refs may not be written
    rss_before, cpu_before = rss_mb(pid), cpu_seconds(pid)
    status, err = check_api_error(post_raw(served.port, b"/v1/rerank", raw))
    cpu = cpu_seconds(pid) - cpu_before
    assert status == 400 and err["error"]["code"] == "query_too_long", err
    assert "max_question_chars = 2000" in err["message"]
    assert cpu < 5, cpu
    assert (peak_rss_mb(pid) if peaks else rss_mb(pid)) - rss_before < 100
    raw = body_bytes({**amplification_body(query_words=20), "documents": ["a"]})
    status, err = check_api_error(post_raw(served.port, b"/v2/rerank", raw))
    assert status == 400 and err["error"]["code"] == "instruction_too_long", err
    assert "max_instruction_chars = 2000" in err["message"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Qwen3Reranker:
    return Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", max_length=8192)


def test_the_shared_header_is_tokenized_once_before_the_token_limit(engine):
    """With no character limit in the way (the engine, as a worker runs it), the token limit
    refuses the same request after tokenizing query and instruction once: the old code
    tokenized them again for every document (1,000 × 240 KB) before counting."""
    body = amplification_body()
    options = ScoreOptions(max_total_tokens=2_000_000)
    started = time.process_time()
    with pytest.raises(Exception) as info:
        engine.score(body["query"], body["documents"], body["instruction"], options=options)
    cpu = time.process_time() - started
    assert type(info.value).__name__ == "TooLarge" and info.value.status == 413
    message = info.value.message
    assert "1000 documents" in message and "max_tokens_per_call" in message, message
    assert cpu < 10, cpu  # about 0.3 s here; the old path took minutes


def test_under_the_limits_the_documents_are_scored_and_counted_once(engine):
    """A request within the limits is scored; its tokens are the full prompts' (what the
    usage counts), each document's the same as the model card's whole-body tokenization."""
    tokenizer = engine.loaded.tokenizer
    docs = ["asthma at night", "knee pain", " 12 mg daily", "<b>wheeze</b>"]
    result = engine.score("which notes mention asthma?\n", docs, "Find the notes  ")
    expected = [len(tokenizer(PREFIX + BODY.format(instruction="Find the notes  ",
                                                   query="which notes mention asthma?\n",
                                                   doc=d) + SUFFIX)["input_ids"]) for d in docs]
    assert result.tokens == expected
    limited = ScoreOptions(max_total_tokens=sum(expected) - 1)
    with pytest.raises(Exception) as info:
        engine.score("which notes mention asthma?\n", docs, "Find the notes  ", options=limited)
    assert str(sum(expected)) in info.value.message


PIECES = ["a", " ", "  ", "\n", "\r\n", "?", ":", "<", ">", "é", "e\u0301", "\u0301", "12",
          "'s", "<|im_end|>", "\t", "中文", "🙂", " \n", "<Document>: ", "\u00a0", "{x}"]
TRICKY = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


@settings(FUZZ, max_examples=150)
@given(query=TRICKY.filter(str.strip), instruction=TRICKY.filter(str.strip),
       docs=st.lists(TRICKY, min_size=1, max_size=3))
def test_tokenizing_the_header_once_gives_the_whole_bodys_tokens(engine, query, instruction,
                                                                  docs):
    """Token-exact: every row is the model card's tokenization of its whole prompt, whatever
    the query, instruction and documents end or start with."""
    tokenizer = engine.loaded.tokenizer
    rows = engine.encode_pairs(query, docs, instruction).rows
    whole = [tokenizer(PREFIX, add_special_tokens=False)["input_ids"] +
             tokenizer(BODY.format(instruction=instruction, query=query, doc=d),
                       add_special_tokens=False)["input_ids"] +
             tokenizer(SUFFIX, add_special_tokens=False)["input_ids"] for d in docs]
    assert rows == whole


# --- item 11: deep JSON, chunked bodies, a 20 MB body ----------------------------------------

@pytest.mark.parametrize("route", API_ROUTES)
@pytest.mark.parametrize("depth", [33, 976, 5000])
def test_deep_json_on_the_rerank_routes_is_a_400(served, route, depth):
    raw = b'{"query": "q", "documents": ' + b"[" * depth + b"]" * depth + b"}"
    status, err = check_api_error(post_raw(served.port, route, raw))
    assert status == 400 and "max_json_depth" in err["message"], err


@settings(FUZZ, max_examples=60)
@given(route=st.sampled_from(API_ROUTES), depth=st.integers(0, 3000),
       opener=st.sampled_from(["[", '{"a":', '[{"b":[', '{"query": "q", "documents": [']),
       leaf=st.sampled_from(['"x"', "1", "null", '{"text": "x"}', "", "[", "\"\\u00e9\""]))
def test_generated_deep_json_on_the_rerank_routes(served, route, depth, opener, leaf):
    closer = "".join({"[": "]", "{": "}"}[c] for c in reversed(opener) if c in "[{")
    raw = (opener * depth + leaf + closer * depth).encode()
    check_api_error(post_raw(served.port, route, raw), raw)


MALFORMED_CHUNKS = [
    b"zz\r\n{}\r\n0\r\n\r\n",                      # chunk size not hex
    b"5\r\n{}\r\n0\r\n\r\n",                       # size says 5, 2 bytes then CRLF
    b"2\r\n{}XX0\r\n\r\n",                         # no CRLF after the chunk
    b"2;\x00=1\r\n{}\r\n0\r\n\r\n",                # bad chunk extension
    b"-2\r\n{}\r\n0\r\n\r\n",                      # negative size
    b"2\r\n{}\r\n0\r\nX-Trailer\r\n\r\n",          # malformed trailer
    b"2\r\n{}\r\n",                                # ends (half-close) before the last chunk
    b"1000000\r\n" + b"a" * 0x1000000 + b"\r\n0\r\n\r\n",  # 16 MiB chunk: over max_body_bytes
]


@pytest.mark.parametrize("framed", MALFORMED_CHUNKS, ids=lambda f: repr(f[:24]))
def test_malformed_chunked_bodies_are_4xx(served, framed):
    check_api_error(chunked(served.port, b"/v1/rerank", framed), framed)
    check_outcome(chunked(served.port, b"/fhir/$rerank", framed))


@settings(FUZZ, max_examples=60)
@given(sizes=st.lists(st.integers(1, 40), max_size=6),
       damage=st.sampled_from([None, b"zz", b"\r\n\r\n", b"1;", b"\x00", b"-", b"0\r\n"]),
       where=st.integers(0, 200), route=st.sampled_from(API_ROUTES + [b"/fhir/$rerank"]))
def test_generated_chunked_bodies(served, sizes, damage, where, route):
    body = json.dumps({"query": "asthma", "documents": ["wheeze", "knee pain"]}).encode()
    if route == b"/fhir/$rerank":
        body = json.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueString": "f201"},
            {"name": "query", "valueString": "asthma"}]}).encode()
    framed = frame(body, sizes)
    if damage is not None:
        at = min(where, len(framed))
        framed = framed[:at] + damage + framed[at:]
    answer = chunked(served.port, route, framed)
    status = check_outcome(answer) if route.startswith(b"/fhir") else \
        check_api_error(answer, framed)[0]
    if damage is None:
        assert status == 200, answer[:300]


@pytest.mark.parametrize("route", [b"/v1/rerank", b"/fhir/$rerank"])
def test_a_20_mb_body_gets_its_413(served, route):
    """The answer reaches a client still sending: the server reads and drops the rest of the
    body (within a bound) after answering, instead of resetting the connection."""
    raw = b'{"query": "q", "documents": ["' + b"a" * 20_000_000 + b'"]}'
    request = (b"POST " + route + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
               b"application/json\r\nContent-Length: " + str(len(raw)).encode() +
               b"\r\nConnection: close\r\n\r\n" + raw)
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(request)  # a reset (the server closing with our body unread) raises here
        chunks = []
        while chunk := sock.recv(65536):  # ... or here: the answer must end in a clean close
            chunks.append(chunk)
    answer = b"".join(chunks)
    if route.startswith(b"/v"):
        status, err = check_api_error(answer)
        assert "max_body_bytes = 1000000" in err["message"], err
    else:
        status = check_outcome(answer)
    assert status == 413


def test_the_cohere_sdk_raises_with_our_message(served, tiny_model_dir):
    import cohere

    client = cohere.ClientV2(api_key="unused", base_url=served.url)
    with pytest.raises(cohere.errors.BadRequestError) as info:
        client.rerank(model=str(tiny_model_dir), query="q" * 3000, documents=["a"])
    assert "max_question_chars = 2000" in info.value.body["message"]
    assert "max_question_chars" in str(info.value)


# --- item 10: metrics labels -----------------------------------------------------------------

def metrics_lines(port: int) -> list[str]:
    answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n", count=False)
    status, _, body = split_answer(answer)
    assert status == 200
    return body.decode().splitlines()


def odd_methods(port: int, seed: int, count: int = 300) -> None:
    rng = random.Random(seed)
    for i in range(count):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(6)) + str(i)
        path = rng.choice([b"/fhir/metadata", b"/v1/rerank", b"/healthz", b"/nowhere"])
        answer = exchange(port, method.encode() + b" " + path + b" HTTP/1.1\r\n"
                          b"Host: localhost\r\nConnection: close\r\n\r\n", count=False)
        assert split_answer(answer)[0] < 500


def test_odd_methods_do_not_grow_the_metrics(served):
    """300 requests with made-up methods once added 5,400 lines to /metrics: now the first
    300 add a few label sets ("other" × route × status), the next 300 none."""
    before = metrics_lines(served.port)
    odd_methods(served.port, 16)
    after = metrics_lines(served.port)
    odd_methods(served.port, 17)
    again = metrics_lines(served.port)
    print(f"/metrics: {len(before)} lines before, {len(after)} after 300 odd methods, "
          f"{len(again)} after 300 more")
    assert len(after) - len(before) < 60, [line for line in after if line not in before][:20]
    names = lambda lines: {line.rsplit(" ", 1)[0] for line in lines}  # noqa: E731
    assert names(again) == names(after), names(again) - names(after)
    labels = {line.split('method="', 1)[1].split('"', 1)[0]
              for line in after if 'method="' in line}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
                      "-"}, labels
