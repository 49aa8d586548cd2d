"""Memory-aware parallel builds: a step reserves the memory its rule says it needs before it runs,
and waits while the reservations of steps already running (in any doit worker, thread or process)
would not leave room for it.

The ledger is build/.kiln/memory.json, changed only under an flock on build/.kiln/memory.lock, so
doit's worker processes and threads share one budget. Entries of processes that died are pruned.
The budget is KILN_MEMORY_MIB, or 75% of the machine's memory. A step always runs when nothing else
is reserved, even if it alone needs more than the budget: waiting would never help it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

from kiln.base.fsio import write_bytes_atomic
from kiln.base.paths import state_dir
from kiln.base.temps import pid_alive

_tokens = itertools.count()


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
