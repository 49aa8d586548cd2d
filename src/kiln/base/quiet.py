"""Whether a step is the only one running in its workspace: latency probes time an artifact only
when nothing else of the build competes for the cores.

Builds run steps side by side by default (`kiln build -n`), and a latency probe that ran beside a
scan or another validation would report the neighbour's load as the artifact's speed (and warn
that an int8 model is slower than fp32 when it only shared the cores). So every step holds a shared
flock on build/.kiln/quiet.lock while it runs (running()), and a probe asks for it exclusively,
without waiting (alone()): it gets it only when no other step holds it. A step that cannot probe
alone leaves the probe for the end of the build (kiln.runtime.probes), when nothing else runs.

A turnstile keeps new steps out while a probe runs: a step takes its shared lock while holding
build/.kiln/quiet.gate, which a probe holds for as long as it measures. flock locks belong to an
open file, so threads of one process (doit -P thread) and doit's worker processes alike each hold
their own. Nothing waits on another step's whole run: a probe that is not alone gives up at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

from kiln.base.paths import state_dir

_held = threading.local()  # the shared lock's file descriptor of the step this thread runs


def _open(root: Path, name: str) -> int:
    folder = state_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    return os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def _gate(root: Path) -> Iterator[None]:
    fd = _open(root, "quiet.gate")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def running(root: Path) -> Iterator[None]:
    """Around one step's run: its shared hold on the workspace's quiet lock."""
    fd = _open(root, "quiet.lock")
    try:
        with _gate(root):  # not while a probe is measuring
            fcntl.flock(fd, fcntl.LOCK_SH)
        outer, _held.fd = getattr(_held, "fd", None), fd
        try:
            yield
        finally:
            _held.fd = outer
    finally:
        os.close(fd)


@contextlib.contextmanager
def alone(root: Path) -> Iterator[bool]:
    """True when this step is the only one running; then no other step starts until the block
    ends. False at once otherwise (the caller defers its measurement). Outside running() (a rule
    called directly, as tests do) there is no build to share the cores with: True."""
    own = getattr(_held, "fd", None)
    if own is None:
        yield True
        return
    with _gate(root):
        fcntl.flock(own, fcntl.LOCK_UN)  # our own shared hold must not stand in our way
        probe = _open(root, "quiet.lock")
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                quiet = True
            except BlockingIOError:
                quiet = False
            try:
                yield quiet
            finally:
                if quiet:
                    fcntl.flock(probe, fcntl.LOCK_UN)
                fcntl.flock(own, fcntl.LOCK_SH)  # no exclusive holder now: does not wait
        finally:
            os.close(probe)
