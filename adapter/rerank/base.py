"""The reranker interface every backend implements (one file per backend)."""
from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ScoreReport:
    """Side facts about the last `score` call that the API turns into warnings."""

    truncated_docs: int = 0          # documents cut to fit max_length
    truncated_tokens: int = 0        # tokens dropped from them in total
    empty_docs: list[int] = field(default_factory=list)  # input positions of empty documents


class Reranker(ABC):
    """`score(query, texts, instruction=None) -> list[float]` in the input order, each in [0, 1]."""

    name: str = "base"
    #: True when scores come from a model; False for BM25-only order.
    is_model: bool = False

    def __init__(self) -> None:
        self._reports = threading.local()
        #: unique per instance, for caches keyed by "this model with these settings"
        self.instance_id = uuid.uuid4().hex

    @property
    def last_report(self) -> ScoreReport:
        """The report of this thread's last `score` call: one instance serves several job
        threads at once, and each must read the report of its own call."""
        report = getattr(self._reports, "value", None)
        return report if report is not None else ScoreReport()

    @last_report.setter
    def last_report(self, report: ScoreReport) -> None:
        self._reports.value = report

    @abstractmethod
    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None) -> list[float]:
        """Relevance of each text to the query, in the input order.

        `on_progress(done, total)` is called as documents are scored (for job progress).
        After the call, `self.last_report` (per thread) describes truncation and empty documents.
        """

    def describe(self) -> str:
        return self.name
