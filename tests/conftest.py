"""Shared pytest wiring: the services the tests start (FHIR servers, Redis, Celery workers,
the tiny Qwen3 checkpoint) are fixtures in their own modules, imported here."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Jobs on Redis are encrypted with a key kept in $XDG_STATE_HOME/fhir-rerank when payload_key
# is empty (adapter.jobs.envelope): one fresh folder per run, shared by the in-process API and
# the worker processes the tests start (they inherit this environment), never the user's own.
_STATE_HOME = tempfile.mkdtemp(prefix="fhir-rerank-state-")
os.environ["XDG_STATE_HOME"] = _STATE_HOME
atexit.register(shutil.rmtree, _STATE_HOME, True)

from fhirserver import *  # noqa: F401,F403  (fhir_server, hapi_server, fhir, hapi)
from fixtures_jobs import *  # noqa: F401,F403  (redis, celery workers)
from fixtures_model import *  # noqa: F401,F403  (tiny_model_dir, tiny_model_dir_untied)
from hapifhir import *  # noqa: F401,F403  (hapi_fhir_server, hapi_fhir: real HAPI FHIR)
from hapifhir import start_early as _start_hapi_early
from hapifhir import stop_at_end as _stop_hapi


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fhir-base-url", default=None,
                     help="a live FHIR R4 server (e.g. a HAPI sandbox) for the -m hapi suite")


def pytest_collection_finish(session: pytest.Session) -> None:
    # real HAPI takes a minute or more to start: launch it now, in the background, when a
    # collected test needs it; only those tests wait for it
    _start_hapi_early(session.items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_hapi()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_hapi = pytest.mark.skip(reason="give --fhir-base-url URL to run the live-server suite")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "hapi" in item.keywords and not config.getoption("--fhir-base-url"):
            item.add_marker(skip_hapi)
