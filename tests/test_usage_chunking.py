"""One ScoreResult per call: exact token usage, cost per tier, long notes scored as chunks,
and the FHIR answer carrying usage headers, the scoring model and the best passage."""
from __future__ import annotations

import json
import random
import time

import pytest
from transformers import AutoTokenizer

from adapter import create_app
from adapter.config import load_settings
from adapter.rerank.base import ScoreOptions, ScoreResult
from adapter.rerank.keyword import KeywordReranker
from adapter.rerank.qwen3 import BODY, PREFIX, SUFFIX, Qwen3Reranker
from adapter.rerank.usage import format_usd, price_per_million, tier_of, usage_from_bundle, usage_of

QUERY = "shortness of breath"
WORDS = "dyspnoea wheeze inhaler salbutamol fever 38.5 血糖 диабет naïve 🩺 BP 140/90 on exertion".split()


def note(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Qwen3Reranker:
    return Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512,
                         options=ScoreOptions(max_chunks_per_doc=200, overlap_tokens=32))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_tokens_are_the_tokenizers_count_of_the_full_prompts(engine, tokenizer):
    docs = ["Asthma, mild intermittent", "", note(1, 60), "血糖 7.8 mmol/L"]
    result = engine.score(QUERY, docs, instruction="Find the breathing problems")
    expected = [len(tokenizer(PREFIX + BODY.format(instruction="Find the breathing problems",
                                                   query=QUERY, doc=d) + SUFFIX)["input_ids"])
                for d in docs]
    assert result.tokens == expected and result.total_tokens == sum(expected)
    assert result.spans == [None] * 4 and result.chunks == [1] * 4
    assert result.keyword_reason is None and result.model == engine.model_name


def test_cost_per_tier_and_the_price_table():
    settings = load_settings({"model_queues": ["/models/mine=4B"]}, env={})
    million = ScoreResult([0.5], tokens=[1_000_000])
    for model, tier, usd in [("0.6B", "0.6B", 0.01), ("Qwen/Qwen3-Reranker-4B", "4B", 0.02),
                             ("8b", "8B", 0.04), ("/models/mine", "4B", 0.02),
                             ("/some/dir", "default", 0.01)]:
        assert tier_of(settings, model) == tier
        usage = usage_of(million, settings, model)
        assert usage.cost_usd == pytest.approx(usd) and usage.tokens == 1_000_000
    small = usage_of(ScoreResult([0.1, 0.2], tokens=[1234, 766]), settings, "8B")
    assert small.headers() == {"X-Usage-Tokens": "2000", "X-Usage-Cost-USD": "0.00008"}
    custom = load_settings({"prices_per_million_tokens": ["0.6B=1.5", "/x=3"]}, env={})
    assert price_per_million(custom, "0.6B") == 1.5 and price_per_million(custom, "/x") == 3
    assert price_per_million(custom, "4B") == 0.0  # no entry and no default: free
    with pytest.raises(ValueError, match="not name=USD"):
        price_per_million(load_settings({"prices_per_million_tokens": ["cheap"]}, env={}), "4B")
    assert format_usd(0.0) == "0" and format_usd(1.25e-7) == "0.000000125"


def test_keyword_order_says_why_and_costs_nothing():
    configured = KeywordReranker().score(QUERY, ["breath short", "knee"])
    assert configured.keyword_reason == "reranker = none" and not configured.fallback
    fallback = KeywordReranker("model missing").score(QUERY, ["breath"])
    assert fallback.fallback and fallback.keyword_reason == "model missing"
    assert configured.total_tokens == 0


def test_a_40k_token_note_is_covered_by_chunks_and_the_best_chunk_wins(engine, tokenizer):
    long_note = note(7, 16000)
    header = BODY.format(instruction=engine.instruction, query=QUERY, doc="")
    body_ids = tokenizer(header + long_note)["input_ids"]
    assert len(body_ids) > 40000
    plan = engine.encode_pairs(QUERY, [long_note, "short note"])
    rows = [r for r, o in zip(plan.rows, plan.owner) if o == 0]
    assert plan.chunks[0] == len(rows) > 80 and plan.truncated_docs == 0
    assert all(len(r) <= engine.max_length for r in plan.rows)
    # every document token is in some chunk, in order, and neighbours overlap by 32 tokens
    head = len(engine.loaded.prefix_ids)
    tail = len(engine.loaded.suffix_ids)
    fixed = len(tokenizer(header)["input_ids"])
    pieces = [r[head:len(r) - tail] for r in rows]
    split = next(k for k in range(len(body_ids)) if body_ids[k] != pieces[0][k]) \
        if pieces[0] != body_ids[:len(pieces[0])] else len(pieces[0])
    assert split == len(pieces[0])  # chunk 0 is the start of the body exactly
    heads = {tuple(p[:fixed - 1]) for p in pieces}
    assert len(heads) == 1  # the same header tokens in front of every chunk
    n_head = next(k for k in range(len(pieces[0])) if pieces[0][k] != pieces[1][k])
    rebuilt = list(pieces[0])
    for p in pieces[1:]:
        assert p[n_head:n_head + 32] == rebuilt[-32:]
        rebuilt += p[n_head + 32:]
    assert rebuilt == body_ids
    # the document's score is its best chunk's, and its span is that chunk's
    result = engine.score(QUERY, [long_note, "short note"])
    with engine.loaded.lock:
        each = [engine._score_sequences([r], None)[0] for r in rows]
    best = max(range(len(each)), key=lambda i: each[i])
    assert result.scores[0] == pytest.approx(each[best], abs=1e-6)
    spans = [s for s, o in zip(plan.spans, plan.owner) if o == 0]
    assert result.spans[0] == spans[best] and result.spans[1] is None
    start, end = spans[best]
    assert 0 <= start < end <= len(long_note)
    assert spans[0][0] == 0 and spans[-1][1] == len(long_note)
    assert result.tokens[0] == sum(len(r) for r in rows)


def test_chunk_cap_and_truncate_option_cut_with_a_count(engine, tokenizer):
    text = note(3, 2000)
    capped = engine.score(QUERY, [text], options=ScoreOptions(max_chunks_per_doc=2,
                                                              overlap_tokens=32))
    assert capped.chunks == [2] and capped.truncated_docs == 1 and capped.truncated_tokens > 0
    cut = engine.score(QUERY, [text], options=ScoreOptions(long_documents="truncate"))
    assert cut.chunks == [1] and cut.tokens == [engine.max_length] and cut.truncated_docs == 1
    assert cut.spans[0][0] == 0 and cut.spans[0][1] < len(text)
    few = engine.score(QUERY, [text], options=ScoreOptions(max_tokens_per_doc=10))
    assert few.truncated_docs == 1 and few.chunks == [1] and few.tokens[0] < 200


def test_fhir_search_carries_usage_model_and_best_passage(tmp_path, tiny_model_dir):
    long_text = "Chest clear. " * 150 + "Severe shortness of breath on exertion. " + "Well. " * 150
    docs = [{"resource": {"resourceType": "Condition", "id": "long",
                          "subject": {"reference": "Patient/p1"}, "code": {"text": long_text}}},
            {"resource": {"resourceType": "Condition", "id": "short",
                          "subject": {"reference": "Patient/p1"}, "code": {"text": "Asthma"}}}]
    (tmp_path / "b.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                 "entry": docs}))
    settings = load_settings({"fhir_data": str(tmp_path), "reranker": "qwen3",
                              "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
                              "max_length": 256, "max_chunks_per_doc": 50,
                              "models_allowed": [str(tiny_model_dir)]}, env={})
    client = create_app(settings).test_client()
    resp = client.get("/fhir/Condition?patient=p1&_content=breathless")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    bundle = resp.get_json()
    usage = usage_from_bundle(bundle)
    assert usage is not None and usage.model == str(tiny_model_dir) and usage.tier == "default"
    assert resp.headers["X-Usage-Tokens"] == str(usage.tokens) and usage.tokens > 256 * 3
    assert float(resp.headers["X-Usage-Cost-USD"]) == pytest.approx(usage.tokens * 0.01 / 1e6)
    entries = {e["resource"]["id"]: e for e in bundle["entry"] if e["search"]["mode"] == "match"}
    ext = entries["long"]["search"]["extension"][0]
    start, end = (p["valueInteger"] for p in ext["extension"])
    assert ext["url"].endswith("best-passage") and 0 <= start < end
    assert "extension" not in entries["short"]["search"]
    notes = [i["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
             for i in e["resource"]["issue"]]
    assert any("scored as overlapping chunks" in n for n in notes)


def test_async_final_answer_carries_usage_headers(tmp_path):
    docs = [{"resource": {"resourceType": "Condition", "id": f"c{i}",
                          "subject": {"reference": "Patient/p1"}, "code": {"text": text}}}
            for i, text in enumerate(["asthma", "knee pain", "asthma review"])]
    (tmp_path / "b.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                 "entry": docs}))
    settings = load_settings({"fhir_data": str(tmp_path), "reranker": "none"}, env={})
    client = create_app(settings).test_client()
    accepted = client.get("/fhir/Condition?patient=p1&_content=asthma",
                          headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    poll = accepted.headers["Content-Location"].split("/fhir", 1)[1]
    deadline = time.monotonic() + 30  # polled, as a client would, not counted in tries
    while (resp := client.get("/fhir" + poll)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert resp.status_code == 200
    assert resp.headers["X-Usage-Tokens"] == "0" and resp.headers["X-Usage-Cost-USD"] == "0"
    usage = usage_from_bundle(resp.get_json())
    assert (usage.model, usage.tokens) == ("bm25", 0)
