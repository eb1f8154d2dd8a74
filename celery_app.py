"""The Celery app for `celery -A celery_app worker -Q rerank.0.6B` (settings from config/ and
FHIR_RERANK_*). The task and worker start-up live in adapter/jobs/celery_backend.py."""
from adapter.jobs.celery_backend import make_worker_app

celery_app = make_worker_app()
