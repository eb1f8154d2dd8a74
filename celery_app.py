"""The Celery app for `celery -A celery_app worker -Q rerank.0.6B` (settings from config/ and
FHIR_RERANK_*). The tasks live in adapter/tasks.py; see adapter/worker.py."""
from adapter.worker import make_worker_app

celery_app = make_worker_app()
