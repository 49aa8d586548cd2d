"""Memory-aware parallel builds: a step reserves the memory its rule says it needs before it runs,
and waits while the reservations of steps already running (in any doit worker, thread or process)
would not leave room for it.

The ledger is build/.kiln/memory.json, changed only under an flock on build/.kiln/memory.lock, so
doit's worker processes and threads share one budget. Entries of processes that died are pruned.
The budget is KILN_MEMORY_MIB, or 75% of the machine's memory. A step always runs when nothing else
is reserved, even if it alone needs more than the budget: waiting would never help it.

A step reserves max(what its rule declares, 1.1 x what it last used) (reservation_mib): what it used
is measured by metered() while it runs and remembered per step id (kiln.state.records.observed_path).

Measuring (metered). A step runs inside a long-lived process (doit's main process, a -n worker, or a
thread of `kiln build -j N`), so the process's lifetime counters would carry earlier steps' numbers:
ru_maxrss is the highest RSS the process ever had. So:
- CPU time is the delta of getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN) over the step: the
  process's threads (torch's and onnxruntime's pools included) and every child it waited for
  (kiln.runtime.child, toolchild, the JVM of pmml: all run through subprocess.run).
- Peak RSS is of the process tree: a thread reads the RSS of the process and of its live
  descendants (/proc/<pid>/statm, /proc/<pid>/task/*/children) every SAMPLE_S. Short peaks between
  samples are caught exactly where the kernel can say: the process's own peak after resetting it at
  the step's start (writing 5 to /proc/self/clear_refs resets VmHWM), and a waited-for child's peak
  when RUSAGE_CHILDREN's ru_maxrss rose during the step. The result is a lower bound of the tree's
  true peak, exact for a step that spawns nothing.
- used_mib is the peak minus the tree's RSS when the step started: what the step added on top of the
  process it ran in (the interpreter and modules earlier steps imported are there anyway), which is
  what a reservation stands for.
- Steps that run in threads of one process at the same time share these counters: such a measurement
  is marked not exclusive, is reported as such, and is neither learned from nor warned about.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kiln.base.fsio import write_bytes_atomic
from kiln.base.paths import state_dir
from kiln.base.temps import pid_alive
from kiln.errors import UsageError
from kiln.state.records import MEMORY_HEADROOM, read_observed, write_observed

_tokens = itertools.count()


def default_jobs() -> int:
    """How many steps a build runs side by side unless told (`kiln build -n`, `doit build -n`):
    KILN_JOBS, else the cores this process may use, at most 4. Most steps keep two threads busy
    (validation and the scans run two one-thread sessions; torch uses every core), but much of a
    build is one core's work (imports, export children, onnxsim, the quantizers' Python), which a
    second step fills: bert's cold build on 2 cores took 147.7 s one step at a time, 125.6 s two at
    a time (artifacts identical). Memory reservations (reserve) still hold a step back when the
    budget is taken; latency probes wait for a quiet machine (kiln.base.quiet)."""
    configured = os.environ.get("KILN_JOBS", "").strip()
    if configured:
        jobs = int(configured) if configured.isdigit() else 0
        if jobs < 1:
            raise UsageError("KILN_JOBS", f"{configured!r}: expected a whole number of parallel steps, 1 or more")
        return jobs
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def budget_mib() -> int:
    configured = os.environ.get("KILN_MEMORY_MIB")
    if configured:
        return max(1, int(configured))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8192
    return int(total * 0.75) >> 20


@contextlib.contextmanager
def reserve(root: Path, step, mib: int, poll_s: float = 0.2):
    """Hold `mib` MiB of the shared budget while the block runs."""
    folder = state_dir(root)
    token = f"{os.getpid()}-{threading.get_ident()}-{next(_tokens)}"
    budget, told = budget_mib(), False
    while True:
        with _locked(folder) as ledger:
            used = sum(e["mib"] for e in ledger.values())
            if not ledger or used + mib <= budget:
                ledger[token] = {"pid": os.getpid(), "mib": mib, "step": step.name}
                break
            holders = ", ".join(sorted(e["step"] for e in ledger.values()))
        if not told:
            print(f"kiln: {step.name} waits for memory: needs {mib} MiB, {used} of {budget} MiB reserved by {holders}", file=sys.stderr)
            told = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        with _locked(folder) as ledger:
            ledger.pop(token, None)


@contextlib.contextmanager
def _locked(folder: Path):
    """The ledger (token -> entry) under an exclusive flock; written back when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "memory.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / "memory.json"
        try:
            ledger = json.loads(path.read_text())
        except (OSError, ValueError):
            ledger = {}
        ledger = {t: e for t, e in ledger.items() if pid_alive(e["pid"])}
        yield ledger
        write_bytes_atomic(path, json.dumps(ledger, sort_keys=True).encode())


def lock_workspace(root: Path, wait: bool = True):
    """One build at a time per workspace: an exclusive flock on build/.kiln/build.lock, held until
    the returned file is closed (or the process dies: the kernel drops the lock, so a killed build
    never blocks the next). A second `doit build` says whom it waits for, then waits; with
    wait=False it gets None instead."""
    folder = state_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / "build.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            lock.close()
            return None
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        print(f"kiln: waiting for another build of this workspace to finish ({holder})", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


# ---- learning from what steps used ---------------------------------------------------------------

def reservation_mib(root: Path, step, declared: int) -> int:
    """MiB a step reserves: what its rule declares, or 10% more than what its last exclusive run
    used, whichever is larger."""
    observed = read_observed(root, step)
    if observed is None:
        return declared
    return max(declared, math.ceil(observed["used_mib"] * MEMORY_HEADROOM))


def remember_usage(root: Path, step, usage: dict[str, Any]) -> None:
    """Keep what a run of the step's rule used for its next reservation; a measurement shared with
    other steps of the process would charge their memory to this step, so it is not kept."""
    if usage.get("exclusive") and usage.get("reserved_mib") is not None:
        with contextlib.suppress(OSError):  # a lost observation costs the next build the declared reservation, no more
            write_observed(root, step, {"rule": step.rule, "used_mib": usage["used_mib"], "peak_rss_mib": usage["peak_rss_mib"]})


# ---- measuring a step ----------------------------------------------------------------------------

SAMPLE_S = 0.05
MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
_MIB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_active: set[int] = set()  # ids of the meters measuring in this process now
_OVERLAPPED: set[int] = set()  # of those, the ones that ran beside another one at some point
_active_lock = threading.Lock()


class Meter:
    """CPU time and peak RSS of the process tree while one step runs (see the module's docstring)."""

    def __init__(self):
        self.started_at = time.time()  # wall clock, for a timeline of the build's steps
        self.reserved_mib: int | None = None  # set when the step's rule takes its reservation
        self.exclusive = True
        self._facts: dict[str, Any] | None = None
        with _active_lock:
            if _active:  # another step of this process runs now: both share the counters
                self.exclusive = False
                _OVERLAPPED.update(_active)
            _active.add(id(self))
        self._hwm_reset = _reset_peak()
        self._self, self._children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        self.base = self.peak = _tree_rss()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="kiln-meter", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, _tree_rss())

    def finish(self) -> dict[str, Any]:
        """Stop measuring (once; later calls give the same facts): {"started_at" (Unix time),
        "cpu_seconds", "peak_rss_mib", "used_mib", "reserved_mib" (None when the rule did not run),
        "exclusive"}."""
        if self._facts is not None:
            return self._facts
        self._stop.set()
        self._sampler.join()
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        with _active_lock:
            _active.discard(id(self))
            self.exclusive = self.exclusive and id(self) not in _OVERLAPPED
            _OVERLAPPED.discard(id(self))
        peak = max(self.peak, _tree_rss())
        if self.exclusive and self._hwm_reset:
            peak = max(peak, _own_peak())
        if children.ru_maxrss > self._children.ru_maxrss:  # a child waited for in this step peaked at that
            peak = max(peak, children.ru_maxrss * MAXRSS_UNIT)
        cpu = sum(getattr(after, f) - getattr(before, f) for before, after in ((self._self, own), (self._children, children))
                  for f in ("ru_utime", "ru_stime"))
        self._facts = {"started_at": round(self.started_at, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mib": round(peak / _MIB, 1),
                       "used_mib": round(max(0, peak - self.base) / _MIB, 1), "reserved_mib": self.reserved_mib,
                       "exclusive": self.exclusive}
        return self._facts


@contextlib.contextmanager
def metered():
    """Measure the block (Meter); the sampler stops however the block ends."""
    meter = Meter()
    try:
        yield meter
    finally:
        meter.finish()


def _reset_peak() -> bool:
    """Reset the process's VmHWM, so it says the peak since now; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _own_peak() -> int:
    """Bytes of the process's VmHWM (its peak RSS since the last reset), 0 if unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(pid: int | None = None) -> int:
    """Bytes resident in the process and its live descendants now (processes that vanish while
    being read count as 0)."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/statm") as f:
            total = int(f.read().split()[1]) * _PAGE
        tasks = os.listdir(f"/proc/{pid}/task")
    except (OSError, ValueError, IndexError):
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        total += sum(_tree_rss(int(child)) for child in children)
    return total
