"""What a job does, with or without Celery: score a prepared search (`rank_job` →
`adapter.pipeline.rank_prepared`) or a `/v1/rerank` call's documents (`run_rerank_payload`)
with the runtime's reranker, and turn a failure into the job's answer (`job_error`); which
settings a job needs of its worker (`scoring_settings`, `settings_differ`) and which failures
are worth a retry (`is_transient`). The in-process runner (`adapter.jobs.runners`) and the
Celery task (`adapter.jobs.celery_backend`) both call these; nothing here imports Celery.
"""
from __future__ import annotations

from typing import Any, Callable

from adapter.config import Settings
from adapter.errors import ModelLoadError, RerankerUnavailable, error_answer
from adapter.jobs.envelope import PayloadKeyError
from adapter.pipeline import rank_prepared, scoring_model
from adapter.rerank.base import ScoreOptions
from adapter.rerank.usage import usage_of
from adapter.runtime import Runtime


def rank_job(payload: dict[str, Any], model: str, runtime: Runtime,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score the prepared candidates with the runtime's reranker for `model`; the Bundle
    (or, for a rerank-API payload, its ScoreResult and usage)."""
    # Concurrent jobs may share the reranker: the Qwen3 engine runs one forward at a time per
    # model, and each `score` call returns its own ScoreResult.
    if payload.get("kind") == "rerank-api":  # a /v1/rerank call: documents, no FHIR search
        return run_rerank_payload(payload, model, runtime, on_progress)
    return rank_prepared(payload, runtime.reranker(model), on_progress=on_progress,
                         settings=runtime.settings, runtime=runtime)


def job_error(exc: BaseException, where: str = "worker") -> dict[str, Any]:
    """What a failed job answers: the same mapping as an HTTP error (`error_answer`)."""
    return error_answer(exc, where).to_json()


def score_options(payload_options: dict[str, Any], settings: Settings) -> ScoreOptions:
    """The call's options over the configured defaults, with the per-call token limit."""
    given = {k: v for k, v in payload_options.items() if v is not None}
    return ScoreOptions(long_documents=settings.long_documents,
                        max_chunks_per_doc=given.get("max_chunks_per_doc",
                                                     settings.max_chunks_per_doc),
                        overlap_tokens=given.get("overlap_tokens", settings.overlap_tokens),
                        max_tokens_per_doc=given.get("max_tokens_per_doc"),
                        max_total_tokens=settings.max_tokens_per_call)


def run_rerank_payload(payload: dict[str, Any], model: str, runtime: Runtime,
                       on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The job body of a `/v1/rerank` call (`adapter.api.rerank_jobs` built the payload):
    score the documents with the runtime's reranker for `model`."""
    settings = runtime.settings
    reranker = runtime.reranker(model)
    result = reranker.score(payload["query"], payload["documents"], payload.get("instruction"),
                            on_progress=on_progress,
                            options=score_options(payload["options"], settings))
    usage = usage_of(result, settings, scoring_model(result, model))
    return {"result": result.to_json(), "usage": usage.to_json()}


#: Settings that change what a job's scores are. The API sends its values with each job
#: (`needs`); a worker whose values differ does not score it (adapter.jobs.celery_backend's
#: `rerank` task). The device, batch size and CUDA graphs change speed, not the answer, and
#: may differ per worker.
SCORING_SETTINGS = ("reranker", "dtype", "max_length", "attention", "instruction",
                    "long_documents", "max_chunks_per_doc", "overlap_tokens",
                    "max_tokens_per_call", "remote_url", "remote_model")


def scoring_settings(settings: Settings) -> dict[str, Any]:
    """The values of SCORING_SETTINGS: what a job needs of the worker that scores it."""
    return {name: getattr(settings, name) for name in SCORING_SETTINGS}


def settings_differ(needs: dict[str, Any], settings: Settings) -> list[str]:
    """The scoring settings whose value here differs from what a job needs, as
    `name (API x, worker y)`; empty when this worker may score the job."""
    mine = scoring_settings(settings)
    out = []
    for name in SCORING_SETTINGS:
        if name in needs and needs[name] != mine[name]:
            shown = (f"API {needs[name]!r:.40}, worker {mine[name]!r:.40}"
                     if name not in ("instruction", "remote_url") else "values differ")
            out.append(f"{name} ({shown})")
    return out


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: a model that could not load, a GPU out of memory."""
    if isinstance(exc, PayloadKeyError):
        return False
    return isinstance(exc, (RerankerUnavailable, ModelLoadError)) or \
        type(exc).__name__ == "OutOfMemoryError"
