"""One worker process per device: `fhir-rerank worker --devices cuda:0,cuda:1 --tiers 8B`.

The command becomes a small supervisor (no torch, no model, no Redis of its own) that starts
one ordinary `fhir-rerank worker` per device, each a whole Celery worker (main process + one
prefork pool process that loads the model) on the tiers' queues. Separate workers rather than
one Celery pool with pinned children, because each one then has what a single worker has
today: its own heartbeat (readiness counts every device), its own stale-job check, its own
warm shutdown, and a GPU fault or an OOM kill takes down one device, not the pool.

- Pinning: a child for `cuda:N` gets `CUDA_VISIBLE_DEVICES=<N-th visible GPU>` and the
  `device` setting `cuda:0`, so it cannot create a context or allocate on another GPU (nor
  can a library that defaults to the first GPU). `cpu` / `mps` children get
  `CUDA_VISIBLE_DEVICES=""`. The setting travels as `FHIR_RERANK_DEVICE`; the parent's
  other command-line settings travel as `FHIR_RERANK_*` too.
- Names: child i is `rerank-<parent pid>.<i>@<host>`; a restarted child keeps its name, so
  its heartbeat entry is reused and readiness keeps counting one worker per device.
- A child that dies (any exit while the parent is not stopping) has what is left of its
  process group killed (its pool process) and is started again after 1, 2, 4 … 30 s; a
  job it held is handed to a live worker by the heartbeat check (adapter.jobs.heartbeat).
  `MAX_EXITS` deaths of one device within `EXIT_WINDOW_S`, or a configuration error (exit
  code 2), stop every worker and the parent exits non-zero, so a service manager sees it.
- SIGTERM / SIGINT to the parent: each child gets SIGTERM (Celery's warm shutdown: stop
  consuming, finish the running job, leave the heartbeat); the parent exits 0 once all
  have exited cleanly. A second signal sends SIGQUIT (cold shutdown: the running job is
  given up and its message goes back to the queue). Children still alive after
  `task_time_limit` + 30 s are killed. If the parent itself dies, children get SIGTERM
  (Linux parent-death signal).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from adapter.config import settings_env

log = logging.getLogger(__name__)

FLAG = "--devices"
EXAMPLE = "e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu"
_DEVICE = re.compile(r"cpu|mps|cuda:(0|[1-9][0-9]{0,2})")
#: a device dying this often within EXIT_WINDOW_S makes the parent give up (exit 1)
MAX_EXITS = 5
EXIT_WINDOW_S = 600.0
MAX_BACKOFF_S = 30.0
#: the exit code of `fhir-rerank` for a configuration error: restarting cannot fix it
CONFIG_ERROR = 2
POLL_S = 0.2


def parse_devices(text: str) -> list[str]:
    """`cuda:0,cuda:1` → ["cuda:0", "cuda:1"]. Raises ValueError (one line naming the flag and
    the fix) for an empty list, an unknown device, `cuda` without its index or a GPU listed
    twice; `cpu` may repeat (several CPU workers), `mps` may not."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise ValueError(f"{FLAG} is empty; {EXAMPLE}")
    if any(not item for item in items):
        raise ValueError(f"{FLAG} {text!r}: empty entry; give comma-separated devices, "
                         f"{EXAMPLE}")
    seen: set[str] = set()
    for item in items:
        if item == "cuda" or item == "gpu":
            raise ValueError(f"{FLAG}: {item!r} names no GPU; give each one its index, "
                             "e.g. --devices cuda:0,cuda:1")
        if not _DEVICE.fullmatch(item):
            raise ValueError(f"{FLAG}: {item!r} is not a device (cpu, mps or cuda:N); {EXAMPLE}")
        if item != "cpu" and item in seen:
            raise ValueError(f"{FLAG}: {item} is listed twice; one worker per GPU (list it "
                             "once, or add GPUs)")
        seen.add(item)
    return items


def check_cuda_devices(devices: list[str], visible: int) -> None:
    """Raise ValueError when a `cuda:N` is not among the `visible` GPUs torch sees."""
    wanted = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
    if not wanted:
        return
    if visible == 0:
        raise ValueError(f"{FLAG}: torch sees no CUDA GPU on this machine (driver, "
                         "CUDA_VISIBLE_DEVICES?); use --devices cpu or a machine with GPUs")
    missing = [f"cuda:{n}" for n in wanted if n >= visible]
    if missing:
        raise ValueError(f"{FLAG}: {','.join(missing)} does not exist; torch sees {visible} "
                         f"GPU(s), cuda:0..cuda:{visible - 1}")


def visible_cuda_count(env: Mapping[str, str] | None = None) -> int:
    """How many CUDA GPUs torch sees, asked in a short subprocess so the supervisor never
    imports torch nor initialises CUDA (it lives as long as the workers, forking them)."""
    probe = ("import torch; print(torch.cuda.device_count() "
             "if torch.cuda.is_available() else 0)")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=120, env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        raise ValueError(f"{FLAG}: asking torch for the GPUs took over 120 s (driver hung?)"
                         ) from None
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise ValueError(f"{FLAG}: could not ask torch for the GPUs (exit {done.returncode}); "
                         "is torch with CUDA installed?")
    return int(done.stdout.strip())


@dataclass(frozen=True)
class Slot:
    """One device's worker: its index, the device as given, and what its process gets."""
    index: int
    given: str
    device: str
    cuda_visible: str


def plan_slots(devices: list[str], parent_visible: str | None) -> list[Slot]:
    """The child settings per device. `cuda:N` is the N-th GPU the parent sees: with the
    parent's CUDA_VISIBLE_DEVICES = "2,3", cuda:1 runs with CUDA_VISIBLE_DEVICES=3."""
    listed = ([v.strip() for v in parent_visible.split(",")]
              if parent_visible not in (None, "") else None)
    slots = []
    for i, given in enumerate(devices):
        if given.startswith("cuda:"):
            n = int(given.split(":")[1])
            physical = listed[n] if listed is not None and n < len(listed) else str(n)
            slots.append(Slot(i, given, "cuda:0", physical))
        else:
            slots.append(Slot(i, given, given, ""))
    return slots


@dataclass
class Child:
    """A running (or waiting to restart) worker for one slot."""
    slot: Slot
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    exits: list[float] = field(default_factory=list)
    final: int | None = None  # exit code once stopped for good


def node_name(parent_pid: int, index: int) -> str:
    """Child i's Celery node name (`%h` is the host name)."""
    return f"rerank-{parent_pid}.{index}@%h"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Starts the children, restarts the dead ones, stops them all on SIGTERM / SIGINT."""

    def __init__(self, slots: list[Slot], argv: list[str], env: Mapping[str, str],
                 grace_s: float, *, max_exits: int = MAX_EXITS,
                 exit_window_s: float = EXIT_WINDOW_S) -> None:
        self.argv, self.env, self.grace_s = argv, dict(env), grace_s
        self.max_exits, self.exit_window_s = max_exits, exit_window_s
        self.children = [Child(slot) for slot in slots]
        self.signals = 0
        self.stopping_since: float | None = None
        self.code = 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def _start(self, child: Child) -> None:
        slot = child.slot
        env = {**self.env, "FHIR_RERANK_DEVICE": slot.device,
               "CUDA_VISIBLE_DEVICES": slot.cuda_visible}
        argv = [*self.argv, "--name", node_name(os.getpid(), slot.index),
                "--supervisor-pid", str(os.getpid())]
        child.proc = subprocess.Popen(argv, env=env, start_new_session=True)
        child.started, child.restart_at = time.monotonic(), None
        log.info("worker %d on %s started (pid %d, device %s, CUDA_VISIBLE_DEVICES=%r)",
                 slot.index, slot.given, child.proc.pid, slot.device, slot.cuda_visible)

    def _kill_group(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole process group (it and its pool process)."""
        if child.proc is None:
            return
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, child: Child, now: float) -> None:
        """A child exited: clean its group, then restart it later, or give up."""
        assert child.proc is not None
        code = child.proc.returncode
        self._kill_group(child)  # a pool process left behind would hold the device
        if self.stopping_since is not None:
            child.final, child.proc = code, None
            log.info("worker %d on %s stopped (%s)", child.slot.index, child.slot.given,
                     _describe_exit(code))
            return
        child.proc = None
        child.exits = [t for t in child.exits if now - t < self.exit_window_s] + [now]
        if code == CONFIG_ERROR:
            log.error("worker %d on %s stopped on a configuration error (%s); stopping all "
                      "workers", child.slot.index, child.slot.given, _describe_exit(code))
            self._stop(CONFIG_ERROR, now)
            return
        if len(child.exits) >= self.max_exits:
            log.error("worker %d on %s died %d times within %.0f s (last: %s); stopping all "
                      "workers", child.slot.index, child.slot.given, len(child.exits),
                      self.exit_window_s, _describe_exit(code))
            self._stop(1, now)
            return
        delay = min(MAX_BACKOFF_S, 2.0 ** (len(child.exits) - 1))
        child.restart_at = now + delay
        log.warning("worker %d on %s died (%s); restarting it in %.0f s", child.slot.index,
                    child.slot.given, _describe_exit(code), delay)

    def _stop(self, code: int, now: float) -> None:
        """Warm shutdown of every child (Celery finishes the running job)."""
        self.code = max(self.code, code)
        if self.stopping_since is None:
            self.stopping_since = now
        for child in self.children:
            child.restart_at = None
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
            elif child.proc is None and child.final is None:
                child.final = 0  # was waiting to restart: nothing to stop

    def _cold(self) -> None:
        log.warning("second signal: cold shutdown (running jobs go back to their queue)")
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGQUIT)

    def run(self) -> int:
        """Supervise until stopped; the exit code for the `worker` command."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        handled = 0
        try:
            for child in self.children:
                self._start(child)
            while True:
                now = time.monotonic()
                if self.signals > handled:
                    if handled == 0 and self.stopping_since is None:
                        log.info("stopping %d worker(s): each finishes its running job",
                                 len(self.children))
                        self._stop(0, now)
                    else:
                        self._cold()
                    handled = self.signals
                for child in self.children:
                    if child.proc is not None and child.proc.poll() is not None:
                        self._reap(child, now)
                    elif (child.restart_at is not None and now >= child.restart_at
                          and self.stopping_since is None):
                        self._start(child)
                if self.stopping_since is not None:
                    if all(c.proc is None for c in self.children):
                        break
                    if now - self.stopping_since > self.grace_s:
                        log.error("workers still running %.0f s after the stop; killing them",
                                  self.grace_s)
                        for child in self.children:
                            self._kill_group(child)
                        self.code = max(self.code, 1)
                        for child in self.children:
                            if child.proc is not None:
                                child.proc.wait(10)
                                child.final, child.proc = child.proc.returncode, None
                        break
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for child in self.children:  # an exception above: leave nothing running
                if child.proc is not None and child.proc.poll() is None:
                    self._kill_group(child, signal.SIGTERM)
        if self.code == 0 and any(c.final not in (0, None) for c in self.children):
            self.code = 1
        log.info("all device workers stopped (exit code %d)", self.code)
        return self.code


def child_env(overrides: Mapping[str, object], env: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment with its command-line settings as FHIR_RERANK_* variables,
    so each child loads the same settings as the parent did."""
    return {**env, **settings_env(overrides)}


def run_device_workers(devices: list[str], tiers: list[str], overrides: Mapping[str, object],
                       *, pool: str, loglevel: str, log_level: str, grace_s: float,
                       env: Mapping[str, str] | None = None) -> int:
    """Start one `fhir-rerank worker` per device and supervise them (blocks); exit code."""
    env = dict(os.environ if env is None else env)
    if any(d.startswith("cuda:") for d in devices):
        check_cuda_devices(devices, visible_cuda_count(env))
    slots = plan_slots(devices, env.get("CUDA_VISIBLE_DEVICES"))
    argv = [sys.executable, "-m", "adapter.cli", "--log-level", log_level, "worker",
            "--tiers", ",".join(tiers), "--concurrency", "1", "--pool", pool,
            "--loglevel", loglevel]
    log.info("one worker per device: %s on tier(s) %s", ",".join(devices), ",".join(tiers))
    return Supervisor(slots, argv, child_env(overrides, env), grace_s).run()


def die_with_parent(parent_pid: int) -> None:
    """In a child: SIGTERM when the supervisor dies (Linux), and leave at once when it is
    already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's own stop still applies
        pass
    if os.getppid() != parent_pid:
        raise SystemExit("the supervising `fhir-rerank worker --devices` is gone")
