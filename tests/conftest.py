"""Shared pytest wiring: the services the tests start (FHIR servers, Redis, Celery workers,
the tiny Qwen3 checkpoint) are fixtures in their own modules, imported here."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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
from hapifhir import GROUP as _HAPI_GROUP
from hapifhir import HAPI as _HAPI
from hapifhir import SHARED_FILE_ENV as _HAPI_SHARED
from hapifhir import needs_hapi as _needs_hapi
from hapifhir import start_early as _start_hapi_early
from hapifhir import stop_at_end as _stop_hapi


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fhir-base-url", default=None,
                     help="a live FHIR R4 server (e.g. a HAPI sandbox) for the -m hapi suite")


def _xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (`make test`: two workers): the controller owns the one HAPI server and
    # tells the workers where it is through a file (tests/hapifhir.py)
    if _xdist_controller(config) and not os.environ.get("HAPI_TEST_SERVER_URL"):
        os.environ[_HAPI_SHARED] = str(Path(tempfile.mkdtemp(prefix="hapi-shared-")) / "hapi")
        atexit.register(shutil.rmtree, os.path.dirname(os.environ[_HAPI_SHARED]), True)


def _scope(nodeid: str) -> str:
    """Which worker-sized unit a test belongs to: every test whose id says "hapi" in one (one
    worker runs them one at a time against the one HAPI server), else its module (whose
    module-scoped servers and workers then start once)."""
    return _HAPI_GROUP if _HAPI_GROUP in nodeid.lower() else nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    # xdist's own loadgroup marks do not reach the controller under pytest 9 (nodeids are
    # structured now), so the grouping is by id: a module, or all tests that say "hapi"
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrHapi(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ModuleOrHapi(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: object, ids: list[str]) -> None:
    # the controller: launch HAPI once a worker's collection names a test that needs it
    if os.environ.get(_HAPI_SHARED) and any(_scope(i) == _HAPI_GROUP for i in ids):
        _HAPI.share(Path(os.environ[_HAPI_SHARED]))


def pytest_collection_finish(session: pytest.Session) -> None:
    # real HAPI takes a minute or more to start: launch it now, in the background, when a
    # collected test needs it; only those tests wait for it
    _start_hapi_early(session.items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_hapi()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = [item.nodeid for item in items if _needs_hapi(item) and _scope(item.nodeid) != _HAPI_GROUP]
    if wrong:  # under xdist it would run on a worker beside the other HAPI tests
        raise pytest.UsageError(f"{wrong[0]} uses the HAPI server but its id does not say "
                                f"{_HAPI_GROUP!r}: put it in the test's name (tests/conftest.py)")
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
