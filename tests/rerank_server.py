"""A real `fhir-rerank serve` process on a loopback port, for tests that call the rerank API
over HTTP (the Cohere SDK, LlamaIndex, the remote backend)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from fixtures_jobs import free_port, settings_env

REPO_ROOT = Path(__file__).resolve().parent.parent


class AdapterProcess:
    """`python -m adapter.cli serve` with the given settings (as FHIR_RERANK_*)."""

    def __init__(self, settings: dict[str, Any], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(REPO_ROOT),
               "OMP_NUM_THREADS": "1"}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "serve", "--port", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.log_path = log_path

    def wait_ready(self, headers: dict[str, str] | None = None, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/v1/models", headers=headers, timeout=2).ok:
                    return
            except requests.RequestException:  # not listening yet, or still loading the model
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
