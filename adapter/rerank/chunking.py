"""Prompts for the Qwen3 engine: one row per document, or overlapping chunks for long ones.

Why token-exact: each body `<Instruct>/<Query>/<Document>: text` is tokenized whole, as the
model card does; a document that does not fit the window is then cut into slices of *those*
tokens, each slice behind the same header tokens. So chunk 0 is exactly what the card's right
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
        self.rows.append(ids)
        self.owner.append(doc)
        self.spans.append(span)
        self.tokens[doc] += len(ids)
        self.chunks[doc] += 1


def chunk_starts(doc_tokens: int, room: int, overlap: int, max_chunks: int) -> list[int]:
    """Start offsets of the windows of `room` tokens, `overlap` apart, covering the document
    (at most `max_chunks` of them; the caller counts what the last one leaves out)."""
    overlap = min(overlap, room // 2)  # a long query leaves little room: keep moving forward
    stride = room - overlap
    starts = [0]
    while starts[-1] + room < doc_tokens and len(starts) < max_chunks:
        starts.append(starts[-1] + stride)
    return starts


def build_rows(tokenizer: Any, prefix_ids: list[int], suffix_ids: list[int], max_length: int,
               headers: list[str], texts: list[str], options: ScoreOptions) -> PromptRows:
    """Rows for `headers[i] + texts[i]` under `max_length` tokens per row (see module doc)."""
    room = max_length - len(prefix_ids) - len(suffix_ids)
    bodies = [h + t for h, t in zip(headers, texts)]
    encoded = tokenizer(bodies, padding=False, truncation=False,
                        return_attention_mask=False)["input_ids"]
    out = PromptRows(tokens=[0] * len(texts), chunks=[0] * len(texts))
    cap = options.max_tokens_per_doc
    for i, ids in enumerate(encoded):
        if len(ids) <= room and (cap is None or len(ids) <= cap):
            out.add(i, prefix_ids + ids + suffix_ids, None)
            continue
        _add_long(out, i, tokenizer, prefix_ids, suffix_ids, room, headers[i], bodies[i], options)
    limit = options.max_total_tokens
    if limit is not None and sum(out.tokens) > limit:
        raise TooLarge(f"the documents come to {sum(out.tokens)} prompt tokens, more than the "
                       f"{limit} allowed per call; send fewer or shorter documents",
                       expression="documents")
    return out


def _add_long(out: PromptRows, doc: int, tokenizer: Any, prefix_ids: list[int],
              suffix_ids: list[int], room: int, header: str, body: str,
              options: ScoreOptions) -> None:
    enc = tokenizer(body, padding=False, truncation=False, return_attention_mask=False,
                    return_offsets_mapping=True)
    ids, offsets, start = enc["input_ids"], enc["offset_mapping"], len(header)
    # header tokens end where a token first reaches into the document text
    split = next((k for k, (_, end) in enumerate(offsets) if end > start), len(ids))
    head, doc_ids, doc_offsets = ids[:split], ids[split:], offsets[split:]
    doc_room = room - len(head)
    total = len(doc_ids)
    if options.max_tokens_per_doc is not None and total > options.max_tokens_per_doc:
        total = options.max_tokens_per_doc
    if options.long_documents == "truncate" or doc_room < 1:
        # the card's right truncation of the whole body (header included when it is that long)
        keep = min(room, len(head) + total)
        dropped = len(ids) - keep
        if dropped:
            out.truncated_docs += 1
            out.truncated_tokens += dropped
        kept = keep - len(head)
        span = (0, doc_offsets[kept - 1][1] - start) if kept > 0 else (0, 0)
        out.add(doc, prefix_ids + ids[:keep] + suffix_ids, span if dropped else None)
        return
    starts = chunk_starts(total, doc_room, options.overlap_tokens, options.max_chunks_per_doc)
    covered = min(total, starts[-1] + doc_room)
    if covered < len(doc_ids):
        out.truncated_docs += 1
        out.truncated_tokens += len(doc_ids) - covered
    if len(starts) == 1 and covered == len(doc_ids):
        out.add(doc, prefix_ids + ids + suffix_ids, None)  # fits after all (only the cap looked)
        return
    for a in starts:
        b = min(a + doc_room, total)
        span = (max(doc_offsets[a][0] - start, 0), doc_offsets[b - 1][1] - start) if b > a else (0, 0)
        out.add(doc, prefix_ids + head + doc_ids[a:b] + suffix_ids, span)
