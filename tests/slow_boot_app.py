"""`celery -A slow_boot_app worker`: the project's worker app (celery_app) whose pool process
waits SLOW_BOOT_S seconds more after loading its model, as a large model still warming up on a
slow machine would. Test-only: tests/test_job_handover.py kills such a worker while a job it
received waits for that pool process."""
import os
import time

from celery import signals

from celery_app import celery_app  # noqa: F401 - the app this module serves

app = celery_app


@signals.worker_process_init.connect(weak=False)
def _warm_up_slowly(**_: object) -> None:
    time.sleep(float(os.environ.get("SLOW_BOOT_S", "0")))
