"""Runs the scenarios in order against one FHIR server and builds the report.

Order matters: the CapabilityStatement first, then the test patient, the scenarios (each
skipped with the reason when the patient could not be loaded), and cleanup last, whatever
happened before it. A scenario that raises anything unexpected is a failure naming the
exception type (never a crash of the kit).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from adapter.interop import scenarios_api as api
from adapter.interop import scenarios_search as search
from adapter.interop.context import (FAIL, PASS, SKIP, InteropContext, ScenarioFailed,
                                     ScenarioResult, ScenarioSkipped)
from adapter.interop.report import InteropReport, progress_line

log = logging.getLogger(__name__)

#: (name, scenario) in the order they run; cleanup runs after these.
SCENARIOS: list[tuple[str, Callable[[InteropContext], str]]] = [
    ("capability", search.capability),
    ("load-test-patient", search.load_patient),
    ("search-Observation", search.search_observation),
    ("search-Condition", search.search_condition),
    ("search-DocumentReference", search.search_documentreference),
    ("paging-next-links", search.paging_next_links),
    ("page-size-above-max", search.page_size_above_max),
    ("filters-Observation", search.filters_observation),
    ("filters-Condition", search.filters_condition),
    ("filters-DocumentReference", search.filters_documentreference),
    ("auth-pass-through", api.auth_pass_through),
    ("auth-missing-token", api.auth_missing_token),
    ("auth-wrong-token", api.auth_wrong_token),
    ("attachment-by-url", api.attachment_by_url),
    ("attachment-base64", api.attachment_base64),
    ("rerank-get", api.rerank_get),
    ("rerank-post", api.rerank_post),
    ("async-pattern", api.async_pattern),
    ("unknown-patient-404", search.unknown_patient_404),
    ("content-delegation", search.content_delegation),
    ("model-rerank", api.model_rerank),
    ("long-note-whole", api.long_note_whole),
]
CLEANUP = "cleanup"


def scenario_names() -> list[str]:
    """Every scenario's name, in run order (cleanup last)."""
    return [name for name, _ in SCENARIOS] + [CLEANUP]


@dataclass
class InteropOptions:
    fhir_base_url: str
    authorization: str | None = None
    keep: bool = False
    #: a Qwen3 reranker checkpoint for the model scenarios; None builds the tiny random one
    #: when its tokenizer files are installed; "" skips the model scenarios
    model_dir: str | None = None


def _run_one(ctx: InteropContext, name: str, scenario: Callable[[InteropContext], str]
             ) -> ScenarioResult:
    ctx.current = name
    before = len(ctx.findings)
    started = time.monotonic()
    try:
        status, reason = PASS, scenario(ctx)
    except ScenarioSkipped as exc:
        status, reason = SKIP, str(exc)
    except ScenarioFailed as exc:
        status, reason = FAIL, str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not stop the others
        log.debug("scenario %s raised", name, exc_info=True)
        status, reason = FAIL, f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
    findings = [f.code for f in ctx.findings[before:]]
    return ScenarioResult(name, status, reason, round(time.monotonic() - started, 3), findings)


def _no_loading_bar() -> None:
    """transformers' weight-loading bar would break the progress lines on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _model_checkpoint(model_dir: str | None) -> Iterator[tuple[str | None, str | None]]:
    """(checkpoint directory, why not) for the model scenarios."""
    if model_dir is not None:
        if model_dir:
            _no_loading_bar()
        yield (model_dir or None), (None if model_dir else "model scenarios turned off (--no-model)")
        return
    try:
        from adapter.rerank.tiny import make_tiny_model, qwen_tiktoken_path

        if not qwen_tiktoken_path().exists():
            raise FileNotFoundError(str(qwen_tiktoken_path()))
    except (ImportError, FileNotFoundError) as exc:
        yield None, (f"no tiny Qwen3 checkpoint: {exc}; reinstall the package (its data holds "
                     "the Qwen tokenizer ranks) or pass --model-dir")
        return
    _no_loading_bar()
    folder = tempfile.mkdtemp(prefix="fhir-rerank-interop-model-")
    try:
        try:
            built: tuple[str | None, str | None] = (str(make_tiny_model(folder)), None)
        except Exception as exc:  # noqa: BLE001 - the other scenarios still run
            built = (None, f"the tiny Qwen3 checkpoint could not be built ({type(exc).__name__})")
        yield built
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _quiet_adapter_logs() -> Iterator[None]:
    """The adapter's per-search INFO lines would bury the progress lines: warnings only."""
    logger = logging.getLogger("adapter")
    previous = logger.level
    if logger.getEffectiveLevel() >= logging.INFO:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def run_interop(options: InteropOptions, progress: TextIO | None | str = "stderr") -> InteropReport:
    """Run every scenario against `options.fhir_base_url`; never raises for a server problem.
    A progress line per scenario goes to `progress` (stderr by default, None for none)."""
    if progress == "stderr":
        progress = sys.stderr
    total = len(SCENARIOS) + 1
    with _quiet_adapter_logs(), _model_checkpoint(options.model_dir) as (model, why_not):
        ctx = InteropContext(options.fhir_base_url, options.authorization, model_dir=model,
                             model_problem=why_not)
        results = []

        def record(result: ScenarioResult) -> None:
            results.append(result)
            if not isinstance(progress, str) and progress is not None:
                progress.write(progress_line(len(results), total, result) + "\n")
                progress.flush()

        try:
            for name, scenario in SCENARIOS:
                record(_run_one(ctx, name, scenario))
        finally:
            record(_run_one(ctx, CLEANUP, lambda c: search.cleanup(c, options.keep)))
    patient_id = ctx.patient.patient_id if ctx.patient else None
    return InteropReport(ctx.base_url, ctx.profile, results, ctx.findings, patient_id,
                         kept=options.keep and patient_id is not None)
