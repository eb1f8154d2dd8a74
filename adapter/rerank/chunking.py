"""Prompts for the Qwen3 engine: one row per document, or overlapping chunks for long ones.

Why token-exact: each body `<Instruct>/<Query>/<Document>: text` gets the tokens the model
card's whole-body tokenization gives (the shared instruction and query tokenized once per call,
the document part per document: the two end to end are the same tokens, see `build_rows`); a
document that does not fit the window is then cut into slices of *those* tokens, each slice
behind the same header tokens. So chunk 0 is exactly what the card's right
truncation scores, every document token lies in some chunk (overlap `overlap_tokens`), and a
chunk's character span comes from the tokenizer's offsets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapter.errors import TooLarge
from adapter.rerank.base import ScoreOptions


@dataclass
class PromptRows:
    """The rows to score and which document each belongs to."""

    rows: list[list[int]] = field(default_factory=list)     # full prompt token ids
    owner: list[int] = field(default_factory=list)          # document index of each row
    spans: list[tuple[int, int] | None] = field(default_factory=list)  # chars, None = whole
    tokens: list[int] = field(default_factory=list)         # per document: prompt tokens
    chunks: list[int] = field(default_factory=list)         # per document: rows
    truncated_docs: int = 0
    truncated_tokens: int = 0

    def add(self, doc: int, ids: list[int], span: tuple[int, int] | None) -> None:
        """One row of `doc` (its `tokens` and `chunks` are counted before rows are built)."""
        self.rows.append(ids)
        self.owner.append(doc)
        self.spans.append(span)


def chunk_starts(doc_tokens: int, room: int, overlap: int, max_chunks: int) -> list[int]:
    """Start offsets of the windows of `room` tokens, `overlap` apart, covering the document
    (at most `max_chunks` of them; the caller counts what the last one leaves out)."""
    overlap = min(overlap, room // 2)  # a long query leaves little room: keep moving forward
    stride = room - overlap
    starts = [0]
    while starts[-1] + room < doc_tokens and len(starts) < max_chunks:
        starts.append(starts[-1] + stride)
    return starts


def too_many_tokens(tokens: int, limit: int, what: str, at_least: bool = False) -> TooLarge:
    return TooLarge(f"{what} come to {'at least ' if at_least else ''}{tokens} prompt tokens, "
                    f"more than the {limit} allowed per "
                    "call (max_tokens_per_call); send fewer or shorter documents, or a shorter "
                    "query or instruction", expression="documents")


@dataclass(frozen=True)
class _Row:
    """One row to build: the body's first `keep` tokens (header first), then, for a chunk,
    the body's document tokens `tail[doc_from:doc_to]` (indices into the tokens after the
    shared header)."""

    keep: int
    doc_from: int = 0
    doc_to: int = 0
    span: tuple[int, int] | None = None

    @property
    def length(self) -> int:
        return self.keep + self.doc_to - self.doc_from


def build_rows(tokenizer: Any, prefix_ids: list[int], suffix_ids: list[int], max_length: int,
               shared: str, doc_head: str, texts: list[str], options: ScoreOptions
               ) -> PromptRows:
    """Rows for the bodies `shared + doc_head + texts[i]` under `max_length` tokens per row
    (see the module doc).

    `shared` (instruction and query, ending in a newline) is tokenized once for all
    documents, then `doc_head + text` per document: the pre-tokenizer always ends a piece at
    that newline (`doc_head` starts with "<"), so the two token lists end to end are exactly
    the tokens of the whole body. Limits come before the work they protect: the call's token
    limit (`options.max_total_tokens`) is checked against the least the shared tokens cost
    (they are in every row) before any document is tokenized, then against every row's count
    before any row is built.
    """
    room = max_length - len(prefix_ids) - len(suffix_ids)
    fixed = len(prefix_ids) + len(suffix_ids)
    limit = options.max_total_tokens
    shared_ids = tokenizer(shared, padding=False, truncation=False,
                           return_attention_mask=False)["input_ids"]
    n_shared = len(shared_ids)
    if limit is not None and len(texts) * (fixed + min(room, n_shared)) > limit:
        raise too_many_tokens(len(texts) * (fixed + min(room, n_shared)), limit,
                              f"the query and instruction ({n_shared} tokens) in front of each "
                              f"of the {len(texts)} documents", at_least=True)
    tails = [doc_head + t for t in texts]
    encoded = tokenizer(tails, padding=False, truncation=False,
                        return_attention_mask=False)["input_ids"] if tails else []
    out = PromptRows(tokens=[0] * len(texts), chunks=[0] * len(texts))
    cap = options.max_tokens_per_doc
    plans: list[list[_Row]] = []
    for i, tail_ids in enumerate(encoded):
        whole = n_shared + len(tail_ids)
        if whole <= room and (cap is None or whole <= cap):
            plans.append([_Row(whole)])
            continue
        rows, dropped = _plan_long(tokenizer, n_shared, room, tails[i], len(doc_head), options)
        if dropped:
            out.truncated_docs += 1
            out.truncated_tokens += dropped
        plans.append(rows)
    for i, rows in enumerate(plans):
        out.tokens[i] = sum(fixed + row.length for row in rows)
        out.chunks[i] = len(rows)
    if limit is not None and sum(out.tokens) > limit:
        raise too_many_tokens(sum(out.tokens), limit, "the documents")
    for i, rows in enumerate(plans):
        tail_ids = encoded[i]
        for row in rows:
            body = shared_ids[:row.keep] if row.keep <= n_shared else \
                shared_ids + tail_ids[:row.keep - n_shared]
            out.add(i, prefix_ids + body + tail_ids[row.doc_from:row.doc_to] + suffix_ids,
                    row.span)
    return out


def _plan_long(tokenizer: Any, n_shared: int, room: int, tail: str, start: int,
               options: ScoreOptions) -> tuple[list[_Row], int]:
    """The rows of a document that does not fit (`tail` = doc_head + text, the text from
    character `start`), and how many of its tokens they leave out."""
    enc = tokenizer(tail, padding=False, truncation=False, return_attention_mask=False,
                    return_offsets_mapping=True)
    tail_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # header tokens end where a token first reaches into the document text
    split = next((k for k, (_, end) in enumerate(offsets) if end > start), len(tail_ids))
    head = n_shared + split
    n_doc, doc_offsets = len(tail_ids) - split, offsets[split:]
    doc_room = room - head
    total = n_doc
    if options.max_tokens_per_doc is not None and total > options.max_tokens_per_doc:
        total = options.max_tokens_per_doc
    if options.long_documents == "truncate" or doc_room < 1:
        # the card's right truncation of the whole body (header included when it is that long)
        keep = min(room, head + total)
        dropped = n_shared + len(tail_ids) - keep
        kept = keep - head
        span = (0, doc_offsets[kept - 1][1] - start) if kept > 0 else (0, 0)
        return [_Row(keep, span=span if dropped else None)], dropped
    starts = chunk_starts(total, doc_room, options.overlap_tokens, options.max_chunks_per_doc)
    covered = min(total, starts[-1] + doc_room)
    if len(starts) == 1 and covered == n_doc:
        return [_Row(n_shared + len(tail_ids))], 0  # fits after all (only the cap looked)
    rows = []
    for a in starts:
        b = min(a + doc_room, total)
        span = (max(doc_offsets[a][0] - start, 0), doc_offsets[b - 1][1] - start) if b > a \
            else (0, 0)
        rows.append(_Row(head, split + a, split + b, span))
    return rows, n_doc - covered
