"""`fhir-rerank`: serve the API, run a worker, search or rerank from the shell, make a tiny
model, check a FHIR server end to end (`interop`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from adapter.config import check_model_paths, load_settings
from adapter.errors import AdapterError
from adapter.fhir import make_source
from adapter.interop.command import add_interop_command
from adapter.logs import check_log_level, configure_logging
from adapter.version import __version__

log = logging.getLogger("adapter")


def _overrides(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _settings_from(args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """The command's settings (config, environment, its flags); logging switches to the
    settings' `log_format` from here on. DEBUG is refused without `log_phi_at_debug`."""
    settings = load_settings(_overrides(args, names + ("log_format",)))
    check_log_level(args.log_level, settings.log_phi_at_debug)
    configure_logging(args.log_level, settings.log_format)
    check_model_paths(settings)
    return settings


def _model_or_exit(settings: Any) -> Any:
    """Settings for a one-off command (search, rerank, eval): keyword scores printed as if
    a model had ranked are a wrong answer, so a model that cannot load is an error (exit 2,
    the reason and the fix) unless allow_keyword_fallback accepts keyword order."""
    import dataclasses

    if settings.reranker == "qwen3" and not settings.allow_keyword_fallback:
        return dataclasses.replace(settings, reranker_required=True)
    return settings


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-base-url", dest="fhir_base_url",
                        help="a live FHIR R4 server (env FHIR_RERANK_FHIR_BASE_URL)")
    parser.add_argument("--fhir-data", dest="fhir_data",
                        help="directory of FHIR Bundles (*.json) / Bulk NDJSON (*.ndjson)")
    parser.add_argument("--reranker", choices=["qwen3", "none", "remote"],
                        help="qwen3 (default), none (BM25 order) or remote (remote_url)")
    parser.add_argument("--model", help="0.6B | 4B | 8B | a Hugging Face id | a local directory")
    parser.add_argument("--device", help="auto | cuda | cpu | mps")
    parser.add_argument("--redis-url", dest="redis_url",
                        help="Celery broker/results; empty = run jobs in-process")
    parser.add_argument("--instruction", help="the reranker's task instruction (Qwen3)")


COMMON = ("fhir_base_url", "fhir_data", "reranker", "model", "device", "redis_url",
          "instruction")


def _quiet_handler() -> type:
    """werkzeug request handler that logs nothing itself: the app logs each request
    (adapter.access) without its query string, and werkzeug's own lines would quote it."""
    from werkzeug.serving import WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:
            logging.getLogger("adapter.access").debug("werkzeug %s", type)

    return Handler


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from(args, COMMON + ("host", "port"))
    if not args.dev:
        from adapter.server import serve

        return serve(settings, args.log_level)
    from werkzeug.serving import make_server

    from adapter.server import build_app, port_in_use
    from adapter.startup import report_dependencies

    if settings.port and port_in_use(settings.host, settings.port):
        raise ValueError(f"port {settings.port} on {settings.host} is in use; pick a free one "
                         "with --port N, FHIR_RERANK_PORT=N or `make demo PORT=N`")
    report_dependencies(settings)
    try:
        app = build_app(settings)
    except SystemExit:  # reranker_required and no model: build_app logged why
        return 2
    server = make_server(settings.host, settings.port, app, threaded=True,
                         request_handler=_quiet_handler())
    log.info("serving http://%s:%s/fhir with the development server (--dev)", settings.host,
             server.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from adapter.jobs.celery_backend import run_worker

    from adapter.jobs.routing import unrouted_tiers

    devices = _worker_devices(args)
    settings = _settings_from(args, COMMON)
    tiers = [t.strip() for t in (args.tiers or settings.model).split(",") if t.strip()]
    unrouted = unrouted_tiers(settings, tiers)
    if unrouted:  # a worker there would wait forever on a queue nothing sends to
        from adapter.jobs.routing import known_models, queue_for_model

        routes = ", ".join(f"{m} → {queue_for_model(settings, m)}" for m in known_models(settings))
        raise ValueError(f"--tiers {','.join(unrouted)}: no allowed model is sent there (allowed "
                         f"models go to: {routes}); add the model to models_allowed (and "
                         "model_queues for a local directory), or start the worker with "
                         "--model for it")
    if devices:
        from adapter.jobs.celery_backend import make_celery
        from adapter.jobs.devices import check_cuda_devices, run_device_workers, \
            visible_cuda_count
        from adapter.jobs.routing import worker_queues

        if any(d.startswith("cuda:") for d in devices):  # before anything else says a word
            check_cuda_devices(devices, visible_cuda_count(os.environ))
        make_celery(settings, set_as_current=False)  # no redis_url, a bad key: fail here once
        worker_queues(settings, tiers)
        return run_device_workers(devices, tiers, _overrides(args, COMMON + ("log_format",)),
                                  pool=args.pool, loglevel=args.loglevel,
                                  log_level=args.log_level,
                                  grace_s=settings.task_time_limit + 30)
    if args.supervisor_pid:
        from adapter.jobs.devices import die_with_parent

        die_with_parent(args.supervisor_pid)
    run_worker(settings, tiers, concurrency=args.concurrency or 1, pool=args.pool,
               loglevel=args.loglevel, name=args.name)
    return 0


def _worker_devices(args: argparse.Namespace) -> list[str]:
    """`--devices` parsed and checked against the flags it replaces (one-line errors)."""
    if args.devices is None:
        return []
    from adapter.jobs.devices import parse_devices

    devices = parse_devices(args.devices)
    if args.device:
        raise ValueError("--device and --devices together: --devices sets each worker's "
                         "device; drop --device")
    if args.concurrency not in (None, 1):
        raise ValueError("--concurrency with --devices: each device gets one worker process; "
                         "list a device once per worker instead")
    if args.name:
        raise ValueError("--name with --devices: each device's worker is named "
                         "rerank-<pid>.<i>@<host>; drop --name")
    return devices


def cmd_search(args: argparse.Namespace) -> int:
    from adapter.api.params import parse_search
    from adapter.cli_output import print_bundle_table, progress
    from adapter.pipeline import LinkContext, prepare_search, rank_prepared
    from adapter.runtime import Runtime

    settings = _model_or_exit(_settings_from(args, COMMON))
    runtime = Runtime(settings)
    pairs = [("query", args.query)] + [("_type", t) for t in args.type or []]
    if args.patient:
        pairs.append(("patient", args.patient))
    if args.recall:
        pairs.append(("recall", str(args.recall)))
    if args.instruction:
        pairs.append(("instruction", args.instruction))
    pairs.append(("_count", str(args.count)))
    parsed = parse_search(pairs, settings, types=None, strict=True, query_param="query")
    links = LinkContext("urn:fhir-rerank:cli", "$rerank", parsed.used)
    payload = prepare_search(parsed.request, make_source(settings), settings, links,
                             runtime=runtime)
    with progress("reranking") as bar:
        bundle = rank_prepared(payload, runtime.reranker(parsed.request.model),
                               on_progress=bar, settings=settings, runtime=runtime)
    if args.json or args.pretty:
        json.dump(bundle, sys.stdout, indent=2 if args.pretty else None)
        sys.stdout.write("\n")
    else:
        print_bundle_table(bundle)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from adapter.eval.data import load_qrels, load_topics
    from adapter.eval.runner import evaluate, format_table, write_trec_run
    from adapter.runtime import Runtime

    settings = _model_or_exit(_settings_from(args, COMMON))
    topics = load_topics(args.topics)
    qrels = load_qrels(args.qrels)
    runtime = Runtime(settings)
    result = evaluate(topics, qrels, make_source(settings), runtime.reranker(), settings,
                      runtime=runtime,
                      stage=args.stage, depth=args.depth)
    sys.stdout.write(format_table(result, ((t.qid, t.query) for t in topics)) + "\n")
    if result.unjudged:
        log.info("%d topic(s) have no judgments in the qrels and were not scored",
                 len(result.unjudged))
    if args.run:
        with open(args.run, "w", encoding="utf-8") as out:
            write_trec_run(result.rankings, out, tag=f"fhir-rerank-{settings.reranker}-{args.stage}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({**result.to_json(), "reranker": settings.reranker}, out, indent=2)
    return 0


def cmd_rerank(args: argparse.Namespace) -> int:
    from adapter.cli_output import cmd_rerank as run

    return run(args, _model_or_exit(_settings_from(args, COMMON)))


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from adapter.cli_output import progress
    from adapter.rerank.tiny import make_tiny_model

    with progress("make-tiny-model", unit="step") as on_progress:
        path = make_tiny_model(args.out_dir, seed=args.seed,
                               tie_word_embeddings=not args.untied, kind=args.kind,
                               on_progress=on_progress)
    log.info("wrote a tiny random-weight Qwen3 %s to %s", args.kind, path)
    return 0


EPILOG = """examples (the patients are in the bundled fhir_fixtures/):
  fhir-rerank make-tiny-model /tmp/tiny
  fhir-rerank serve --model /tmp/tiny          # FHIR API + /v1/rerank on :8080
  fhir-rerank search "latest HbA1c" --patient ec6a274e-5090-45c9-b153-e40418f6fa3d --type Observation
      # -> the patient's "Hemoglobin A1c" Observations first
  fhir-rerank rerank --query "asthma" --docs docs/examples/notes.jsonl --model /tmp/tiny
      # -> the five notes in a ranked table (tiny random weights: the order means nothing)
"""


def _parser(sub: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhir-rerank", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fhir-rerank {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO (default), WARNING or ERROR")
    parser.add_argument("--log-format", dest="log_format", choices=["text", "json"],
                        help="log lines as text or one JSON object a line (setting log_format; "
                             "default text)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_log_flags_to = _log_flags_for(sub)

    serve = _parser(sub, "serve", "serve the FHIR API and the rerank API (/v1/rerank)",
                    "fhir-rerank serve --model /tmp/tiny --port 8080")
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--dev", action="store_true",
                       help="Werkzeug's development server instead of gunicorn")
    serve.set_defaults(func=cmd_serve)

    worker = _parser(sub, "worker", "run a Celery worker for some model tiers",
                     "fhir-rerank worker --redis-url redis://127.0.0.1:6379/0 --tiers 0.6B\n"
                     "  fhir-rerank worker --tiers 8B --devices cuda:0,cuda:1,cuda:2,cuda:3")
    _add_common(worker)
    worker.add_argument("--tiers", help="comma-separated tiers to serve (default: --model)")
    worker.add_argument("--devices",
                        help="one worker process per device, supervised: cuda:0,cuda:1 "
                             "(or cpu,cpu); see docs/JOBS.md")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="worker processes (default 1)")
    worker.add_argument("--pool", default="prefork", help="Celery pool: prefork, threads, solo")
    worker.add_argument("--loglevel", default="INFO", help="the worker's log level")
    worker.add_argument("--name", help="Celery node name (default rerank-<pid>@%%h)")
    worker.add_argument("--supervisor-pid", dest="supervisor_pid", type=int,
                        help=argparse.SUPPRESS)  # set by --devices for its children
    worker.set_defaults(func=cmd_worker)

    search = _parser(sub, "search", "search a patient's record by meaning; prints a table",
                     'fhir-rerank search "kidney failure" --patient 79a66c97-6131-3213-'
                     'f3c9-4606946ab056 --type Condition --count 5\n'
                     '  # -> the patient\'s kidney Conditions ("Chronic kidney disease", '
                     '"End-stage renal disease")')
    _add_common(search)
    search.add_argument("query", help="the question, in plain words")
    search.add_argument("--patient", help="the patient's id on the FHIR server")
    search.add_argument("--type", action="append",
                        help="DocumentReference, Observation or Condition (repeatable)")
    search.add_argument("--count", type=int, default=10, help="results to show (default 10)")
    search.add_argument("--recall", type=int, help="keyword candidates handed to the reranker")
    search.add_argument("--json", action="store_true", help="print the Bundle as JSON")
    search.add_argument("--pretty", action="store_true", help="print the Bundle as indented JSON")
    search.set_defaults(func=cmd_search)

    ev = sub.add_parser("eval", help="measure ranking quality on judged topics (TREC qrels)")
    _add_common(ev)
    ev.add_argument("--topics", required=True,
                    help='JSON: {"topics": [{"qid", "query", "patient", "_type"?, "instruction"?}]}')
    ev.add_argument("--qrels", required=True, help="TREC qrels: `qid 0 ResourceType/id grade`")
    ev.add_argument("--stage", choices=["recall", "final"], default="final",
                    help="recall: the candidates handed to the reranker; final: the Bundle order")
    ev.add_argument("--depth", type=int, default=100, help="ranks judged per topic (default 100)")
    ev.add_argument("--run", help="write the rankings as a TREC run file")
    ev.add_argument("--json", help="write per-query and overall metrics as JSON")
    ev.set_defaults(func=cmd_eval)

    rerank = _parser(sub, "rerank", "rank the documents of a JSONL file by a query",
                     'fhir-rerank rerank --query "asthma" --docs docs/examples/notes.jsonl '
                     '--model /tmp/tiny')
    _add_common(rerank)
    rerank.add_argument("--query", required=True, help="the text to rank the documents by")
    rerank.add_argument("--docs", required=True,
                        help='JSONL: one string or {"id": ..., "text": ...} per line')
    rerank.add_argument("--top-n", dest="top_n", type=int, default=None,
                        help="show only the best N (default all)")
    rerank.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rerank.set_defaults(func=cmd_rerank)

    tiny = _parser(sub, "make-tiny-model",
                   "write a tiny random-weight Qwen3 reranker or embedding model (smoke tests)",
                   "fhir-rerank make-tiny-model /tmp/tiny")
    tiny.add_argument("out_dir", help="directory to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.add_argument("--untied", action="store_true", help="untied lm_head, like the 8B")
    tiny.add_argument("--kind", choices=["reranker", "embedding"], default="reranker",
                      help="reranker (Qwen3-Reranker-like) or embedding (Qwen3-Embedding-like)")
    tiny.set_defaults(func=cmd_make_tiny_model)

    add_interop_command(sub)
    _add_log_flags_to()
    return parser


def _log_flags_for(sub: Any) -> Any:
    """Accept --log-level / --log-format after the subcommand too (`fhir-rerank serve
    --log-format json`): each subcommand gets both, defaulting to "not given" so the value
    before the subcommand stands unless repeated after it."""
    def add() -> None:
        for command in sub.choices.values():
            command.add_argument("--log-level", default=argparse.SUPPRESS,
                                 help="DEBUG, INFO (default), WARNING or ERROR")
            command.add_argument("--log-format", dest="log_format", choices=["text", "json"],
                                 default=argparse.SUPPRESS,
                                 help="log lines as text or JSON (setting log_format)")
    return add


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format or "text")
    try:
        return args.func(args)
    except AdapterError as exc:
        log.error("%s", exc.message)
        return 2
    except ValueError as exc:  # bad settings
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
