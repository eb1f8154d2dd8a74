"""Packed (padding-free) batches and their static CUDA-graph shapes against the model card.

The packed path lays each batch's documents end to end in one sequence under a flex-attention
mask (adapter/rerank/packed.py). On the CPU it runs eagerly: float32, tiny random Qwen3
checkpoints (tied and untied heads) with the real tokenizer, every score within 1e-5 of the
card's port (tests/oracle_recipe.py) for varied lengths, budgets that cut many batches,
single documents, a long shared prefix and chunked long notes. The static bucketed shapes
that CUDA graphs capture run here eagerly through the same code. Negative controls show that
a plain causal mask over the packed sequence, or positions that do not restart, are caught.
The `cuda` tests rerun the packed path and its CUDA graphs on a GPU.
"""
from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
import torch

from adapter.config import load_settings
from adapter.rerank import packed as packed_mod
from adapter.rerank.base import ScoreOptions
from adapter.rerank.packed import (StaticPackedRunner, bucket_for, length_buckets,
                                   pack_in_order, pack_tails, packed_mask_mod, prefix_bucket,
                                   resolve_attention)
from adapter.rerank.qwen3 import Qwen3Reranker
from oracle_recipe import CARD_TASK, CardRecipe
from test_qwen3_oracle import QUERY, TOLERANCE, card_parts, random_documents


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tiny_model_dir, tiny_model_dir_untied):
    """(checkpoint dir, card model, card tokenizer), tied head and untied head."""
    path = tiny_model_dir if request.param == "tied" else tiny_model_dir_untied
    return (path, *card_parts(path))


def packed_engine(path, max_length: int, batch_tokens: int, device: str = "cpu",
                  long_documents: str = "truncate", **kwargs) -> Qwen3Reranker:
    return Qwen3Reranker(str(path), device=device, dtype="float32", max_length=max_length,
                         batch_tokens=batch_tokens, attention="packed",
                         options=kwargs.pop("options", ScoreOptions(long_documents=long_documents)),
                         **kwargs)


def worst_difference(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected)
    return max(abs(a - b) for a, b in zip(got, expected))


def card_row_score(card: CardRecipe, row: list[int]) -> float:
    """The card's compute_logits on one prompt's token ids (no padding to add)."""
    ids = torch.tensor([row], device=card.model.device)
    return card.compute_logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]


def batches_of(engine: Qwen3Reranker, query: str, docs: list[str], instruction=None) -> int:
    """How many packed batches the engine cuts these documents into."""
    rows = engine.encode_pairs(query, docs, instruction).rows
    from adapter.rerank.qwen3 import _longest_common_prefix

    shared = min(_longest_common_prefix(rows), min(map(len, rows)) - 1)
    return len(pack_in_order([len(r) - shared for r in rows], engine.batch_tokens))


@pytest.mark.parametrize("seed,max_length,batch_tokens,min_batches", [
    (1, 8192, 16384, 1),   # nothing truncated, all documents in one packed sequence
    (2, 96, 16, 23),       # most documents truncated; the budget puts each in its own batch
    (3, 160, 300, 4),      # mixed truncation, batches cut by the token budget
])
def test_packed_matches_card_recipe(pair, seed, max_length, batch_tokens, min_batches):
    path, model, tokenizer = pair
    card = CardRecipe(model, tokenizer, max_length=max_length)
    docs = random_documents(seed, 23, 60)
    expected = card.score(QUERY, docs, instruction=None, batch_size=7)
    engine = packed_engine(path, max_length, batch_tokens)
    assert engine.attention == "packed"
    assert batches_of(engine, QUERY, docs, CARD_TASK) >= min_batches
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    got = engine.score(QUERY, [docs[i] for i in order], instruction=CARD_TASK).scores
    worst = max(abs(got[k] - expected[i]) for k, i in enumerate(order))
    assert worst <= TOLERANCE, f"packed batches differ from the card recipe by {worst:.2e}"
    assert max(expected) - min(expected) > 0.01  # the documents really differ
    # the model's own attention is back for the padded path and the prefix cache
    assert engine.loaded.model.config._attn_implementation == "sdpa"


def test_packed_long_shared_prefix(pair):
    """An instruction + query of several hundred tokens: the prefix spans many mask blocks."""
    path, model, tokenizer = pair
    instruction = " ".join(f"Consider criterion {i} of the clinical guideline;" for i in range(60))
    query = QUERY + " " + " ".join("HbA1c trend over visits" for _ in range(20))
    docs = random_documents(21, 9, 40)
    card = CardRecipe(model, tokenizer, max_length=2048)
    expected = card.score(query, docs, instruction=instruction)
    engine = packed_engine(path, 2048, 1000)
    rows = engine.encode_pairs(query, docs, instruction).rows
    assert min(map(len, rows)) > 600  # the shared part alone is longer than 4 mask blocks
    got = engine.score(query, docs, instruction=instruction).scores
    assert worst_difference(got, expected) <= TOLERANCE


def test_packed_chunked_long_documents(pair):
    """Long notes as overlapping chunks: each chunk row is the card's prompt for those tokens,
    and a document scores as its best chunk."""
    path, model, tokenizer = pair
    rng = random.Random(32)
    long_note = " ".join(rng.choice(("HbA1c", "7.2%", "血糖", "metformin", "denies", "BP"))
                         for _ in range(300))
    docs = random_documents(31, 6, 30) + [long_note]
    options = ScoreOptions(long_documents="chunk", max_chunks_per_doc=20, overlap_tokens=16)
    engine = packed_engine(path, 128, 400, options=options)
    plan = engine.encode_pairs(QUERY, docs)
    assert max(plan.chunks) > 3
    card = CardRecipe(model, tokenizer, max_length=128)
    row_scores = [card_row_score(card, row) for row in plan.rows]
    expected = [max(s for s, o in zip(row_scores, plan.owner) if o == d) for d in range(len(docs))]
    got = engine.score(QUERY, docs).scores
    assert worst_difference(got, expected) <= TOLERANCE
    chunks = [s for s, o in zip(row_scores, plan.owner) if o == len(docs) - 1]
    assert max(chunks) - min(chunks) > 1e-3  # the best chunk is a real choice


def test_single_documents(pair):
    path, model, tokenizer = pair
    card = CardRecipe(model, tokenizer, max_length=256)
    engine = packed_engine(path, 256, 16384)
    for doc in ["HbA1c 6.9 % on 2023-01-04", "", "血糖 " * 50]:
        assert worst_difference(engine.score(QUERY, [doc]).scores,
                                card.score(QUERY, [doc], engine.instruction)) <= TOLERANCE


def test_static_bucketed_shapes_match_card_recipe(tiny_model_dir_untied):
    """The fixed shapes CUDA graphs capture, run eagerly: the batch padded up to a length
    bucket, the prefix up to 128 or 256 keys, and a batch too long for any bucket falling
    back to the eager packed path."""
    path = tiny_model_dir_untied
    model, tokenizer = card_parts(path)
    card = CardRecipe(model, tokenizer, max_length=700)
    engine = packed_engine(path, 700, 1200)
    runner = StaticPackedRunner(engine.loaded.model, engine.loaded.device, 600, capture=False)
    assert runner.buckets == [512, 1024]
    engine.static_runner = runner
    docs = random_documents(41, 20, 60) + ["diabetes " * 500]  # one ~1000-token row
    for query in (QUERY, QUERY + " and the glucose log" * 20):
        expected = card.score(query, docs, engine.instruction)
        got = engine.score(query, docs).scores
        assert worst_difference(got, expected) <= TOLERANCE
    assert {p for p, _ in runner.shapes} == {128, 256}
    assert {n for _, n in runner.shapes} <= {512, 1024} and runner.failed == set()


def test_static_shape_keeps_nothing_from_the_previous_call(tiny_model_dir):
    """Static buffers are reused across calls: a shorter prefix after a longer one must not
    see the old keys (the padding of the prefix buffers is zeroed and masked)."""
    engine = packed_engine(tiny_model_dir, 512, 512)
    reference = packed_engine(tiny_model_dir, 512, 512)
    engine.static_runner = StaticPackedRunner(engine.loaded.model, engine.loaded.device, 512,
                                              capture=False)
    docs = random_documents(51, 5, 20)
    engine.score("a much longer question " * 10, docs)
    for query in ("q", "another question"):
        assert worst_difference(engine.score(query, docs).scores,
                                reference.score(query, docs).scores) <= 1e-6
    assert len(engine.static_runner.shapes) == 1


def _causal_mask_mod(doc, shared, prefix_len):
    def mask_mod(b, h, q_idx, kv_idx):  # every earlier token, other documents included
        return kv_idx <= q_idx + prefix_len
    return mask_mod


@pytest.mark.parametrize("mistake", ["causal mask", "positions run on"])
def test_comparison_catches_packing_mistakes(tiny_model_dir, monkeypatch, mistake):
    """The 1e-5 check has teeth: leaking attention across documents, or positions that keep
    counting through the packed sequence, move scores by far more."""
    model, tokenizer = card_parts(tiny_model_dir)
    docs = random_documents(5, 12, 60)
    expected = CardRecipe(model, tokenizer, max_length=256).score(QUERY, docs, CARD_TASK)
    if mistake == "causal mask":
        monkeypatch.setattr(packed_mod, "packed_mask_mod", _causal_mask_mod)
    else:
        real = packed_mod.pack_tails

        def running(tails, shared, length=None, pad_id=0):
            out = real(tails, shared, length, pad_id)
            out.positions = list(range(shared, shared + len(out.positions)))
            return out
        monkeypatch.setattr(packed_mod, "pack_tails", running)
        monkeypatch.setattr("adapter.rerank.qwen3.pack_tails", running)
    got = packed_engine(tiny_model_dir, 256, 4096).score(QUERY, docs, CARD_TASK).scores
    assert worst_difference(got, expected) > 1e-4, f"a {mistake} went unnoticed"


def test_mask_shows_each_document_the_prefix_and_itself():
    doc = torch.tensor([0, 0, 0, 1, 2, 2, 3])      # 3 = bucket padding
    shared, prefix_len = 2, 3                      # one padded prefix key
    mask_mod = packed_mask_mod(doc, torch.tensor(shared), torch.tensor(prefix_len))
    q = torch.arange(len(doc))[:, None]
    kv = torch.arange(prefix_len + len(doc))[None, :]
    got = mask_mod(0, 0, q, kv)
    expected = torch.zeros_like(got)
    for i in range(len(doc)):
        expected[i, :shared] = True
        for j in range(i + 1):
            expected[i, prefix_len + j] = bool(doc[i] == doc[j])
    assert torch.equal(got, expected)
    assert not got[:, shared:prefix_len].any()     # padded prefix keys are never seen


def test_pack_tails_layout_and_bucket_padding():
    packed = pack_tails([[5, 6, 7], [8], [9, 10]], shared=4, length=8, pad_id=0)
    assert packed.ids == [5, 6, 7, 8, 9, 10, 0, 0]
    assert packed.positions == [4, 5, 6, 4, 4, 5, 4, 5]
    assert packed.doc == [0, 0, 0, 1, 2, 2, 3, 3]
    assert packed.last == [2, 3, 5]
    assert pack_tails([[1, 2]], 0).ids == [1, 2]
    with pytest.raises(ValueError, match="bucket"):
        pack_tails([[1, 2, 3]], 0, length=2)


def test_pack_in_order_respects_the_budget():
    lengths = [5, 300, 40, 41, 7, 1000, 2, 40]
    batches = pack_in_order(lengths, budget=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 120
    assert [[lengths[i] for i in b] for b in batches] == [[1000], [300], [41, 40], [40, 7, 5, 2]]
    assert len(pack_in_order([3] * 10, budget=1)) == 10


def test_buckets():
    assert length_buckets(16384) == [512, 1024, 2048, 4096, 8192, 16384]
    assert length_buckets(600) == [512, 1024] and length_buckets(100) == [512]
    assert bucket_for(512, [512, 1024]) == 512 and bucket_for(513, [512, 1024]) == 1024
    assert bucket_for(1025, [512, 1024]) is None
    assert [prefix_bucket(n) for n in (0, 1, 128, 129, 300)] == [128, 128, 128, 256, 384]


def test_attention_setting_resolves_per_device(tiny_model_dir):
    config = card_parts(tiny_model_dir)[0].config
    assert resolve_attention("auto", "cpu", config) == "padded"
    assert resolve_attention("packed", "cpu", config) == "packed"
    assert resolve_attention("padded", "cuda", config) == "padded"
    assert resolve_attention("auto", "cuda", config) == "padded"  # head_dim 8 < 16 on CUDA
    with pytest.raises(ValueError, match="head dimension"):
        resolve_attention("packed", "cuda", config)
    wide = SimpleNamespace(layer_types=["full_attention"] * 2, head_dim=128)
    assert resolve_attention("auto", "cuda", wide) == "padded"  # until measured on a GPU
    assert resolve_attention("packed", "cuda", wide) == "packed"
    sliding = SimpleNamespace(layer_types=["sliding_attention", "full_attention"], head_dim=128)
    assert resolve_attention("auto", "cuda", sliding) == "padded"
    with pytest.raises(ValueError, match="sliding"):
        resolve_attention("packed", "cpu", sliding)
    with pytest.raises(ValueError, match="attention"):
        resolve_attention("varlen", "cpu", config)
    with pytest.raises(ValueError, match="attention 'flat'"):
        Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", attention="flat")


def test_settings_reach_the_engine(tiny_model_dir):
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
                             env={"FHIR_RERANK_ATTENTION": "packed",
                                  "FHIR_RERANK_CUDA_GRAPHS": "true"})
    assert (settings.attention, settings.cuda_graphs) == ("packed", True)
    built = Qwen3Reranker.from_settings(settings)
    assert built.attention == "packed" and built.static_runner is None  # no CUDA here
    assert load_settings(env={}).attention == "auto" and load_settings(env={}).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs"):
        load_settings(env={"FHIR_RERANK_CUDA_GRAPHS": "sometimes"})


def test_cuda_graphs_are_skipped_cleanly_off_cuda(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="adapter.rerank.qwen3"):
        engine = packed_engine(tiny_model_dir, 256, 4096, cuda_graphs=True)
    assert engine.static_runner is None
    assert "cuda_graphs applies to packed batches on CUDA only" in caplog.text
    docs = random_documents(9, 5, 20)
    plain = packed_engine(tiny_model_dir, 256, 4096)
    assert worst_difference(engine.score(QUERY, docs).scores, plain.score(QUERY, docs).scores) == 0


# --- on a GPU -------------------------------------------------------------------------------

def flex_capable_pair(tokenizer_dir, device: str):
    """A tiny random Qwen3 whose head dimension (16) the CUDA flex kernel accepts, float32,
    on `device`, with the real tokenizer; and the card recipe around the same model."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from adapter.rerank.tiny import _random_state, tiny_qwen3_config

    config = tiny_qwen3_config(tie_word_embeddings=False)
    config.update({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 16, "intermediate_size": 128})
    model = Qwen3ForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in _random_state(config, seed=3).items()})
    model = model.to(device=device, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model, tokenizer


@pytest.mark.cuda
def test_cuda_packed_matches_card_recipe(tiny_model_dir):
    model, tokenizer = flex_capable_pair(tiny_model_dir, "cuda")
    docs = random_documents(61, 40, 80) + ["diabetes " * 700]
    card = CardRecipe(model, tokenizer, max_length=512)
    expected = card.score(QUERY, docs, CARD_TASK, batch_size=8)
    for budget in (16384, 700, 64):
        engine = Qwen3Reranker.from_model(model, tokenizer, max_length=512, batch_tokens=budget,
                                          attention="packed",
                                          options=ScoreOptions(long_documents="truncate"))
        assert engine.attention == "packed"
        got = engine.score(QUERY, docs, instruction=CARD_TASK).scores
        assert worst_difference(got, expected) <= TOLERANCE, budget


@pytest.mark.cuda
def test_cuda_graphs_match_the_eager_packed_path(tiny_model_dir):
    model, tokenizer = flex_capable_pair(tiny_model_dir, "cuda")
    kwargs = dict(max_length=512, batch_tokens=2048, attention="packed",
                  options=ScoreOptions(long_documents="truncate"))
    eager = Qwen3Reranker.from_model(model, tokenizer, **kwargs)
    graphs = Qwen3Reranker.from_model(model, tokenizer, cuda_graphs=True, **kwargs)
    runner = graphs.static_runner
    assert runner is not None and runner.shapes and runner.failed == set()
    assert all(shape.graph is not None for shape in runner.shapes.values())
    card = CardRecipe(model, tokenizer, max_length=512)
    for seed, query in ((71, QUERY), (72, QUERY + " and the glucose log" * 20)):
        docs = random_documents(seed, 30, 80)
        want = eager.score(query, docs).scores
        got = graphs.score(query, docs).scores
        assert worst_difference(got, want) <= 1e-5
        assert worst_difference(got, card.score(query, docs, graphs.instruction)) <= TOLERANCE
    assert all(shape.graph is not None for shape in runner.shapes.values())
    assert len(runner.shapes) >= 2  # the longer query used a second prefix bucket
