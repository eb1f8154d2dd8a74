"""The rerank API (/rerank, /v1/rerank, /v2/rerank, /v1/models) over the real app, the tiny
Qwen3 checkpoint and in-process jobs: documented example requests, errors, limits, keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.rerank.base import ScoreOptions
from adapter.rerank.qwen3 import Qwen3Reranker

EXAMPLES = json.loads((Path(__file__).parent / "data" / "rerank_examples.json").read_text())
CASES = [k for k in EXAMPLES if not k.startswith("_")]


def app_settings(model: str, **extra):
    return load_settings({"reranker": "qwen3", "model": model, "models_allowed": [model],
                          "device": "cpu", "dtype": "float32", "max_length": 512, **extra},
                         env={})


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def client(model):
    yield create_app(app_settings(model)).test_client()


@pytest.fixture(scope="module")
def engine(model) -> Qwen3Reranker:
    return Qwen3Reranker(model, device="cpu", dtype="float32", max_length=512)


def texts_of(body):
    return [d if isinstance(d, str) else d["text"] for d in body["documents"]]


@pytest.mark.parametrize("case", CASES)
def test_documented_examples_get_the_engines_ranking(client, engine, model, case):
    route, body = EXAMPLES[case]["route"], dict(EXAMPLES[case]["body"], model=model)
    resp = client.post(route, json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    got = resp.get_json()
    options = ScoreOptions(max_chunks_per_doc=body.get("max_chunks_per_doc", 8),
                           overlap_tokens=body.get("overlap_tokens", 64))
    direct = engine.score(body["query"], texts_of(body), body.get("instruction"), options=options)
    order = sorted(range(len(direct.scores)), key=lambda i: (-direct.scores[i], i))
    top = order[:body.get("top_n") or len(order)]
    assert [r["index"] for r in got["results"]] == top
    assert [r["relevance_score"] for r in got["results"]] == \
        pytest.approx([direct.scores[i] for i in top], abs=1e-6)
    for r in got["results"]:
        assert ("document" in r) == bool(body.get("return_documents"))
        if "document" in r:
            assert r["document"]["text"] == texts_of(body)[r["index"]]
    assert got["model"] == model and got["id"]
    assert got["usage"] == {"prompt_tokens": direct.total_tokens,
                            "total_tokens": direct.total_tokens,
                            "cost_usd": pytest.approx(direct.total_tokens * 0.01 / 1e6)}
    assert got["meta"]["billed_units"]["input_tokens"] == direct.total_tokens
    assert got["meta"]["api_version"]["version"] == ("2" if route == "/v2/rerank" else "1")
    assert resp.headers["X-Usage-Tokens"] == str(direct.total_tokens)


def test_usage_reaches_the_metrics(client, model):
    from adapter.metrics import USAGE_TOKENS

    counter = USAGE_TOKENS.labels("rerank", "default")
    before = counter._value.get()
    resp = client.post("/v2/rerank", json={"model": model, "query": "q", "documents": ["a", "b"]})
    assert counter._value.get() - before == int(resp.headers["X-Usage-Tokens"]) > 0


def test_instruction_changes_the_scores(client, model):
    body = {"model": model, "query": "asthma", "documents": ["wheeze at night", "knee pain"]}
    plain = client.post("/v1/rerank", json=body).get_json()["results"]
    told = client.post("/v1/rerank", json={**body, "instruction": "Find orthopaedic notes"})
    assert told.status_code == 200
    assert {r["index"]: r["relevance_score"] for r in plain} != \
        pytest.approx({r["index"]: r["relevance_score"] for r in told.get_json()["results"]})


def error_of(resp, status, code):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.content_type.startswith("application/json")
    err = resp.get_json()["error"]
    assert err["code"] == code and err["type"] and err["message"]
    return err


@pytest.mark.parametrize("body,code,named", [
    ({"query": "q", "documents": ["a"], "return_document": True}, "unknown_field", "return_document"),
    ({"query": "  ", "documents": ["a"]}, "empty_query", "query"),
    ({"documents": ["a"]}, "empty_query", "query"),
    ({"query": "q", "documents": []}, "invalid_documents", "documents"),
    ({"query": "q", "documents": [{"title": "x"}]}, "invalid_documents", "documents[0]"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "invalid_value", "top_n"),
    ({"query": "q", "documents": ["a"], "model": "8B"}, "model_not_found", "8B"),
    ({"query": "q", "documents": ["a"] * 6}, "too_many_documents", "max_documents_per_call"),
])
def test_bad_requests_are_400_naming_the_field(model, body, code, named):
    limited = create_app(app_settings(model, max_documents_per_call=5)).test_client()
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        err = error_of(limited.post(route, json=body), 400, code)
        assert named in err["message"] and err["type"] == "invalid_request_error"


def test_not_json_wrong_method_and_too_many_tokens(model):
    c = create_app(app_settings(model, max_tokens_per_call=300)).test_client()
    error_of(c.post("/v1/rerank", data="not json", content_type="application/json"), 400,
             "invalid_json")
    error_of(c.get("/v1/rerank"), 405, "not_supported")
    err = error_of(c.post("/v1/rerank", json={"query": "q", "documents": ["a b c"] * 4}), 413,
                   "too_costly")
    assert "300" in err["message"]
    assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


def test_api_keys_guard_the_routes_but_not_fhir(model):
    c = create_app(app_settings(model, api_keys=["k1", "k2"])).test_client()
    body = {"query": "q", "documents": ["a"]}
    err = error_of(c.post("/v2/rerank", json=body), 401, "invalid_api_key")
    assert err["type"] == "authentication_error"
    error_of(c.post("/v2/rerank", json=body, headers={"Authorization": "Bearer nope"}), 401,
             "invalid_api_key")
    error_of(c.get("/v1/models"), 401, "invalid_api_key")
    assert c.post("/v2/rerank", json=body, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert c.get("/fhir/metadata").status_code == 200


def test_models_lists_the_allowed_tiers(tiny_model_dir):
    settings = load_settings({"reranker": "none", "model": "0.6B",
                              "models_allowed": ["0.6B", "Qwen/Qwen3-Reranker-4B"]}, env={})
    got = create_app(settings).test_client().get("/v1/models").get_json()
    assert [(m["id"], m["tier"]) for m in got["data"]] == [("0.6B", "0.6B"),
                                                          ("Qwen/Qwen3-Reranker-4B", "4B")]


def test_a_long_document_is_scored_whole_with_its_best_span(client, model):
    long_doc = "Routine follow-up, no complaints. " * 120 + "Acute asthma attack, nebulised. " * 3
    body = {"model": model, "query": "asthma attack", "documents": [long_doc, "knee pain"],
            "max_chunks_per_doc": 40, "overlap_tokens": 16}
    got = client.post("/v1/rerank", json=body).get_json()
    spans = {r["index"]: r.get("span") for r in got["results"]}
    assert spans[1] is None and spans[0]["chunks"] > 2
    assert 0 <= spans[0]["start"] < spans[0]["end"] <= len(long_doc)
    cut = client.post("/v1/rerank", json={**body, "max_chunks_per_doc": 1}).get_json()
    assert cut["meta"]["warnings"] and "cut" in cut["meta"]["warnings"][0]
