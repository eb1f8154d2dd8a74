"""A real Redis and real Celery worker processes for the job tests.

`redis_server` starts `redis-server` on a free loopback port in a temp dir (no persistence) for
the whole session; `stop()` / `start()` simulate an outage on the same port. `celery_workers`
starts `celery -A celery_app worker` subprocesses (each with its own queues and FHIR_RERANK_*
environment, so it loads the same tiny checkpoint as the API) and stops them all at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.config import settings_env  # the workers get the API's settings as FHIR_RERANK_*

__all__ = ["RedisServer", "CeleryWorker", "WorkerPool", "free_port", "settings_env",
           "comparable_bundle", "redis_server", "celery_workers", "single_torch_thread",
           "isolated_redis_db"]

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comparable_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """A searchset without what differs per response (Bundle id, lastUpdated, outcome urn ids)."""
    out = {k: v for k, v in bundle.items() if k not in ("id", "meta")}
    entries = []
    for entry in bundle.get("entry", []):
        if entry.get("search", {}).get("mode") == "outcome":
            resource = {k: v for k, v in entry["resource"].items() if k != "id"}
            entry = {"resource": resource, "search": entry["search"]}
        entries.append(entry)
    out["entry"] = entries
    return out


class RedisServer:
    """One `redis-server` process on 127.0.0.1, restartable on the same port."""

    def __init__(self) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="fhir-rerank-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    #: the database the current test module uses (see `isolated_redis_db`)
    db = 0
    DATABASES = 256

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--databases", str(self.DATABASES),
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class CeleryWorker:
    """A real `celery -A celery_app worker` subprocess in its own process group."""

    def __init__(self, name: str, queues: list[str], env: dict[str, str], log_dir: Path,
                 pool: str = "prefork", concurrency: int = 1,
                 tiers: list[str] | None = None) -> None:
        self.name, self.queues, self.env = name, queues, env
        self.pool, self.concurrency = pool, concurrency
        self.tiers = tiers  # set: run `fhir-rerank worker --tiers ...` instead of `celery`
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def hostname(self) -> str:
        if self.tiers is not None:  # adapter.jobs.celery_backend.run_worker names itself rerank-<pid>
            return f"rerank-{self.proc.pid if self.proc else 0}@{socket.gethostname()}"
        return f"{self.name}@{socket.gethostname()}"

    def _argv(self) -> list[str]:
        if self.tiers is not None:
            return [sys.executable, "-m", "adapter.cli", "worker", "--tiers", ",".join(self.tiers),
                    "--pool", self.pool, "--concurrency", str(self.concurrency)]
        return [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                "-Q", ",".join(self.queues), "-n", self.hostname, "--pool", self.pool,
                "--concurrency", str(self.concurrency), "--without-mingle", "--without-gossip",
                "--loglevel", "INFO"]

    def start(self, wait: bool = True) -> "CeleryWorker":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: no torch thread contention
        self._log = self.log_path.open("ab")
        self._offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            self._argv(), cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[self._offset:]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the worker consumes and each pool process has loaded its models."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if "ready." in text and text.count("worker process") >= self.concurrency:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{text[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main and pool processes), like a machine or OOM death."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> "CeleryWorker":
        self.stop()
        return self.start()


class WorkerPool:
    """Starts named workers and stops every one of them at the end of the session."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: dict[str, CeleryWorker] = {}

    def start(self, name: str, queues: list[str], settings: dict[str, Any],
              pool: str = "prefork", concurrency: int = 1, wait: bool = True,
              tiers: list[str] | None = None) -> CeleryWorker:
        """A worker `name` for `queues` with the settings the API uses (as FHIR_RERANK_*);
        with `tiers`, started as `fhir-rerank worker --tiers ...` (queues then unused)."""
        if name in self.workers:
            self.workers[name].stop()
        worker = CeleryWorker(name, queues, settings_env(settings), self.log_dir, pool,
                              concurrency, tiers)
        self.workers[name] = worker
        return worker.start(wait=wait)

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session; tests that stop it must start it again."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module", autouse=True)
def isolated_redis_db() -> Iterator[None]:
    """Each test module gets a Redis database of its own (`RedisServer.url`): its queues,
    job records and worker heartbeats. Workers started by an earlier module (they live for
    the session) consume that module's queues, never this one's, whatever their settings."""
    RedisServer.db = (RedisServer.db + 1) % RedisServer.DATABASES
    yield


@pytest.fixture(scope="session")
def celery_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path_factory.mktemp("celery-workers"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Score with one torch thread in this process for the module: on 2 shared cores two
    intra-op threads stall behind any other busy process (measured 0.7 s → 22 s per job)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
