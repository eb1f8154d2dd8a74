"""Benchmark: reranking jobs on Celery + Redis vs the same work in-process.

    .venv/bin/python bench/jobs.py [--jobs 50] [--json bench/results/jobs.json]

Starts a real redis-server and one `celery -A celery_app worker --concurrency 2` (2 prefork
processes, one torch thread each) with the tiny Qwen3 checkpoint; payloads come from
`prepare_search` over the fixture patients (file source, all three types, query "diabetes",
max_length 8192). Job sizes (SIZES): recall 20 and 100 over every patient, and recall 100 over
the 4 largest records ("busy chart": 100 candidates, mostly long notes). Per size:
- overhead: jobs one at a time (after the throughput run warmed every process), client latency (submit → result read, polling as a synchronous
  call does) minus the time `rank_job` takes in-process on the same payload;
- throughput: `--jobs` async jobs submitted at once, jobs/s on Celery (2 worker processes)
  and on the in-process runner (2 threads), each until every result was read.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from adapter.config import Settings, load_settings  # noqa: E402
from adapter.fhir import make_source  # noqa: E402
from adapter.jobs import InProcessJobRunner, JobRunner  # noqa: E402
from adapter.jobs.celery_backend import CeleryJobRunner  # noqa: E402
from adapter.models import SearchRequest  # noqa: E402
from adapter.pipeline import LinkContext, prepare_search  # noqa: E402
from adapter.jobs.envelope import seal  # noqa: E402
from adapter.jobs.work import rank_job  # noqa: E402
from fixtures_jobs import RedisServer, WorkerPool  # noqa: E402
from fixtures_model import tiny_checkpoint  # noqa: E402

log = logging.getLogger("bench.jobs")
OWNER = "bench"


#: (label, recall, how many of the largest fixture patients the jobs cycle over; 0 = all)
SIZES = [("small", 20, 0), ("chart", 100, 0), ("busy chart", 100, 4)]


def payloads(settings: Settings, recall: int, count: int, top: int) -> list[dict[str, Any]]:
    """`count` prepared searches over the fixture patients (largest records first, cycled)."""
    source = make_source(settings)
    patients = source.patients()  # type: ignore[attr-defined]
    patients = patients[:top] if top else patients
    out = []
    for i in range(count):
        request = SearchRequest(query="diabetes", patient=patients[i % len(patients)],
                                recall=recall, count=20)
        out.append(prepare_search(request, source, settings,
                                  LinkContext("http://bench/fhir", "$rerank")))
    return out


def run_all(runner: JobRunner, jobs: list[dict[str, Any]], model: str) -> float:
    """Submit every job at once, poll until all are read; wall seconds."""
    start = time.perf_counter()
    ids = [runner.submit(p, model, OWNER) for p in jobs]
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            status = runner.status(job_id, OWNER)
            if status.finished:
                if status.state != "done":
                    raise RuntimeError(f"job failed: {status.error}")
                pending.discard(job_id)
        time.sleep(0.05)  # a client polling 50 jobs must not steal the workers' 2 cores
    return time.perf_counter() - start


def measure(settings: Settings, celery: CeleryJobRunner, label: str, recall: int, top: int,
            jobs: int, sequential: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # like each worker process (OMP_NUM_THREADS=1)
    batch = payloads(settings, recall, jobs, top)
    sizes = [len(p["candidates"]) for p in batch]
    text_kb = statistics.mean(sum(len(c["document"]["text"]) for c in p["candidates"])
                              for p in batch) / 1024
    raw_kb = statistics.mean(len(json.dumps(p)) for p in batch) / 1024
    sealed_kb = statistics.mean(len(json.dumps(seal(p, ""))) for p in batch) / 1024
    # Throughput first: it also warms every process up on these shapes (torch caches kernels
    # per input shape, and a cold first call would count as queue overhead below).
    celery_wall = run_all(celery, batch, settings.model)
    inprocess = InProcessJobRunner(settings)
    try:
        local_wall = run_all(inprocess, batch, settings.model)
    finally:
        inprocess.close()
    local, queued = [], []
    from adapter.runtime import Runtime

    runtime = Runtime(settings)  # rank_job takes the runtime (its models) since the runtime moved
    rank_job(batch[0], settings.model, runtime)  # load the model before timing
    for payload in batch[:sequential]:
        start = time.perf_counter()
        rank_job(payload, settings.model, runtime)
        local.append(time.perf_counter() - start)
        start = time.perf_counter()
        job_id = celery.submit(payload, settings.model, OWNER)
        status = celery.wait(job_id, OWNER, 600)
        assert status.state == "done", status.error
        queued.append(time.perf_counter() - start)
        celery.forget(job_id)
    overhead = statistics.median(q - l for q, l in zip(queued, local))
    return {
        "size": label, "recall": recall, "patients": top or "all",
        "candidates_mean": round(statistics.mean(sizes), 1), "text_kb_mean": round(text_kb, 1),
        "payload_kb_json": round(raw_kb, 1), "payload_kb_sealed": round(sealed_kb, 1),
        "job_s_inprocess_median": round(statistics.median(local), 4),
        "job_s_celery_median": round(statistics.median(queued), 4),
        "overhead_s_median": round(overhead, 4),
        "overhead_pct": round(100 * overhead / statistics.median(local), 1),
        "job_s_for_10pct_overhead": round(overhead * 10, 2),
        "jobs": jobs, "celery_jobs_per_s": round(jobs / celery_wall, 2),
        "inprocess_jobs_per_s": round(jobs / local_wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=6,
                        help="jobs run one at a time for the overhead figure")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "jobs.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = str(tiny_checkpoint())
    redis_server = RedisServer()
    redis_server.start()
    pool = WorkerPool(Path(tempfile.mkdtemp(prefix="bench-jobs-")))
    overrides = {"redis_url": redis_server.url, "reranker": "qwen3", "model": model,
                 "models_allowed": [model], "device": "cpu",
                 "doc_cache_size": 0}  # every job scores for real: no cached rankings
    settings = load_settings(overrides, env={})
    rows = []
    try:
        pool.start("bench", ["rerank.default"], overrides, concurrency=2)
        celery = CeleryJobRunner(settings)
        for label, recall, top in SIZES:
            rows.append(measure(settings, celery, label, recall, top, args.jobs,
                                args.sequential))
        celery.close()
    finally:
        pool.stop_all()
        redis_server.close()
    cols = ["size", "candidates_mean", "text_kb_mean", "payload_kb_sealed",
            "job_s_inprocess_median", "overhead_s_median", "overhead_pct", "job_s_for_10pct_overhead", "celery_jobs_per_s",
            "inprocess_jobs_per_s"]
    widths = [max(len(c), 8) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(str(row[c]).rjust(w) for c, w in zip(cols, widths)))
    result = {"machine": platform.platform(), "python": platform.python_version(),
              "model": "tiny random Qwen3 (tests/.tiny-model)", "worker_processes": 2,
              "max_length": settings.max_length, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
