"""The engine against a line-for-line port of the model card's recipe (tests/oracle_recipe.py).

Float32, tiny random Qwen3 checkpoints with the real tokenizer, tied and untied heads: every
score within 1e-5, whatever the batch budget, order, length, script or emptiness. Negative
controls show the comparison would catch a wrong prompt, token, truncation side or a bf16 softmax.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter.rerank.base import ScoreOptions
from adapter.rerank.qwen3 import Qwen3Reranker
from oracle_recipe import CARD_TASK, CardRecipe

TOLERANCE = 1e-5
QUERY = "Is the patient's type 2 diabetes controlled? HbA1c трend 血糖"
WORDS = ("patient fever cough metformin HbA1c 7.2% mg/dL insulin denies chest pain "
         "糖尿病 患者 血糖 高血压 Пациент диабет жалобы السكري المريض διαβήτης ασθενής "
         "🩺 💊 naïve café 12/03/2021 BP 140/90").split()


def random_documents(seed: int, count: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
            for _ in range(count)]
    docs[rng.randrange(count)] = ""       # empty documents are scored, not dropped
    docs[rng.randrange(count)] = "   \n"
    return docs


@functools.lru_cache(maxsize=None)
def card_parts(path):
    """The card's own float32 model and tokenizer for a checkpoint (loaded once per module)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path, padding_side="left")


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tiny_model_dir, tiny_model_dir_untied):
    """(checkpoint dir, model, tokenizer) for the card recipe, tied head and untied head."""
    path = tiny_model_dir if request.param == "tied" else tiny_model_dir_untied
    return (path, *card_parts(path))


def engine(path, max_length: int, batch_tokens: int) -> Qwen3Reranker:
    """The engine in the card's mode for long documents: truncated on the right."""
    return Qwen3Reranker(str(path), device="cpu", dtype="float32", max_length=max_length,
                         batch_tokens=batch_tokens, options=ScoreOptions(long_documents="truncate"))


@pytest.mark.parametrize("seed,max_length,batch_tokens", [
    (1, 8192, 16384),   # nothing truncated, one batch
    (2, 96, 64),        # most documents longer than max_length; one per batch
    (3, 160, 700),      # mixed truncation, several uneven batches
])
def test_engine_matches_card_recipe(pair, seed, max_length, batch_tokens):
    path, model, tokenizer = pair
    card = CardRecipe(model, tokenizer, max_length=max_length)
    docs = random_documents(seed, 23, 60)
    rng = random.Random(seed)
    expected = card.score(QUERY, docs, instruction=None, batch_size=rng.choice([1, 5, 16]))
    reranker = engine(path, max_length, batch_tokens)
    order = list(range(len(docs)))
    rng.shuffle(order)
    got = reranker.score(QUERY, [docs[i] for i in order], instruction=CARD_TASK).scores
    assert len(got) == len(docs)
    worst = max(abs(got[k] - expected[i]) for k, i in enumerate(order))
    assert worst <= TOLERANCE, f"engine differs from the card recipe by {worst:.2e}"
    # the documents really differ in score, so agreement is not trivial
    assert max(expected) - min(expected) > 0.01


def test_default_and_per_request_instructions(pair):
    path, model, tokenizer = pair
    card = CardRecipe(model, tokenizer, max_length=512)
    reranker = engine(path, 512, 4096)
    docs = random_documents(7, 6, 30)
    default = reranker.score(QUERY, docs).scores
    assert max(abs(a - b) for a, b in zip(default, card.score(QUERY, docs, reranker.instruction))) <= TOLERANCE
    custom = "Retrieve lab results that show glycaemic control"
    got = reranker.score(QUERY, docs, instruction=custom).scores
    assert max(abs(a - b) for a, b in zip(got, card.score(QUERY, docs, custom))) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(got, default)) > 1e-4


def test_truncation_report_counts_dropped_tokens(pair):
    path, _, tokenizer = pair
    max_length = 100
    reranker = engine(path, max_length, 4096)
    docs = random_documents(11, 8, 80)
    report = reranker.score(QUERY, docs)
    fixed = len(tokenizer.encode(CardRecipe.prefix, add_special_tokens=False)) + \
        len(tokenizer.encode(CardRecipe.suffix, add_special_tokens=False))
    lengths = [len(tokenizer(f"<Instruct>: {reranker.instruction}\n<Query>: {QUERY}\n<Document>: {d}")
                   ["input_ids"]) for d in docs]
    over = [n - (max_length - fixed) for n in lengths if n > max_length - fixed]
    assert (report.truncated_docs, report.truncated_tokens) == (len(over), sum(over))
    assert report.truncated_docs > 0
    assert report.empty_docs == [i for i, d in enumerate(docs) if not d.strip()]


class _Bf16Softmax(CardRecipe):
    @torch.no_grad()
    def compute_logits(self, inputs, **kwargs):
        logits = self.model(**inputs).logits[:, -1, :].to(torch.bfloat16)
        pair = torch.stack([logits[:, self.token_false_id], logits[:, self.token_true_id]], dim=1)
        return torch.log_softmax(pair, dim=1)[:, 1].exp().float().tolist()


class _WrongPrompt(CardRecipe):
    prefix = CardRecipe.prefix.replace("Judge whether", "Decide whether")


@pytest.mark.parametrize("variant", ["prompt", "token", "truncation side", "bf16 softmax"])
def test_comparison_catches_recipe_mistakes(tiny_model_dir, variant):
    """The 1e-5 check has teeth: each classic mistake moves some score by far more."""
    model, tokenizer = card_parts(tiny_model_dir)
    kwargs = {"max_length": 120}
    cls = {"prompt": _WrongPrompt, "bf16 softmax": _Bf16Softmax}.get(variant, CardRecipe)
    if variant == "token":
        kwargs["yes"] = "Yes"
    if variant == "truncation side":
        kwargs["truncation_side"] = "left"
    wrong = cls(model, tokenizer, **kwargs)
    docs = random_documents(5, 12, 60)
    got = engine(tiny_model_dir, 120, 2048).score(QUERY, docs, instruction=CARD_TASK).scores
    worst = max(abs(a - b) for a, b in zip(got, wrong.score(QUERY, docs)))
    assert worst > 1e-4, f"a recipe with the wrong {variant} went unnoticed ({worst:.1e})"


def test_official_token_ids(tiny_model_dir):
    tokenizer = card_parts(tiny_model_dir)[1]
    assert tokenizer.convert_tokens_to_ids(["yes", "no"]) == [9693, 2152]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [151643, 151644, 151645, 151667, 151668]
    assert len(tokenizer) == 151669
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    suffix = tokenizer.encode(CardRecipe.suffix, add_special_tokens=False)
    assert suffix == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert tokenizer.encode(CardRecipe.prefix, add_special_tokens=False)[:3] == [151644, 8948, 198]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
