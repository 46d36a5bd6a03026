"""The ``math_verify`` worker pool: equivalence checks in subprocesses with wall-clock deadlines.

:func:`verify` sends one ``(pred, gold)`` pair to a worker subprocess (started on demand, at most
:data:`_MAX_WORKERS`, JSON lines on stdin/stdout) and waits at most ``timeout_s`` seconds; a late worker is SIGKILLed
and replaced, so ``10^{10^{10^{10}}}`` costs ``timeout_s``, never a hang. The calling process never imports sympy.
Workers also set their own CPU-time and address-space limits in case the parent dies mid-request. A forked child
starts its own pool; :func:`shutdown` (also run at exit) kills the idle workers. Thread-safe; POSIX only.

Stdlib only: a worker runs this file by path, so importing it must not import the package (nor torch).
:mod:`pte.data.rewards` decides what reaches it (only what its in-process fast path cannot settle).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["shutdown", "verify"]

_STARTUP_TIMEOUT_S = 120.0
_MAX_WORKERS = min(32, max(4, os.cpu_count() or 1))
_WORKER_CPU_BACKSTOP_S = 30
_WORKER_MEMORY_BYTES = 4 << 30
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")

# Worker side runs this file by path, not ``-m pte.data.verifier``: the package __init__ may import torch.
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='_pte_reward_worker')['_worker_main']()"


class _WorkerCrashed(Exception):
    """The worker died or broke the protocol (as opposed to missing its deadline)."""


class _Worker:
    """One subprocess speaking JSON lines on stdin/stdout; used by one thread at a time."""

    def __init__(self) -> None:
        # -P keeps the working directory off sys.path; a new session keeps a terminal's Ctrl-C away from workers.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _BOOT, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"},
            start_new_session=True,
        )
        self.buf = b""
        self.ready = False

    def read_line(self, deadline: float) -> bytes | None:
        """Next line from the worker, or None at the deadline; raises _WorkerCrashed on EOF."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        poller = select.poll()  # not select.select: fds above 1024 are common in training processes
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _WorkerCrashed("worker closed its output")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            line = self.read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        except _WorkerCrashed:
            line = b'{"error": "worker exited during start-up"}'
        msg = json.loads(line) if line else {"error": f"no start-up within {_STARTUP_TIMEOUT_S:.0f} s"}
        if not msg.get("ready"):
            raise RuntimeError(f"math_verify worker failed to start ({msg.get('error')}); check that "
                               f"'math-verify[antlr4_9_3]==0.9.0' is installed for {sys.executable}")
        self.ready = True

    def request(self, pred: str, gold: str, timeout_s: float) -> bool | None:
        """math_verify's verdict, or None at the deadline; raises _WorkerCrashed if the worker dies."""
        deadline = time.monotonic() + timeout_s
        payload = json.dumps({"pred": pred, "gold": gold, "cpu_s": timeout_s}).encode() + b"\n"
        try:
            self.proc.stdin.write(payload)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError as exc:
            raise _WorkerCrashed("worker input closed") from exc
        line = self.read_line(deadline)
        try:
            return None if line is None else bool(json.loads(line)["result"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _WorkerCrashed(f"bad worker reply {line!r:.100}") from exc

    def kill(self) -> None:
        self.proc.kill()  # no-op if it already exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # reap it; a process stuck in the kernel is left to init
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


class _WorkerPool:
    """At most ``max_workers`` workers, started on demand; each request checks one out. Thread-safe."""

    def __init__(self, max_workers: int) -> None:
        self.slots = threading.BoundedSemaphore(max_workers)
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.closed = False

    def acquire(self) -> _Worker:
        self.slots.acquire()
        try:
            with self.lock:
                ready = [i for i, w in enumerate(self.idle) if w.ready]  # prefer workers done starting up
                worker = self.idle.pop(ready[-1] if ready else -1) if self.idle else None
            return worker or _Worker()
        except BaseException:
            self.slots.release()
            raise

    def release(self, worker: _Worker, healthy: bool) -> None:
        """Return a worker; an unhealthy one (late, crashed, interrupted) is killed and replaced at once."""
        try:
            if not healthy:
                worker.kill()
                worker = _Worker()  # imports start now, before anyone waits on it
            with self.lock:
                if not self.closed:
                    self.idle.append(worker)
                    return
            worker.kill()
        except OSError:
            pass  # could not start a replacement; acquire() starts one on demand
        finally:
            self.slots.release()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.kill()


_POOL: _WorkerPool | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _get_pool() -> _WorkerPool:
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL, _POOL_PID = _WorkerPool(_MAX_WORKERS), os.getpid()
        return _POOL


def shutdown() -> None:
    """Kill the idle worker subprocesses now (also done at exit); the next call starts new ones."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


def _after_fork_in_child() -> None:
    """A forked child starts its own pool; it closes its copies of the parent's pipes but never kills those workers."""
    global _POOL, _POOL_LOCK
    _POOL_LOCK = threading.Lock()  # another thread may have held it at fork time
    for worker in _POOL.idle if _POOL is not None else []:
        for stream in (worker.proc.stdin, worker.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                os.close(stream.fileno())  # type: ignore[union-attr]
    _POOL = None


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):  # POSIX; keeps the import working elsewhere
    os.register_at_fork(after_in_child=_after_fork_in_child)


def verify(pred: str, gold: str, timeout_s: float) -> bool:
    """``math_verify``'s verdict on two cleaned answer strings in a worker, or False at ``timeout_s`` wall-clock
    seconds (the worker is then killed and replaced) or on a crash (after one retry on a fresh worker)."""
    pool = _get_pool()
    for _attempt in range(2):  # a worker killed by something else (OOM killer, a signal) gets one retry
        worker = pool.acquire()
        healthy = False
        try:
            worker.wait_ready()
            verdict = worker.request(pred, gold, timeout_s)
            healthy = verdict is not None
            return bool(verdict)
        except _WorkerCrashed:
            continue
        finally:
            pool.release(worker, healthy)
    return False


def _set_limits(cpu_budget_s: float) -> None:
    """Worker-side backstops in case the parent dies mid-request: CPU seconds per request and address space."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + cpu_budget_s) + _WORKER_CPU_BACKSTOP_S
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
        if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, resource.RLIM_INFINITY))


def _worker_main() -> None:
    """Worker entry point: JSON lines in ``{"pred", "gold", "cpu_s"}``, out ``{"result": bool}``."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    sys.stdout = sys.stderr
    try:
        import logging
        from functools import lru_cache

        from math_verify import parse, verify

        logging.getLogger("math_verify").setLevel(logging.ERROR)

        @lru_cache(maxsize=4096)
        def parse_answer(s: str) -> list[Any]:
            # parsing_timeout/timeout_seconds=None: math_verify's signal.alarm is off; the parent kills us instead.
            wrapped = s if _UNESCAPED_DOLLAR_RE.search(s) else f"${s}$"  # prose with its own $...$ stays as is
            parsed = parse(wrapped, parsing_timeout=None)
            return parsed if parsed or wrapped == s else parse(s, parsing_timeout=None)

        def equivalent(pred: str, gold: str) -> bool:
            return bool(verify(parse_answer(gold), parse_answer(pred), timeout_seconds=None))

        equivalent("(x+1)^2", "x^2+2x+1")  # load sympy's lazy imports before reporting ready
    except Exception as exc:  # reported to the parent, which raises it for the user
        out.write(json.dumps({"error": repr(exc)}) + "\n")
        return
    out.write(json.dumps({"ready": True}) + "\n")
    for line in iter(sys.stdin.readline, ""):
        req = json.loads(line)
        _set_limits(float(req["cpu_s"]))
        try:
            result = equivalent(req["pred"], req["gold"])
        except Exception:  # RecursionError, MemoryError, sympy errors: not equivalent
            result = False
        out.write(json.dumps({"result": result}) + "\n")
