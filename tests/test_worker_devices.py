"""`fhir-rerank worker --devices …`: one supervised worker process per device.

The parser and the device plan are checked directly; the supervisor runs for real: a
`python -m adapter.cli worker --devices cpu,cpu` process against a real redis-server, its
two children loading the tiny Qwen3 checkpoint, the real Flask app submitting searches over
the bundled Synthea files. One child is SIGKILLed in the middle of a job (restarted under its
name, the job finished by a live worker), then SIGTERM to the parent in the middle of another
job (finished, everything gone, exit 0).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from adapter import create_app
from adapter.identity import caller_identity
from adapter.config import load_settings
from adapter.jobs.devices import check_cuda_devices, parse_devices, plan_slots
from adapter.jobs.heartbeat import lease_key, live_workers, workers_key
from fixtures_jobs import REPO_ROOT, settings_env

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"  # Synthea bulk patient: 708 notes, 219 conditions
SEARCH = f"/fhir/Condition?patient={BIG}&_content=diabetes&_count=10&recall=40"
LONG_SEARCH = f"/fhir/DocumentReference?patient={BIG}&_content=diabetes&recall=300"
#: another question: a worker that ranked LONG_SEARCH keeps its scores (the next page is free)
OTHER_LONG_SEARCH = f"/fhir/DocumentReference?patient={BIG}&_content=hypertension&recall=300"
ASYNC = {"Prefer": "respond-async"}
QUEUE = "rerank.devices"
ANYONE = caller_identity(None)


# --- the --devices parser and the device plan ----------------------------------------------

@pytest.mark.parametrize("text, devices", [
    ("cuda:0,cuda:1", ["cuda:0", "cuda:1"]),
    (" cpu , cpu ", ["cpu", "cpu"]),
    ("cuda:3,cpu,mps", ["cuda:3", "cpu", "mps"]),
    ("cuda:10", ["cuda:10"]),
])
def test_devices_parser_accepts(text, devices):
    assert parse_devices(text) == devices


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ("cuda:0,,cuda:1", "empty entry"),
    ("cuda:0,", "empty entry"),
    ("cuda", "names no GPU"),
    ("gpu", "names no GPU"),
    ("cuda0", "'cuda0' is not a device"),
    ("cuda:-1", "is not a device"),
    ("cuda:01", "is not a device"),
    ("cuda:0;cuda:1", "is not a device"),
    ("CPU", "is not a device"),
    ("cuda:1,cuda:1", "cuda:1 is listed twice"),
    ("mps,mps", "mps is listed twice"),
])
def test_devices_parser_refuses_with_one_line_naming_the_flag(text, says):
    with pytest.raises(ValueError) as err:
        parse_devices(text)
    message = str(err.value)
    assert message.startswith("--devices") and says in message and "\n" not in message
    assert "e.g. --devices" in message or "one worker per GPU" in message


def test_cuda_devices_must_exist():
    check_cuda_devices(["cuda:0", "cuda:1"], 2)
    check_cuda_devices(["cpu", "cpu"], 0)
    with pytest.raises(ValueError, match=r"cuda:2 does not exist; torch sees 2 GPU\(s\), "
                                         r"cuda:0\.\.cuda:1"):
        check_cuda_devices(["cuda:0", "cuda:2"], 2)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        check_cuda_devices(["cuda:0"], 0)


def test_each_gpu_worker_sees_only_its_gpu():
    plain = plan_slots(["cuda:0", "cuda:1", "cpu"], None)
    assert [(s.device, s.cuda_visible) for s in plain] == [("cuda:0", "0"), ("cuda:0", "1"),
                                                           ("cpu", "")]
    # cuda:N is the N-th GPU the parent sees, also when the parent was given a subset
    subset = plan_slots(["cuda:0", "cuda:1"], "2,3")
    assert [s.cuda_visible for s in subset] == ["2", "3"]
    uuids = plan_slots(["cuda:1"], "GPU-aaa, GPU-bbb")
    assert uuids[0].cuda_visible == "GPU-bbb" and uuids[0].given == "cuda:1"
    assert [s.index for s in plain] == [0, 1, 2]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "adapter.cli", "worker", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, says", [
    (["--devices", "cuda0"], "--devices: 'cuda0' is not a device"),
    (["--devices", "cpu", "--device", "cpu"], "--device and --devices together"),
    (["--devices", "cpu,cpu", "--concurrency", "2"], "--concurrency with --devices"),
    (["--devices", "cpu"], "redis_url is empty"),
])
def test_worker_command_refuses_bad_devices_in_one_line(args, says):
    done = _cli(*args, "--tiers", "0.6B")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert says in lines[0]


def test_a_gpu_that_does_not_exist_is_an_error_at_start_not_a_hang():
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    started = time.monotonic()
    done = _cli("--devices", f"cuda:{count}", "--tiers", "0.6B", "--redis-url",
                "redis://127.0.0.1:1/0", timeout=150)
    assert done.returncode == 2, done.stderr
    expected = f"cuda:{count} does not exist" if count else "torch sees no CUDA GPU"
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 150


# --- the supervisor, for real ---------------------------------------------------------------

def _proc_children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _wait(predicate: Callable[[], Any], timeout: float, what: str, log: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}\n{log()[-4000:]}")


class DeviceWorkers:
    """`python -m adapter.cli worker --devices … --tiers …` in a process of its own."""

    def __init__(self, devices: str, tiers: str, settings: dict[str, Any], log_path: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
        env.update(settings_env(settings))
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: no torch thread contention
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "worker", "--devices", devices,
             "--tiers", tiers], cwd=REPO_ROOT, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[int] = {self.proc.pid}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The device workers (direct children), and their pool processes noted for cleanup."""
        kids = [p for p in _proc_children(self.proc.pid) if _alive(p)]
        for kid in kids:
            self.seen.update([kid, *_proc_children(kid)])
        return kids

    def started_pid(self, index: int) -> int:
        """The pid of the last start of worker `index`, from the supervisor's log line."""
        found = re.findall(rf"worker {index} on \S+ started \(pid (\d+)", self.log())
        return int(found[-1]) if found else 0

    def name(self, index: int) -> str:
        return f"rerank-{self.proc.pid}.{index}@{socket.gethostname()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in self.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture(scope="module")
def settings(redis_server, tiny_model_dir) -> dict[str, Any]:
    model = str(tiny_model_dir)
    return {"redis_url": redis_server.url, "reranker": "qwen3", "model": model,
            "models_allowed": [model], "model_queues": [f"{model}=devices"], "dtype": "float32",
            "max_length": 512, "batch_tokens": 256, "max_recall": 1000, "redis_timeout": 1.0,
            "job_heartbeat_interval": 1.0, "job_stale_after": 4.0, "result_expires": 120}


@pytest.fixture(scope="module")
def fleet(settings, tmp_path_factory) -> Iterator[DeviceWorkers]:
    workers = DeviceWorkers("cpu,cpu", QUEUE, settings,
                            tmp_path_factory.mktemp("device-workers") / "workers.log")
    yield workers
    workers.close()


def _client(settings):
    return create_app(load_settings(settings, env={})).test_client()


def _job(client, url: str) -> str:
    resp = client.get(url, headers=ASYNC)
    assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
    return resp.headers["Content-Location"].rsplit("/", 1)[1]


def _answer(client, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(f"/fhir/_async/{job_id}")
        if resp.status_code != 202:
            return resp
        time.sleep(0.05)
    raise AssertionError(f"job not answered in {timeout} s")


def _running_holder(r: redis.Redis, client, job_id: str, timeout: float = 120.0) -> str:
    """Once a worker runs the job: its lease holder, `<worker name>/<pool process pid>`.
    (LONG_SEARCH reranks 300 notes: seconds of work on the tiny model after this point.)"""
    from adapter.jobs import job_ref

    jobs = client.application.extensions["fhir_rerank"].jobs
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = r.get(lease_key(job_ref(job_id)))
        if holder and jobs.status(job_id, ANYONE).state == "running":
            return holder.decode()
        time.sleep(0.02)
    raise AssertionError("the job was never seen running")


def test_one_worker_per_device_served_restarted_and_stopped(fleet, settings, redis_server):
    fast = load_settings(settings, env={})
    r = redis.Redis.from_url(redis_server.url)
    # 1. two children, each a whole Celery worker announcing itself on the tier's queue
    _wait(lambda: live_workers(fast).get(QUEUE) == 2
          and fleet.log().count("worker process") >= 2, 120, "two device workers ready",
          fleet.log)
    kids = fleet.children()
    assert sorted(kids) == sorted([fleet.started_pid(0), fleet.started_pid(1)])
    members = {m.decode() for m in r.zrange(workers_key(QUEUE), 0, -1)}
    assert members == {fleet.name(0), fleet.name(1)}
    for kid in kids:  # pinned: the device setting, and no GPU to reach for
        env = _environ(kid)
        assert env["FHIR_RERANK_DEVICE"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
        assert len(_proc_children(kid)) == 1  # its prefork pool process holds the model

    # 2. jobs are served, by both
    client = _client(settings)
    runner = client.application.extensions["fhir_rerank"].jobs
    ids = [_job(client, SEARCH) for _ in range(8)]
    for job_id in ids:
        resp = _answer(client, job_id)
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    served = {runner.status(job_id, ANYONE).worker for job_id in ids}
    assert served == {fleet.name(0), fleet.name(1)}, served

    # 3. SIGKILL the device worker that runs a job: restarted under its name, the job is
    #    finished by a live worker, its orphaned pool process is gone
    job_id = _job(client, LONG_SEARCH)
    holder = _running_holder(r, client, job_id)
    name, pool_pid = holder.rsplit("/", 1)
    index = 0 if name == fleet.name(0) else 1
    assert name == fleet.name(index)
    victim = fleet.started_pid(index)
    assert int(pool_pid) in _proc_children(victim)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    _wait(lambda: f"worker {index} on cpu died (killed by SIGKILL); restarting" in fleet.log(),
          10, "the supervisor noticing the death", fleet.log)
    _wait(lambda: not _alive(int(pool_pid)), 10, "the dead worker's pool process gone",
          fleet.log)
    _wait(lambda: fleet.started_pid(index) not in (0, victim), 30, "a restart", fleet.log)
    _wait(lambda: (r.zscore(workers_key(QUEUE), fleet.name(index)) or 0) > killed_at, 120,
          "the restarted worker's heartbeat", fleet.log)
    assert live_workers(fast).get(QUEUE) == 2
    resp = _answer(client, job_id, timeout=120)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    assert "1 job(s) stopped making progress" in fleet.log()  # taken over, not finished before
    assert fleet.proc.poll() is None

    # 4. SIGTERM to the parent mid-job: the job is finished, every process leaves, exit 0
    job_id = _job(client, OTHER_LONG_SEARCH)
    _running_holder(r, client, job_id)
    everyone = [fleet.proc.pid, *fleet.children()]
    everyone += [p for kid in everyone[1:] for p in _proc_children(kid)]
    assert len(everyone) == 5  # parent, 2 device workers, 2 pool processes
    stopped_at = time.monotonic()
    fleet.proc.send_signal(signal.SIGTERM)
    code = fleet.proc.wait(90)
    took = time.monotonic() - stopped_at
    assert code == 0, fleet.log()[-3000:]
    assert took < 90
    text = fleet.log()  # the job was still running when the stop began: warm shutdown ran it
    from adapter.jobs import job_ref

    assert text.index("stopping 2 worker(s)") < text.index(
        f"Task adapter.jobs.rerank[{job_ref(job_id)}] succeeded")
    resp = _answer(client, job_id, timeout=10)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    _wait(lambda: not any(_alive(p) for p in everyone), 10, "every process gone", fleet.log)
    assert QUEUE not in live_workers(fast)
    assert "all device workers stopped (exit code 0)" in fleet.log()


# --- the supervisor's policy, with a stand-in child program (real processes, no model) -------

#: what each child runs instead of a Celery worker: the device picks its behaviour
STAND_IN = """
import os, signal, sys, time
device = os.environ["FHIR_RERANK_DEVICE"]
if device == "mps":
    sys.exit(int(os.environ["MPS_EXIT"]))
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STUBBORN") else
              lambda *_: sys.exit(0))
time.sleep(120)
"""


def _supervise(devices: list[str], grace_s: float = 30.0, **env: str):
    from adapter.jobs.devices import Supervisor

    base = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    return Supervisor(plan_slots(devices, None), [sys.executable, "-c", STAND_IN],
                      {**base, **env}, grace_s, max_exits=3, exit_window_s=60)


def test_a_device_that_keeps_dying_stops_everything_non_zero():
    supervisor = _supervise(["cpu", "mps"], MPS_EXIT="3")
    started = time.monotonic()
    code = supervisor.run()
    assert code == 1 and time.monotonic() - started < 30  # exits after 1 + 2 s of backoff
    assert len(supervisor.children[1].exits) == 3
    assert supervisor.children[0].final == 0  # the healthy one was stopped gracefully


def test_a_configuration_error_in_a_child_is_not_retried():
    supervisor = _supervise(["cpu", "mps"], MPS_EXIT="2")
    started = time.monotonic()
    assert supervisor.run() == 2
    assert time.monotonic() - started < 10 and len(supervisor.children[1].exits) == 1


def test_children_that_ignore_sigterm_are_killed_after_the_grace():
    import threading

    supervisor = _supervise(["cpu", "cpu"], grace_s=1.0, STUBBORN="1")
    # run() takes SIGTERM in the main thread (its handler); a timer sends it to this process
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    code = supervisor.run()
    assert code == 1 and time.monotonic() - started < 15
    assert all(c.proc is None and c.final == -signal.SIGKILL for c in supervisor.children)
