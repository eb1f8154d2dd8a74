"""The weighted BM25 query: the user's own words, plus clinical expansions from the lexicon.

`weighted_query("LDL en sangre")` → {"ldl": 1.0, "sangr": 1.0, "low": 0.6, "densiti": 0.6,
"lipoprotein": 0.6, "cholesterol": 0.6, "blood": 0.3, …} (index terms are stems):

- The question's language is guessed from its words (`adapter.search.analyze`); that
  language's function words are dropped (not another language's: "MI", "Na", "ER" stay in an
  English question), and so is a field label of the flattener; a word written in capitals
  inside the question is the user's abbreviation and never dropped.
- The user's words weigh `USER_WEIGHT` (1.0), each as its English stem and its stem in the
  question's language (records are stemmed in their own language, English by default).
- A lexicon concept is triggered when the question contains one of its names, abbreviations,
  everyday words or translations, as whole words or as stems ("kidney stones" triggers
  "kidney stone"; CJK as a substring, the longest name winning: 肌钙蛋白 is troponin, not the
  钙 of calcium). Its English names and abbreviations are added at `EXPANSION_WEIGHT`, its
  related terms at `RELATED_WEIGHT`, each times the term's specificity in the lexicon (a term
  many concepts share, such as "blood", weighs less; see lexicon `_set_specificity`). A term
  keeps its highest weight.
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
from adapter.search.analyze import (DEFAULT_LANGUAGE, question_language, stem,
                                    written_as_abbreviation)
from adapter.search.lexicon import stemmed_form
from adapter.search.tokenize import fold, tokenize

USER_WEIGHT = 1.0
EXPANSION_WEIGHT = 0.6
RELATED_WEIGHT = 0.2
OWN_WORD_WEIGHT = USER_WEIGHT  # weights from here up are the user's own words

_LOINC_CODE = re.compile(r"\b(\d{1,7})-(\d)\b")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


def _phrase_key(text: str) -> str:
    """Folded words joined by single spaces, padded, for whole-word phrase matching."""
    return " " + " ".join(_WORDS.findall(fold(text))) + " "


def question_words(query: str, lexicon: Lexicon | None = None) -> tuple[str, frozenset[str]]:
    """(the question's language, the folded words it drops: that language's function words
    and the flattener's labels, less the words written as abbreviations)."""
    lexicon = lexicon or load_lexicon()
    language = question_language(query, lexicon.function_words, lexicon.names)
    dropped = lexicon.function_words.get(language, frozenset()) | lexicon.labels
    return language, dropped - written_as_abbreviation(query)


_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")


def _cjk_hits(folded: str, lexicon: Lexicon) -> list[str]:
    """CJK trigger forms in the question (no spaces between words there, so a name is found
    as a substring), a form inside a longer matched one left out; a one-character name
    must be a whole word (its run, cut at Chinese function words): 肌钙蛋白 (troponin) holds
    钙 (calcium) but does not name it."""
    function_words = sorted(lexicon.function_words.get("zh", ()), key=len, reverse=True)
    segments: set[str] = set()
    for run in _CJK_RUN.findall(folded):
        for word in function_words:
            run = run.replace(word, " ")
        segments.update(run.split())
    found = [form for form in lexicon.triggers if lexicon.is_cjk(form) and form in folded
             and (len(form) > 1 or form in segments)]
    return [form for form in found
            if not any(form != longer and form in longer for longer in found)]


def triggered_concepts(query: str, lexicon: Lexicon | None = None) -> list[str]:
    """Ids of the lexicon concepts the question names, in lexicon order."""
    lexicon = lexicon or load_lexicon()
    language, dropped = question_words(query, lexicon)
    key = _phrase_key(query)
    words = key.split()
    folded = fold(query)
    found: list[str] = []

    def take(ids: list[str]) -> None:
        found.extend(c for c in ids if c not in found)

    for form in _cjk_hits(folded, lexicon):
        take(lexicon.triggers[form])
    content = [w for w in words if w not in dropped]  # "protein in urine" → "protein urine"
    keys = [key, " " + " ".join(content) + " "]
    for form, concept_ids in lexicon.triggers.items():
        if not lexicon.is_cjk(form) and form not in dropped \
                and any(f" {form} " in k for k in keys):
            take(concept_ids)
    for lang in dict.fromkeys((DEFAULT_LANGUAGE, language)):  # stems: plurals, inflections
        stemmed_keys = [" " + stemmed_form(" ".join(ws), lang) + " " for ws in (words, content)]
        for form, concept_ids in lexicon.stemmed_triggers.get(lang, {}).items():
            if not lexicon.is_cjk(form) and form not in dropped \
                    and any(f" {form} " in k for k in stemmed_keys):
                take(concept_ids)
    present = set(words)
    for abbreviation, senses in lexicon.ambiguous.items():
        if abbreviation not in present:
            continue
        chosen = [concept for concept, context in senses if present & context]
        if len(chosen) == 1 and chosen[0] not in found:
            found.append(chosen[0])
    return [c for c in lexicon.order if c in found]


@lru_cache(maxsize=4096)
def _weighted(query: str) -> tuple[tuple[str, float], ...]:
    lexicon = load_lexicon()
    language, dropped = question_words(query, lexicon)
    weights: dict[str, float] = {}

    def add(term: str, weight: float) -> None:
        if weights.get(term, 0.0) < weight:
            weights[term] = weight

    text = query
    for number, check in _LOINC_CODE.findall(query):
        add(number, USER_WEIGHT)  # the check digit alone would match every such digit
        text = text.replace(f"{number}-{check}", " ")
    for token in tokenize(text):
        if token in dropped:
            continue
        add(stem(token, DEFAULT_LANGUAGE), USER_WEIGHT)
        add(stem(token, language), USER_WEIGHT)
    for concept_id in triggered_concepts(query, lexicon):
        concept = lexicon.concepts[concept_id]
        for token in concept.expansion_tokens:
            add(token, EXPANSION_WEIGHT * concept.specificity[token])
        for token in concept.related_tokens:
            add(token, RELATED_WEIGHT * concept.specificity[token])
        for token, share in concept.reverse_tokens.items():
            add(token, RELATED_WEIGHT * share)
    return tuple(weights.items())


@lru_cache(maxsize=4096)
def own_words(query: str) -> tuple[str, ...]:
    """The question's own folded words as typed (not stemmed), function words left out: what
    an index looks for other forms of (`adapter.search.bm25.neighbours`)."""
    _, dropped = question_words(query)
    return tuple(dict.fromkeys(t for t in tokenize(query) if t not in dropped))


def weighted_query(query: str) -> dict[str, float]:
    """The BM25 query for `query` as {index term: weight} (see the module docstring)."""
    return dict(_weighted(query or ""))
