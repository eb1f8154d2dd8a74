"""The reranker interface every backend implements (one file per backend), and the one result
type their `score()` returns: the FHIR routes, the rerank API and cost accounting all read it."""
from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from adapter.errors import BadRequest


@dataclass(frozen=True)
class ScoreOptions:
    """How long documents are handled in one `score` call.

    `long_documents`: "chunk" scores a document longer than the window as overlapping,
    token-exact chunks and keeps its best chunk's score; "truncate" keeps only its start.
    `max_tokens_per_doc`: document tokens considered at all (the rest is cut, with a warning).
    `max_total_tokens`: prompt tokens one call may score in all (a 413 beyond).
    """

    long_documents: str = "chunk"
    max_chunks_per_doc: int = 8
    overlap_tokens: int = 64
    max_tokens_per_doc: int | None = None
    #: prompt tokens one call may score in all (chunks included); over it is a 413
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.long_documents not in ("chunk", "truncate"):
            raise ValueError(f"long_documents {self.long_documents!r} is not chunk or truncate")
        if self.max_chunks_per_doc < 1:
            raise ValueError(f"max_chunks_per_doc {self.max_chunks_per_doc} must be at least 1")
        if self.overlap_tokens < 0:
            raise ValueError(f"overlap_tokens {self.overlap_tokens} must not be negative")
        if self.max_tokens_per_doc is not None and self.max_tokens_per_doc < 1:
            raise ValueError(f"max_tokens_per_doc {self.max_tokens_per_doc} must be at least 1")

    @classmethod
    def from_settings(cls, settings: Any) -> "ScoreOptions":
        return cls(long_documents=settings.long_documents,
                   max_chunks_per_doc=settings.max_chunks_per_doc,
                   overlap_tokens=settings.overlap_tokens)


@dataclass
class ScoreResult:
    """What one `score` call produced, per document in the input order, and what happened.

    - `scores`: relevance in [0, 1];
    - `tokens`: tokens the model read for the document: the full prompts of all its chunks,
      template included (0 for keyword order) — what usage and cost count;
    - `spans`: [start, end) characters of the best-scoring chunk, None when the document was
      read whole; `chunks`: rows scored per document;
    - `truncated_docs` / `truncated_tokens`: documents cut and tokens dropped from them;
    - `empty_docs`: input positions of empty documents;
    - `keyword_reason`: why the order is keyword order, None when a model scored;
      `fallback` is True when that is because the configured model could not be loaded;
    - `model`: the model that scored (id or path), "" for keyword order.
    """

    scores: list[float]
    tokens: list[int] = field(default_factory=list)
    spans: list[tuple[int, int] | None] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    truncated_docs: int = 0
    truncated_tokens: int = 0
    empty_docs: list[int] = field(default_factory=list)
    keyword_reason: str | None = None
    fallback: bool = False
    model: str = ""

    def __post_init__(self) -> None:
        n = len(self.scores)
        self.tokens = self.tokens or [0] * n
        self.spans = self.spans or [None] * n
        self.chunks = self.chunks or [1] * n
        if not len(self.tokens) == len(self.spans) == len(self.chunks) == n:
            raise ValueError("ScoreResult lists must all have one entry per document")

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def chunked_docs(self) -> int:
        return sum(1 for c in self.chunks if c > 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spans"] = [list(s) if s is not None else None for s in self.spans]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ScoreResult":
        values = dict(data)
        values["spans"] = [tuple(s) if s is not None else None for s in data.get("spans", [])]
        return cls(**values)


class Reranker(ABC):
    """`score(query, texts, instruction=None) -> ScoreResult`, in the input order."""

    name: str = "base"
    #: True when scores come from a model; False for keyword order.
    is_model: bool = False

    def __init__(self) -> None:
        #: unique per instance, for caches keyed by "this model with these settings"
        self.instance_id = uuid.uuid4().hex

    @abstractmethod
    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None,
              options: ScoreOptions | None = None) -> ScoreResult:
        """Relevance of each text to the query, in the input order, with what happened.

        `on_progress(done, total)` is called as documents are scored (for job progress).
        `options` (long documents: chunk or truncate) default to the backend's own.
        """

    def describe(self) -> str:
        return self.name


def require_query(query: str) -> None:
    """A model backend scores against a question: an empty one is the caller's error (400)."""
    if not query or not query.strip():
        raise BadRequest("the query is empty; give the question to rank the documents by",
                         expression="query")
