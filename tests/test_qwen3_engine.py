"""Qwen3Reranker as a user meets it: loading a checkpoint directory, failures, the interface."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapter.config import load_settings
from adapter.errors import BadRequest, ModelLoadError
from adapter.rerank.base import Reranker, ScoreOptions
from adapter.rerank.qwen3 import (Qwen3Reranker, cpu_supports_bf16, pack_by_tokens, pick_dtype,
                                  resolve_model_id)
from adapter.rerank.tiny import make_tiny_model

QUERY = "latest HbA1c result"
DOCS = ["HbA1c 6.9 % on 2023-01-04", "", "Fractured left radius, cast applied",
        "Glucose fasting 130 mg/dL", "血糖 7.8 mmol/L", "Patient reports headaches " * 40]


@pytest.fixture(scope="module")
def reranker(tiny_model_dir) -> Qwen3Reranker:
    return Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", batch_tokens=256)


def test_loads_a_checkpoint_directory_like_a_user_download(tiny_model_dir, reranker):
    from transformers import AutoModelForCausalLM

    assert isinstance(reranker, Reranker) and reranker.is_model and reranker.name == "qwen3"
    assert reranker.describe() == f"Qwen3-Reranker ({tiny_model_dir}, cpu, float32)"
    assert type(reranker.loaded.model) is type(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    from adapter.runtime import ModelStore

    models = ModelStore()  # an app's store: one load, shared by every reranker built on it
    first = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", models=models)
    again = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", batch_tokens=64,
                          models=models)
    assert again.loaded is first.loaded and len(models) == 1
    assert first.loaded is not reranker.loaded  # no store: a load of its own, no global


def test_from_settings_uses_the_configured_model(tiny_model_dir):
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
                              "max_length": 512, "batch_tokens": 1024,
                              "instruction": "Find the lab results"}, env={})
    built = Qwen3Reranker.from_settings(settings)
    assert (built.max_length, built.batch_tokens, built.instruction) == (512, 1024, "Find the lab results")
    assert built.dtype == torch.float32 and built.device == "cpu"


def test_scores_are_probabilities_in_input_order(reranker):
    result = reranker.score(QUERY, DOCS)
    scores = result.scores
    assert len(scores) == len(DOCS) and all(0.0 < s < 1.0 for s in scores)
    reversed_scores = reranker.score(QUERY, DOCS[::-1]).scores
    assert max(abs(a - b) for a, b in zip(scores, reversed_scores[::-1])) < 1e-5
    assert result.empty_docs == [1] and result.tokens == [len(r) for r in reranker.encode_pairs(QUERY, DOCS).rows]
    assert len(set(round(s, 6) for s in scores)) == len(DOCS)


def test_progress_reports_every_batch(reranker):
    seen: list[tuple[int, int]] = []
    reranker.score(QUERY, DOCS, on_progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 1 and seen[-1] == (len(DOCS), len(DOCS))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_empty_query_is_a_bad_request_and_no_documents_no_scores(reranker):
    with pytest.raises(BadRequest):
        reranker.score("  ", DOCS)
    assert reranker.score(QUERY, []).scores == []


def test_single_document_and_identical_documents(reranker):
    one = reranker.score(QUERY, [DOCS[0]]).scores
    many = reranker.score(QUERY, [DOCS[0]] * 5).scores
    assert max(abs(s - one[0]) for s in many) < 1e-5


def test_pack_by_tokens_respects_the_budget():
    lengths = [5, 300, 40, 41, 7, 1000, 2, 40]
    batches = pack_by_tokens(lengths, budget=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 120
        assert len(batch) * longest - sum(lengths[i] for i in batch) <= 0.1 * len(batch) * longest
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert [41, 40] in [[lengths[i] for i in b] for b in batches]  # near-equal lengths share a batch


@pytest.mark.parametrize("alias,expected", [("0.6B", "Qwen/Qwen3-Reranker-0.6B"),
                                            ("4b", "Qwen/Qwen3-Reranker-4B"),
                                            ("8B", "Qwen/Qwen3-Reranker-8B"),
                                            ("Qwen/Qwen3-Reranker-4B", "Qwen/Qwen3-Reranker-4B"),
                                            ("/models/reranker", "/models/reranker")])
def test_tier_aliases(alias, expected):
    assert resolve_model_id(alias) == expected


def test_unreachable_model_names_what_was_tried_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as caught:
        Qwen3Reranker("8B", device="cpu")
    message = caught.value.message
    assert "Qwen/Qwen3-Reranker-8B" in message and "HF_HUB_OFFLINE" in message
    assert "--reranker none" in message and "local directory" in message
    assert "\n" not in message


def test_a_checkpoint_that_is_not_qwen3_is_refused(tiny_model_dir, tmp_path):
    other = tmp_path / "not-qwen3"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="qwen3"):
        Qwen3Reranker(str(other), device="cpu")


def test_dtype_auto_follows_the_hardware():
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert pick_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ValueError):
        pick_dtype("int8", "cpu")


def test_bfloat16_engine_stays_close_to_float32(tiny_model_dir, reranker):
    bf16 = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert "bfloat16" in bf16.describe()
    exact = reranker.score(QUERY, DOCS).scores
    assert max(abs(a - b) for a, b in zip(bf16.score(QUERY, DOCS).scores, exact)) < 0.05


def test_max_length_outside_the_context_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="max_length"):
        Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", max_length=40000)


def test_make_tiny_model_is_deterministic_per_seed(tiny_model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    first, second = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and "lm_head.weight" not in first
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights_mb = (again / "model.safetensors").stat().st_size / 1e6
    assert weights_mb < 10
    from adapter.rerank.tiny import _random_state, tiny_qwen3_config

    other = _random_state(tiny_qwen3_config(), seed=1)
    assert not torch.equal(other["model.embed_tokens.weight"], first["model.embed_tokens.weight"])


def test_untied_checkpoint_keeps_its_own_head(tiny_model_dir_untied):
    weights = load_file(tiny_model_dir_untied / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    reranker = Qwen3Reranker(str(tiny_model_dir_untied), device="cpu", dtype="float32")
    head = weights["lm_head.weight"].float()
    assert torch.allclose(reranker.loaded.w_diff, head[9693] - head[2152])


@pytest.mark.cuda
def test_cuda_engine_matches_the_card_recipe(tiny_model_dir_untied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oracle_recipe import CardRecipe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir_untied, dtype=torch.float32).to("cuda")
    card = CardRecipe(model, AutoTokenizer.from_pretrained(tiny_model_dir_untied), max_length=128)
    expected = card.score(QUERY, DOCS, instruction="Find labs")
    exact = Qwen3Reranker(str(tiny_model_dir_untied), device="cuda", dtype="float32", max_length=128)
    got = exact.score(QUERY, DOCS, instruction="Find labs").scores
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
    fast = Qwen3Reranker(str(tiny_model_dir_untied), device="cuda", max_length=128)
    assert fast.dtype == torch.bfloat16
    assert max(abs(a - b) for a, b in zip(fast.score(QUERY, DOCS, "Find labs").scores, expected)) < 0.05


def test_each_call_returns_its_own_result_across_threads(tiny_model_dir):
    """Job threads share one engine: each call's result describes that call only."""
    import threading

    reranker = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", max_length=160,
                             options=ScoreOptions(long_documents="truncate"))
    seen = {}

    def other() -> None:
        seen["result"] = reranker.score("q", ["short", ""])

    thread = threading.Thread(target=other)
    thread.start()
    mine = reranker.score("q", ["word " * 200])  # one truncated document, in this thread
    thread.join()
    assert seen["result"].truncated_docs == 0 and seen["result"].empty_docs == [1]
    assert mine.truncated_docs == 1 and mine.empty_docs == []
