"""A job that a worker received but had not started (its pool still warming the model) is not
lost when the whole worker is SIGKILLed: the worker heartbeats the jobs it holds from the moment
it receives them, so another worker hands the job over after `job_stale_after`, as it does for
a running job. Before, such a job waited for the broker's visibility timeout (3600 s).

Real redis-server, real Celery workers on the tiny checkpoint; the warm-up is made slow on
purpose (tests/slow_boot_app.py sleeps in the pool process after loading the model), which is
what a 0.6B model loading on a busy CPU looks like to Celery. Default job settings.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.jobs import job_ref
from fixtures_jobs import CeleryWorker

pytestmark = pytest.mark.usefixtures("single_torch_thread")
log = logging.getLogger(__name__)
ASYNC = {"Prefer": "respond-async"}


class SlowBootWorker(CeleryWorker):
    """`celery -A slow_boot_app worker`: its pool process warms up for `slow_s` seconds."""

    def __init__(self, *args, slow_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env = {**self.env, "SLOW_BOOT_S": str(slow_s)}

    def _argv(self) -> list[str]:
        argv = super()._argv()  # run from tests/, where slow_boot_app lives
        argv[argv.index("celery_app")] = "slow_boot_app"
        return argv[:3] + ["--workdir", str(Path(__file__).resolve().parent)] + argv[3:]


def test_a_received_job_of_a_killed_warming_worker_is_answered(
        redis_server, celery_workers, fhir_server, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    settings = {"redis_url": redis_server.url, "fhir_base_url": fhir_server.base_url,
                "reranker": "qwen3", "model": model, "models_allowed": [model],
                "model_queues": [f"{model}=warming"], "device": "cpu", "max_length": 512}
    assert "job_stale_after" not in settings and "broker_visibility_timeout" not in settings
    warming = SlowBootWorker("warming", ["rerank.warming"], _env(settings), tmp_path,
                             slow_s=600)
    warming.start(wait=False)
    try:
        client = create_app(load_settings(settings, env={})).test_client()
        _wait_for(lambda: "ready." in warming.log(), 90, warming)  # consuming, pool warming
        resp = client.get("/fhir/Condition?patient=f201&_content=pain", headers=ASYNC)
        assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
        path = "/fhir/_async/" + resp.headers["Content-Location"].rsplit("/", 1)[1]
        ref = job_ref(path.rsplit("/", 1)[1])
        _wait_for(lambda: re.search(rf"Task adapter\.jobs\.rerank\[{ref}\] received",
                                    warming.log()), 60, warming)
        assert "reranking" not in warming.log()  # received, not started: the pool warms up
        time.sleep(2.0)  # past the first beat: the kill comes while the job waits
        warming.kill()
        killed_at = time.monotonic()
        rescuer = celery_workers.start("rescuer", ["rerank.warming"], settings)
        deadline = killed_at + 90
        while time.monotonic() < deadline:
            done = client.get(path)
            if done.status_code != 202:
                break
            time.sleep(0.5)
        took = time.monotonic() - killed_at
        log.warning("received-not-started job answered %.1f s after the SIGKILL", took)
        print(f"\nreceived-not-started job: {done.status_code} {took:.1f} s after the SIGKILL")
        assert done.status_code == 200, (took, done.get_data(as_text=True)[:300])
        assert took < 90
        assert f"job {ref[:12]}: reranking" in rescuer.log()
        assert "handed to another worker" in rescuer.log()
        rescuer.stop()
    finally:
        warming.stop()


def _env(settings):
    from adapter.config import settings_env

    return settings_env(settings)


def _wait_for(check, timeout, worker):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s:\n{worker.log()[-3000:]}")
