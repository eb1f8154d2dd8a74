"""Real clients, unchanged, against a real `fhir-rerank serve` process with the tiny model:
the official Cohere SDK (v2 and v1 clients) and LlamaIndex's CohereRerank postprocessor get
the same order and scores as a direct engine call."""
from __future__ import annotations

import pytest

from adapter.rerank.qwen3 import Qwen3Reranker
from rerank_server import AdapterProcess

QUERY = "Which patients have poorly controlled asthma?"
DOCS = ["Asthma, severe persistent; frequent nebuliser use", "Fractured left radius",
        "HbA1c 9.1 %: poorly controlled type 2 diabetes", "Wheeze and nocturnal cough",
        "Seasonal allergic rhinitis", "Inhaled corticosteroid adherence poor, asthma uncontrolled"]
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir)
    proc = AdapterProcess({"reranker": "qwen3", "model": model, "models_allowed": [model],
                           "device": "cpu", "dtype": "float32", "max_length": 512,
                           "api_keys": [KEY]},
                          tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        proc.wait_ready(headers={"Authorization": f"Bearer {KEY}"})
        yield proc, model
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    result = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32",
                           max_length=512).score(QUERY, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: (-result.scores[i], i))
    return order, result


def test_cohere_client_v2(server, direct):
    import cohere

    proc, model = server
    order, result = direct
    client = cohere.ClientV2(api_key=KEY, base_url=proc.url)
    got = client.rerank(model=model, query=QUERY, documents=DOCS, top_n=4)
    assert [r.index for r in got.results] == order[:4]
    assert [r.relevance_score for r in got.results] == \
        pytest.approx([result.scores[i] for i in order[:4]], abs=1e-6)
    assert got.meta.billed_units.input_tokens == result.total_tokens
    with pytest.raises(cohere.core.ApiError) as info:
        cohere.ClientV2(api_key="wrong", base_url=proc.url).rerank(
            model=model, query=QUERY, documents=DOCS)
    assert info.value.status_code == 401


def test_cohere_client_v1_with_documents(server, direct):
    import cohere

    proc, model = server
    order, _ = direct
    got = cohere.Client(api_key=KEY, base_url=proc.url).rerank(
        model=model, query=QUERY, documents=[{"text": d} for d in DOCS], return_documents=True)
    assert [r.index for r in got.results] == order
    assert [r.document.text for r in got.results] == [DOCS[i] for i in order]


def test_llama_index_cohere_rerank(server, direct):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    proc, model = server
    order, result = direct
    rerank = CohereRerank(api_key=KEY, model=model, top_n=3, base_url=proc.url)
    nodes = [NodeWithScore(node=TextNode(text=d, id_=f"n{i}"), score=0.0)
             for i, d in enumerate(DOCS)]
    got = rerank.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    assert [n.node.node_id for n in got] == [f"n{i}" for i in order[:3]]
    assert [n.score for n in got] == pytest.approx([result.scores[i] for i in order[:3]],
                                                   abs=1e-6)
