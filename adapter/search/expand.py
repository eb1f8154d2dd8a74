"""The weighted BM25 query: the user's own words, plus clinical expansions from the lexicon.

`weighted_query("LDL en sangre")` → {"ldl": 1.0, "sangre": 1.0, "low": 0.6, "density": 0.6,
"lipoprotein": 0.6, "cholesterol": 0.6, "blood": 0.6, …}:

- The user's words weigh `USER_WEIGHT` (1.0); stopwords of the supported languages are
  dropped (they must not rank), and an English plural also looks for its singular.
- A lexicon concept is triggered when the question contains one of its names, abbreviations,
  everyday words or translations (as whole words; CJK as a substring). Its English names
  and abbreviations are added at `EXPANSION_WEIGHT`, its related terms at `RELATED_WEIGHT`,
  each times the token's specificity in the lexicon (a token many concepts share, such as
  "blood", weighs less; see lexicon `_set_specificity`). A token keeps its highest weight.
- An ambiguous abbreviation (lexicon/ambiguous.tsv, e.g. "MS", "PT") expands only when the
  question also holds a context word of exactly one of its senses; otherwise it stays the
  user's own word, unexpanded.
- A LOINC-style code typed in the question ("4548-4") matches by its number: the check digit
  alone would match every "4" in a record.

The reranker is never given this: it reads the user's own words.
"""
from __future__ import annotations

import re
from functools import lru_cache

from adapter.search.lexicon import Lexicon, load_lexicon
from adapter.search.tokenize import fold, tokenize

USER_WEIGHT = 1.0
EXPANSION_WEIGHT = 0.6
RELATED_WEIGHT = 0.2
VARIANT_WEIGHT = 0.9  # an English singular for a plural the user typed
OWN_WORD_WEIGHT = VARIANT_WEIGHT  # weights from here up are the user's own words

_LOINC_CODE = re.compile(r"\b(\d{1,7})-(\d)\b")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


def _singular(token: str) -> str | None:
    """A plain English singular ("polyps" → "polyp", "injuries" → "injury"), or None."""
    if len(token) < 4 or not token.isalpha() or not token.isascii():
        return None
    if token.endswith("ies"):
        return token[:-3] + "y"
    if token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return None


def _phrase_key(text: str) -> str:
    """Folded words joined by single spaces, padded, for whole-word phrase matching."""
    return " " + " ".join(_WORDS.findall(fold(text))) + " "


def triggered_concepts(query: str, lexicon: Lexicon | None = None) -> list[str]:
    """Ids of the lexicon concepts the question names, in lexicon order."""
    lexicon = lexicon or load_lexicon()
    key = _phrase_key(query)
    folded = fold(query)
    found: list[str] = []
    for form, concept_ids in lexicon.triggers.items():
        hit = (form in folded) if lexicon.is_cjk(form) else (f" {form} " in key)
        if hit:
            found.extend(c for c in concept_ids if c not in found)
    words = set(key.split())
    for abbreviation, senses in lexicon.ambiguous.items():
        if abbreviation not in words:
            continue
        chosen = [concept for concept, context in senses if words & context]
        if len(chosen) == 1 and chosen[0] not in found:
            found.append(chosen[0])
    return [c for c in lexicon.order if c in found]


@lru_cache(maxsize=4096)
def _weighted(query: str) -> tuple[tuple[str, float], ...]:
    lexicon = load_lexicon()
    weights: dict[str, float] = {}

    def add(token: str, weight: float) -> None:
        if token in lexicon.stopwords:
            return
        if weights.get(token, 0.0) < weight:
            weights[token] = weight

    text = query
    for number, check in _LOINC_CODE.findall(query):
        add(number, USER_WEIGHT)  # the check digit alone would match every such digit
        text = text.replace(f"{number}-{check}", " ")
    for token in tokenize(text):
        add(token, USER_WEIGHT)
        singular = _singular(token)
        if singular:
            add(singular, VARIANT_WEIGHT)
    for concept_id in triggered_concepts(query, lexicon):
        concept = lexicon.concepts[concept_id]
        for token in concept.expansion_tokens:
            add(token, EXPANSION_WEIGHT * concept.specificity[token])
        for token in concept.related_tokens:
            add(token, RELATED_WEIGHT * concept.specificity[token])
    return tuple(weights.items())


def weighted_query(query: str) -> dict[str, float]:
    """The BM25 query for `query` as {token: weight} (see the module docstring)."""
    return dict(_weighted(query or ""))
