"""`reranker = remote`: scores from any server that speaks `/v1/rerank` (SiliconFlow, Jina,
vLLM, Cohere-compatible gateways, another instance of this adapter).

Documents are sent in calls of at most `remote_max_documents`; each call has a timeout and is
retried with exponential backoff on 429, 5xx and connection errors (a `Retry-After` header
wins). Redirects are never followed: a call carries the question and patient text, so a 3xx
answer is an error naming `remote_url` (set it to the address that answers), and nothing is
sent to the place it points at. The API key comes from the environment variable named by `remote_api_key_env`, never
from configuration files. Usage is read back from the answer (`usage.total_tokens`,
`meta.billed_units.input_tokens` or `tokens.input_tokens`); a remote reports tokens per call,
so each call's total is spread evenly over its documents.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import requests

from adapter.errors import UpstreamError, UpstreamThrottled, UpstreamTimeout
from adapter.rerank.base import Reranker, ScoreOptions, ScoreResult, require_query
from adapter.retry import RETRY_STATUSES, wait_before_retry

log = logging.getLogger(__name__)
RETRY_AFTER_CAP = 60.0  # seconds: the longest Retry-After a remote reranker may make us wait


def call_tokens(answer: dict[str, Any]) -> int:
    """The prompt tokens a rerank answer reports, whichever shape it uses (0 when none)."""
    for path in (("usage", "total_tokens"), ("meta", "billed_units", "input_tokens"),
                 ("tokens", "input_tokens")):
        value: Any = answer
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int):
            return value
    return 0


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that add up to it."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class RemoteReranker(Reranker):
    """Relevance scores from a remote `/v1/rerank` server, in the input order."""

    name = "remote"
    is_model = True

    def __init__(self, url: str, model: str, *, api_key: str = "", timeout: float = 60.0,
                 retries: int = 4, backoff: float = 0.5, max_documents: int = 100,
                 session: requests.Session | None = None) -> None:
        super().__init__()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote_url {url!r} is not an http(s) URL; set it to the base "
                             "of a /v1/rerank server, e.g. https://api.siliconflow.cn")
        if max_documents < 1:
            raise ValueError("remote_max_documents must be at least 1")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/rerank") else f"{base}/v1/rerank"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.max_documents = backoff, max_documents
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_settings(cls, settings: Any, model: str | None = None) -> "RemoteReranker":
        if not settings.remote_url:
            raise ValueError("reranker = remote needs remote_url (FHIR_RERANK_REMOTE_URL), the "
                             "base URL of a /v1/rerank server")
        return cls(settings.remote_url, settings.remote_model or model or settings.model,
                   api_key=os.environ.get(settings.remote_api_key_env, ""),
                   timeout=settings.remote_timeout, retries=settings.remote_retries,
                   backoff=settings.remote_backoff, max_documents=settings.remote_max_documents)

    def describe(self) -> str:
        return f"remote reranker ({self.model} at {self.endpoint})"

    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None,
              options: ScoreOptions | None = None) -> ScoreResult:
        require_query(query)
        scores: list[float] = [0.0] * len(texts)
        tokens: list[int] = [0] * len(texts)
        spans: list[tuple[int, int] | None] = [None] * len(texts)
        for start in range(0, len(texts), self.max_documents):
            batch = texts[start:start + self.max_documents]
            answer = self._post(self._body(query, batch, instruction, options))
            for item in answer.get("results", []):
                i = start + int(item["index"])
                scores[i] = float(item["relevance_score"])
                span = item.get("span")
                if isinstance(span, dict):
                    spans[i] = (int(span["start"]), int(span["end"]))
            if len(answer.get("results", [])) != len(batch):
                raise UpstreamError(f"the remote reranker answered {len(answer.get('results', []))}"
                                    f" results for {len(batch)} documents")
            tokens[start:start + len(batch)] = spread(call_tokens(answer), len(batch))
            if on_progress:
                on_progress(start + len(batch), len(texts))
        return ScoreResult(scores, tokens=tokens, spans=spans, model=self.model,
                           empty_docs=[i for i, t in enumerate(texts) if not t.strip()])

    def _body(self, query: str, batch: list[str], instruction: str | None,
              options: ScoreOptions | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "query": query, "documents": batch,
                                "top_n": len(batch), "return_documents": False}
        if instruction:
            body["instruction"] = instruction
        if options is not None:  # only what the caller asked for: other servers may refuse them
            body["max_chunks_per_doc"] = options.max_chunks_per_doc
            body["overlap_tokens"] = options.overlap_tokens
            if options.max_tokens_per_doc is not None:
                body["max_tokens_per_doc"] = options.max_tokens_per_doc
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One call, retried on 429 / 5xx / connection errors with backoff."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self.session.post(self.endpoint, json=body, timeout=self.timeout,
                                         allow_redirects=False)
            except requests.Timeout:
                if last:
                    raise UpstreamTimeout(f"the remote reranker did not answer within "
                                          f"{self.timeout} s (remote_timeout)") from None
                self._wait(attempt, None)
                continue
            except requests.ConnectionError:
                if last:
                    raise UpstreamError(f"the remote reranker at {self.endpoint} is "
                                        "unreachable; check remote_url") from None
                self._wait(attempt, None)
                continue
            if resp.status_code == 200:
                return resp.json()
            if 300 <= resp.status_code < 400:
                raise UpstreamError(
                    f"the remote reranker answered {resp.status_code} (a redirect); patient "
                    "data is never sent to a redirect target: set remote_url "
                    "(FHIR_RERANK_REMOTE_URL) to the address that answers /v1/rerank itself")
            if resp.status_code in RETRY_STATUSES and not last:
                log.warning("remote reranker answered %s; retry %d of %d", resp.status_code,
                            attempt + 1, self.retries)
                self._wait(attempt, resp.headers.get("Retry-After"))
                continue
            raise self._failure(resp)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        wait_before_retry(attempt, self.backoff, retry_after, RETRY_AFTER_CAP)

    @staticmethod
    def _failure(resp: requests.Response) -> UpstreamError:
        try:
            message = str(resp.json().get("error", {}).get("message", ""))[:300]
        except (ValueError, AttributeError):
            message = ""
        detail = f": {message}" if message else ""
        if resp.status_code == 429:
            return UpstreamThrottled(f"the remote reranker is throttling (429) after retries"
                                     f"{detail}", headers={"Retry-After": "5"})
        return UpstreamError(f"the remote reranker answered {resp.status_code}{detail}")
