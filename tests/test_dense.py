"""Dense recall: the Qwen3-Embedding engine against a port of the model card, RRF fusion on
hand-made rankings, the hybrid first stage, its cache, and absent weights."""
from __future__ import annotations

import logging
import random

import pytest
import torch

from adapter.config import load_settings
from adapter.models import Document
from adapter.search.dense import Qwen3Embedder, load_embedding_model
from adapter.search.fusion import reciprocal_rank_fusion
from adapter.runtime import Runtime
from adapter.search.hybrid import first_stage
from oracle_embedding import card_embeddings, load_card_model

TASK = "Given a clinician's question, find the record entries that answer it"
QUERIES = ["LDL cholesterol", "glucosa en sangre", "Blutdruck zu hoch", "肾功能", "BUN"]
MICAH = "720b9118-3153-40c8-b162-cd963506be0e"


def random_documents(seed: int, count: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    words = ["Low", "Density", "Lipoprotein", "Cholesterol", "mg/dL", "Urea", "Nitrogen",
             "Hämoglobin", "presión", "arterial", "血压", "Observation", "final", "2019-03-02",
             "Alanine", "aminotransferase", "12.5", "Hypertension", "(disorder)"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, max_words)))
            for _ in range(count)]


def engine(path, max_length=8192, batch_tokens=16384) -> Qwen3Embedder:
    loaded = load_embedding_model(str(path), "cpu", torch.float32)
    return Qwen3Embedder(loaded, task=TASK, max_length=max_length, batch_tokens=batch_tokens)


def test_tiny_embedding_checkpoint_is_a_qwen3_model_with_the_real_tokenizer(tiny_embedding_dir):
    from transformers import Qwen3Model

    tokenizer, model = load_card_model(str(tiny_embedding_dir))  # AutoTokenizer, AutoModel
    assert isinstance(model, Qwen3Model)
    # like the released Qwen3-Embedding tokenizers: "test" → [1944, <|endoftext|>], left padded
    assert tokenizer(["test", "test again"], padding=True)["input_ids"] == [
        [151643, 1944, 151643], [1944, 1549, 151643]]
    assert tokenizer("Hello, world!")["input_ids"][:-1] == [9707, 11, 1879, 0]


@pytest.mark.parametrize("seed,max_length,batch_tokens", [(0, 8192, 16384), (1, 24, 64),
                                                          (2, 8192, 40)])
def test_engine_matches_the_model_card_within_1e_5(tiny_embedding_dir, seed, max_length,
                                                   batch_tokens):
    docs = random_documents(seed, 13, 40) + [""]
    card_q, card_d, card_scores = card_embeddings(str(tiny_embedding_dir), QUERIES, docs, TASK,
                                                  max_length=max_length)
    ours = engine(tiny_embedding_dir, max_length, batch_tokens)
    q, d = ours.embed_queries(QUERIES), ours.embed(docs)
    assert torch.allclose(q, card_q, atol=1e-5, rtol=0)
    assert torch.allclose(d, card_d, atol=1e-5, rtol=0)
    assert torch.allclose(q @ d.T, card_scores, atol=1e-5, rtol=0)
    assert torch.allclose(d.norm(dim=1), torch.ones(len(docs)), atol=1e-5)


@pytest.mark.parametrize("variant", ["no instruction", "first token", "mean pooling"])
def test_comparison_catches_recipe_mistakes(tiny_embedding_dir, variant):
    docs = random_documents(5, 6, 30)
    card_q, card_d, _ = card_embeddings(str(tiny_embedding_dir), QUERIES, docs, TASK)
    ours = engine(tiny_embedding_dir)
    if variant == "no instruction":
        wrong, right = ours.embed(QUERIES), card_q
    else:
        tok = ours.loaded.tokenizer
        batch = tok(docs, padding=True, return_tensors="pt")
        with torch.no_grad():
            states = ours.loaded.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = states[:, 0] if variant == "first token" else (states * mask).sum(1) / mask.sum(1)
        wrong, right = torch.nn.functional.normalize(pooled, dim=1), card_d
    assert (wrong - right).abs().max().item() > 1e-3


@pytest.mark.parametrize("rankings,k,expected", [
    # a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63
    ([["a", "b", "c"], ["c", "a", "d"]], 60, ["a", "c", "b", "d"]),
    # equal fused scores fall back to the tiebreak (the item itself)
    ([["y", "x"], ["x", "y"]], 60, ["x", "y"]),
    # k = 0: rank 1 in one list (1.0) beats ranks 2 and 2 (0.5 + 0.5 = 1.0 → tie → id), and 3
    ([["p", "q", "r"], ["r", "q", "p"], ["q"]], 0, ["q", "p", "r"]),
    # a document counts once per ranking, at its best rank
    ([["a", "a", "b"]], 60, ["a", "b"]),
])
def test_reciprocal_rank_fusion_on_hand_made_rankings(rankings, k, expected):
    fused = reciprocal_rank_fusion(rankings, k=k)
    assert [item for item, _ in fused] == expected


def test_rrf_scores_are_the_sums_of_reciprocal_ranks():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]]))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["d"] == pytest.approx(1 / 63)
    with pytest.raises(ValueError, match="rrf k"):
        reciprocal_rank_fusion([["a"]], k=-1)


def _docs(texts: list[str], version: str = "1") -> list[Document]:
    return [Document(f"Observation/o{i}", "Observation", text,
                     {"resourceType": "Observation", "id": f"o{i}",
                      "meta": {"versionId": version}}, f"http://x/Observation/o{i}")
            for i, text in enumerate(texts)]


@pytest.fixture()
def dense_settings(tiny_embedding_dir):
    return load_settings({"embedder": str(tiny_embedding_dir), "device": "cpu",
                          "dtype": "float32", "embedder_instruction": TASK}, env={})


@pytest.fixture()
def runtime(dense_settings):
    """A fresh runtime: its own embedder and an empty document-vector cache."""
    return Runtime(dense_settings)


def test_first_stage_fuses_keyword_and_dense_rankings(dense_settings, runtime):
    texts = random_documents(7, 12, 12) + ["potassium serum 4.1 mmol/L"]
    docs = _docs(texts)
    dense_order = [docs[i].id for i, _ in runtime.embedder().rank("potassium", docs)]
    candidates, matched, outcomes = first_stage("potassium", docs, 5, dense_settings,
                                                runtime=runtime)
    ids = [d.id for d, _, _ in candidates]
    # only the last document has the word: it is in both rankings, so it leads; the rest are
    # the dense ranking's order (each only in that ranking), cut to k = 5
    assert outcomes == [] and len(ids) == 5 and matched == 1
    assert ids[0] == "Observation/o12"
    assert ids[1:] == [i for i in dense_order if i != "Observation/o12"][:4]
    # each candidate keeps its BM25 score and match flag (keyword order and outcomes use them)
    assert candidates[0][1] > 0 and candidates[0][2] is True
    assert all(score == 0 and not holds for _, score, holds in candidates[1:])
    keyword_only = first_stage("potassium", docs, 5, load_settings({}, env={}))[0]
    assert [d.id for d, _, _ in keyword_only][1:] != ids[1:]  # BM25 alone: the rest by id


def test_dense_ranking_is_skipped_when_every_document_is_reranked_anyway(dense_settings,
                                                                         runtime):
    docs = _docs(["potassium serum", "sodium", "glucose"])
    vectors = runtime.caches.vectors
    unordered = first_stage("potassium", docs, 5, dense_settings, ordered=False,
                            runtime=runtime)[0]
    assert len(vectors) == 0  # nothing embedded: all three are candidates anyway
    assert [d.id for d, _, _ in unordered] == ["Observation/o0", "Observation/o1",
                                               "Observation/o2"]
    ordered = first_stage("potassium", docs, 5, dense_settings, runtime=runtime)[0]
    assert len(vectors) == 3 and {d.id for d, _, _ in ordered} == {d.id for d in docs}


def test_document_vectors_are_cached_per_resource_version(runtime):
    embedder = runtime.embedder()
    vectors = runtime.caches.vectors
    docs = _docs(["alpha beta", "gamma delta"])
    first = embedder.document_vectors(docs)
    assert len(vectors) == 2
    again = embedder.document_vectors(docs)
    assert len(vectors) == 2 and torch.equal(first, again)
    embedder.document_vectors(_docs(["alpha beta changed", "gamma delta"], version="2"))
    assert len(vectors) == 4
    # Another runtime (another app) shares neither the vectors nor the loaded model.
    other = Runtime(runtime.settings)
    other.embedder().document_vectors(docs)
    assert len(other.caches.vectors) == 2 and len(vectors) == 4
    assert other.embedder().loaded is not embedder.loaded


def test_absent_embedding_weights_mean_keyword_recall_and_a_warning(tmp_path, caplog):
    settings = load_settings({"embedder": str(tmp_path / "no-such-model")}, env={})
    docs = _docs(["potassium serum", "sodium serum", "glucose"])
    runtime = Runtime(settings)
    with caplog.at_level(logging.WARNING, logger="adapter.search.hybrid"):
        for _ in range(3):
            candidates, _, outcomes = first_stage("potassium", docs, 2, settings,
                                                  runtime=runtime)
    assert [d.id for d, _, _ in candidates] == ["Observation/o0", "Observation/o1"]
    assert len(outcomes) == 1 and outcomes[0].severity == "warning"
    assert "dense recall is off" in outcomes[0].diagnostics and "embedder" in outcomes[0].diagnostics
    lines = [r for r in caplog.records if "dense recall off" in r.getMessage()]
    assert len(lines) == 1  # once per app (runtime), not per search


def test_api_with_dense_recall_and_without_weights(tiny_embedding_dir, tiny_model_dir, tmp_path):
    from test_api import bundle_of, make_client, matches, outcome_issues

    url = f"/fhir/Patient/{MICAH}/$rerank?query=kidney%20function&recall=7&_count=50"
    fused = bundle_of(make_client(embedder=str(tiny_embedding_dir), reranker="qwen3",
                                  model=str(tiny_model_dir), device="cpu",
                                  dtype="float32").get(url))
    assert len(matches(fused)) == 7  # a model reranks every fused candidate
    assert any("total 7: 7 of the" in i["diagnostics"]
               and "the 7 best by BM25 + dense (RRF) (" in i["diagnostics"]
               for i in outcome_issues(fused))
    absent = bundle_of(make_client(embedder=str(tmp_path / "nothing")).get(url))
    assert 0 < len(matches(absent)) <= 7
    warnings = [i for i in outcome_issues(absent) if i["severity"] == "warning"]
    assert any("dense recall is off" in i["diagnostics"] for i in warnings)


def test_make_tiny_model_cli_writes_an_embedding_checkpoint(tmp_path):
    from adapter.cli import main

    assert main(["make-tiny-model", str(tmp_path / "emb"), "--kind", "embedding"]) == 0
    vectors = engine(tmp_path / "emb").embed(["Urea Nitrogen"])
    assert vectors.shape == (1, 16) and abs(vectors.norm().item() - 1.0) < 1e-5


def test_fused_candidates_keep_each_types_share(dense_settings, runtime):
    """Dense recall over a notes-heavy chart: the fused list still gives each resource type
    its equal share of the candidates (the notes' vectors cannot crowd out the Conditions)."""
    notes = [Document(f"DocumentReference/n{i}", "DocumentReference", text,
                      {"resourceType": "DocumentReference", "id": f"n{i}"})
             for i, text in enumerate(random_documents(3, 40, 30))]
    conditions = [Document(f"Condition/c{i}", "Condition", text,
                           {"resourceType": "Condition", "id": f"c{i}"})
                  for i, text in enumerate(random_documents(5, 6, 8))]
    docs = notes + conditions
    dense_order = [d.type for d, _ in
                   ((docs[i], s) for i, s in runtime.embedder().rank("kidney", docs))]
    candidates, _, _ = first_stage("kidney", docs, 6, dense_settings, runtime=runtime)
    types = [d.type for d, _, _ in candidates]
    assert len(candidates) == 6 and types.count("Condition") >= 3, (types, dense_order[:6])
