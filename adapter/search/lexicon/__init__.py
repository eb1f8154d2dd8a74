"""The clinical lexicon for query expansion: data files beside this module, loaded once.

Files (tab-separated, `|` between alternatives, `#` starts a comment line; see README.md):

- `concepts/*.tsv`: `id  terms  also  lay  related`. `terms` are the English names records
  use, `also` abbreviations and spellings records may use too: both trigger the concept and
  are added to the query. `lay` (everyday words: "sugar", "heart attack") only trigger it.
  `related` terms are only added (at a lower weight), never trigger.
- `i18n/<lang>.tsv`: `id  term|term` — the concept's names in another language (triggers).
- `ambiguous.tsv`: `abbreviation  id  context|context` — one line per sense of an abbreviation
  that must not expand on its own (see expand.py for the rule).
- `stopwords/<lang>.txt`: function words, whitespace-separated (`#` starts a comment); a
  question drops those of its own language only (`adapter.search.analyze`), and
  `stopwords/fhir_labels.txt` (the flattener's layout words) always.

Concept names are matched and expanded as stems (`adapter.search.analyze.stem`): English
names with the English stemmer, each translation with its language's, so "kidney stones"
triggers the concept named "kidney stone" and the added terms meet the stemmed index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from adapter.search.analyze import stem
from adapter.search.tokenize import fold, tokenize

HERE = Path(__file__).resolve().parent
LANGUAGES = ("es", "fr", "de", "pt", "zh")  # translated names (English is the concepts' own)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class Concept:
    """One clinical concept: its English names, what triggers it, and what it adds."""

    id: str
    terms: list[str]
    also: list[str]
    lay: list[str]
    related: list[str]
    #: the concepts file it comes from ("labs", "conditions", …)
    kind: str = ""
    translations: dict[str, list[str]] = field(default_factory=dict)
    expansion_tokens: list[str] = field(default_factory=list)
    related_tokens: list[str] = field(default_factory=list)
    #: English stems of the concepts that list this one as related → share of RELATED_WEIGHT
    reverse_tokens: dict[str, float] = field(default_factory=dict)
    #: term (English stem) → share of the expansion weight (1.0 for one only this concept uses)
    specificity: dict[str, float] = field(default_factory=dict)


@dataclass
class Lexicon:
    """Concepts by id, trigger forms → concept ids (as written and as stems per language),
    ambiguous abbreviations, function words per language and the flattener's labels."""

    concepts: dict[str, Concept]
    order: list[str]
    triggers: dict[str, list[str]]
    ambiguous: dict[str, list[tuple[str, set[str]]]]
    #: language ("en", "es", … "zh") → its function words (folded tokens)
    function_words: dict[str, frozenset[str]]
    #: the flattener's field labels: never a question word in any language
    labels: frozenset[str]
    #: language → {stemmed trigger form → concept ids} (English names under "en")
    stemmed_triggers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: language → folded words of its translated names that are not English names too
    names: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def stopwords(self) -> frozenset[str]:
        """Every language's function words and the labels (what no expansion may add)."""
        return frozenset().union(self.labels, *self.function_words.values())

    @staticmethod
    def is_cjk(form: str) -> bool:
        return bool(_CJK.search(form))


def trigger_form(text: str) -> str:
    """How a trigger is matched: CJK text folded as is; other text as folded words."""
    folded = fold(text).strip()
    return folded if _CJK.search(folded) else " ".join(_WORDS.findall(folded))


def _rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append([cell.strip() for cell in line.split("\t")])
    return rows


def _alternatives(cell: str) -> list[str]:
    return [part.strip() for part in cell.split("|") if part.strip()]


def _tokens(texts: list[str], stopwords: frozenset[str]) -> list[str]:
    """The English index terms (stems) of `texts`, each once, without function words."""
    out: list[str] = []
    for text in texts:
        for token in tokenize(text):
            if token in stopwords or (len(token) == 1 and token.isascii()):
                continue  # "LDL-C" must not add "c"
            term = stem(token, "en")
            if term not in out:
                out.append(term)
    return out


def stemmed_form(form: str, language: str) -> str:
    """A trigger form as stems of `language` ("kidney stones" → "kidney stone"); CJK as is."""
    return form if _CJK.search(form) else " ".join(stem(w, language) for w in form.split())


def _function_words(path: Path) -> frozenset[str]:
    return frozenset(word for line in path.read_text(encoding="utf-8").splitlines()
                     for word in tokenize(line.split("#", 1)[0]))  # comments are not words


@lru_cache(maxsize=4)
def load_lexicon(root: Path = HERE) -> Lexicon:
    """Read and check the lexicon; a broken file is a programming error (ValueError)."""
    function_words = {path.stem: _function_words(path)
                      for path in sorted((root / "stopwords").glob("*.txt"))
                      if path.stem != "fhir_labels"}
    labels = _function_words(root / "stopwords" / "fhir_labels.txt")
    english_stop = function_words.get("en", frozenset()) | labels
    stopwords = frozenset().union(labels, *function_words.values())
    concepts: dict[str, Concept] = {}
    for path in sorted((root / "concepts").glob("*.tsv")):
        for row in _rows(path):
            row += [""] * (5 - len(row))
            cid, terms, also, lay, related = row[:5]
            if not cid or not terms or cid in concepts:
                raise ValueError(f"{path.name}: concept {cid!r} is empty or repeated")
            concepts[cid] = Concept(cid, _alternatives(terms), _alternatives(also),
                                    _alternatives(lay), _alternatives(related), path.stem)
    for lang in LANGUAGES:
        for row in _rows(root / "i18n" / f"{lang}.tsv"):
            if row[0] not in concepts or len(row) < 2:
                raise ValueError(f"i18n/{lang}.tsv: unknown concept {row[0]!r}")
            concepts[row[0]].translations.setdefault(lang, []).extend(_alternatives(row[1]))
    ambiguous: dict[str, list[tuple[str, set[str]]]] = {}
    for row in _rows(root / "ambiguous.tsv"):
        abbreviation, cid, context = (row + ["", "", ""])[:3]
        if cid not in concepts:
            raise ValueError(f"ambiguous.tsv: unknown concept {cid!r}")
        words = {w for c in _alternatives(context) for w in trigger_form(c).split()}
        ambiguous.setdefault(trigger_form(abbreviation), []).append((cid, words))
    triggers: dict[str, list[str]] = {}
    stemmed: dict[str, dict[str, list[str]]] = {}
    english_words: set[str] = set()
    for concept in concepts.values():
        forms = [(f, "en") for f in concept.terms + concept.also + concept.lay]
        forms += [(f, lang) for lang, names in concept.translations.items() for f in names]
        for form, lang in forms:
            key = trigger_form(form)
            if key in ambiguous:
                raise ValueError(f"{concept.id}: {form!r} is listed as ambiguous; "
                                 "give it context in ambiguous.tsv instead")
            own_stop = function_words.get(lang, frozenset()) | labels
            if not key or key in own_stop:
                continue  # a name that is a function word of its own language never triggers
            if concept.id not in triggers.get(key, []):
                triggers.setdefault(key, []).append(concept.id)
            by_stem = stemmed.setdefault(lang, {}).setdefault(stemmed_form(key, lang), [])
            if concept.id not in by_stem:
                by_stem.append(concept.id)
            if lang == "en":
                english_words.update(key.split())
        concept.expansion_tokens = _tokens(concept.terms + concept.also, english_stop)
    # A related term that names a concept brings that concept's names; and a diagnosis that
    # lists a concept as related is brought back by it ("cholesterol" brings
    # "hyperlipidemia", whose row in conditions.tsv lists cholesterol), at the share
    # 1 / (how many terms the diagnosis lists). Only diagnoses: a panel or a vital sign that
    # lists a measurement (BMI lists height) is not what a question about it asks for.
    for concept in concepts.values():
        related = list(concept.related)
        for term in concept.related:
            for other in triggers.get(trigger_form(term), []):
                if other != concept.id:
                    related.extend(concepts[other].terms + concepts[other].also)
                    if concept.kind != "conditions":
                        continue
                    share = 1.0 / len(concept.related)
                    for token in _tokens(concept.terms, english_stop):
                        back = concepts[other].reverse_tokens
                        back[token] = max(back.get(token, 0.0), share)
        concept.related_tokens = [t for t in _tokens(related, english_stop)
                                  if t not in concept.expansion_tokens]
    _set_specificity(concepts)
    names = {lang: frozenset(w for c in concepts.values() for n in c.translations.get(lang, ())
                             for w in trigger_form(n).split()
                             if w not in english_words and w not in stopwords)
             for lang in LANGUAGES}
    return Lexicon(concepts, list(concepts), triggers, ambiguous, function_words, labels,
                   stemmed, names)


def _set_specificity(concepts: dict[str, Concept]) -> None:
    """A term many concepts share ("blood", "serum", "count") says little about any one of
    them: weigh it by cf^-1/2, where cf is the number of concepts whose names hold it (1.0
    when unique, 0.5 when four concepts share it). A one-word name of the concept ("glucose",
    "LDL") is its head: it takes cf^-1/4. A term's weight depends on the concepts that name
    it and nothing else: a row with other words moves no other question."""
    frequency: dict[str, int] = {}
    for concept in concepts.values():
        for token in concept.expansion_tokens:
            frequency[token] = frequency.get(token, 0) + 1
    for concept in concepts.values():
        heads = {stem(tokens[0], "en") for tokens in
                 (tokenize(n) for n in concept.terms + concept.also) if len(tokens) == 1}
        concept.specificity = {
            token: frequency.get(token, 1) ** -0.5
            for token in set(concept.expansion_tokens) | set(concept.related_tokens)}
        concept.specificity.update({token: frequency.get(token, 1) ** -0.25 for token in heads})
