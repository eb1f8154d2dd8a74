"""The `fhir-rerank interop` subcommand: arguments, token handling, outputs, exit code."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from adapter.interop.report import render_table, write_outputs
from adapter.interop.runner import InteropOptions, run_interop

log = logging.getLogger(__name__)


def add_interop_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `interop` on the CLI's subparsers."""
    interop = sub.add_parser(
        "interop", help="check a live FHIR server end to end with this adapter (report, JUnit, JSON)",
        description="Loads a synthetic test patient, runs every scenario through the adapter "
                    "in-process, prints a table, deletes the patient (unless --keep). "
                    "Exit 0 only when every scenario that ran passed.")
    interop.add_argument("--fhir-base-url", dest="fhir_base_url", required=True,
                         help="the FHIR R4 base, e.g. https://hapi.example.org/baseR4")
    token = interop.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token for the server (or a whole Authorization "
                       "value such as 'Basic …'); visible in `ps`, prefer --token-env")
    token.add_argument("--token-env", dest="token_env", metavar="NAME",
                       help="read the token from this environment variable")
    interop.add_argument("--junit", metavar="OUT.xml", help="write a JUnit XML report")
    interop.add_argument("--json", dest="json_out", metavar="OUT.json", help="write a JSON report")
    interop.add_argument("--keep", action="store_true", help="leave the test patient on the server")
    model = interop.add_mutually_exclusive_group()
    model.add_argument("--model-dir", dest="model_dir",
                       help="a Qwen3 reranker checkpoint for the model scenarios (default: a "
                            "tiny random one, built when its tokenizer files are installed)")
    model.add_argument("--no-model", dest="model_dir", action="store_const", const="",
                       help="skip the model scenarios")
    interop.set_defaults(func=cmd_interop)


def authorization_value(token: str | None) -> str | None:
    """`Bearer <token>`, unless the value already names its scheme ('Bearer x', 'Basic y')."""
    if not token:
        return None
    token = token.strip()
    return token if " " in token else f"Bearer {token}"


def cmd_interop(args: argparse.Namespace) -> int:
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            log.error("--token-env %s: that environment variable is empty or not set", args.token_env)
            return 2
    if not args.fhir_base_url.startswith(("http://", "https://")):
        log.error("--fhir-base-url must start with http:// or https://")
        return 2
    report = run_interop(InteropOptions(args.fhir_base_url, authorization_value(token),
                                        keep=args.keep, model_dir=args.model_dir))
    sys.stdout.write(render_table(report))
    write_outputs(report, args.junit, args.json_out)
    return 0 if report.ok else 1
