"""kiln.execute.resources: the memory budget (KILN_MEMORY_MIB, else 75% of the machine), reservations
that are given back when their block ends, even by an exception, and that run side by side while they
fit; and the workspace build lock: lock_workspace(wait=False) gets None while another holder has it
(whose pid the lock file names), a file once it is free, the holder closing it or dying frees it, and
a waiting build says whom it waits for and goes on once the holder is done.
(Waiting for memory and pruning dead reservations: tests/test_monorepo.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import _env
from kiln.base.paths import state_dir
from kiln.execute.resources import budget_mib, lock_workspace, reserve


class FakeStep:
    def __init__(self, name: str):
        self.name = name


def ledger(root: Path) -> dict:
    return json.loads((state_dir(root) / "memory.json").read_text())


# ---- the memory budget -------------------------------------------------------------------------

@pytest.mark.parametrize("value, budget", [("1234", 1234), ("65536", 65536), ("0", 1)])
def test_the_budget_is_kiln_memory_mib_when_set(monkeypatch, value: str, budget: int):
    monkeypatch.setenv("KILN_MEMORY_MIB", value)
    assert budget_mib() == budget


@pytest.mark.parametrize("value", [None, ""])
def test_without_kiln_memory_mib_the_budget_is_three_quarters_of_the_machine(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("KILN_MEMORY_MIB", raising=False)
    else:
        monkeypatch.setenv("KILN_MEMORY_MIB", value)
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 20)
    assert abs(budget_mib() - 0.75 * total_mib) <= 1


def test_a_reservation_is_held_in_the_block_and_given_back_after_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")
    with reserve(tmp_path, FakeStep("m/t/export_onnx"), 300):
        assert list(ledger(tmp_path).values()) == [{"pid": os.getpid(), "mib": 300, "step": "m/t/export_onnx"}]
    assert ledger(tmp_path) == {}


def test_a_reservation_is_given_back_when_its_block_raises(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")
    with pytest.raises(RuntimeError, match="the step blew up"):
        with reserve(tmp_path, FakeStep("m/t/validate"), 900):
            assert len(ledger(tmp_path)) == 1
            raise RuntimeError("the step blew up")
    assert ledger(tmp_path) == {}  # else the next step of this (live) process would wait for it forever


def test_reservations_that_fit_together_run_side_by_side(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")
    seen = []

    def nested():
        with reserve(tmp_path, FakeStep("m/a/export_onnx"), 400):
            with reserve(tmp_path, FakeStep("m/b/export_onnx"), 400, poll_s=0.01):
                seen.append(sorted((e["step"], e["mib"]) for e in ledger(tmp_path).values()))

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=30)  # a guard against hanging, not a timing assertion
    assert not worker.is_alive(), "the second reservation waited although both fit in the budget"
    assert seen == [[("m/a/export_onnx", 400), ("m/b/export_onnx", 400)]]
    assert ledger(tmp_path) == {}


# ---- the workspace lock ------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from kiln.execute.resources import lock_workspace
lock = lock_workspace(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.readline()  # hold it until told
"""


def test_while_another_process_holds_the_lock_wait_false_gets_none_and_the_file_names_it(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_workspace(tmp_path, wait=False) is None
        assert (state_dir(tmp_path) / "build.lock").read_text() == f"pid {holder.pid}"
    finally:
        holder.kill()  # dies holding it: the kernel drops the lock
        holder.wait()
    lock = lock_workspace(tmp_path, wait=False)
    assert lock is not None
    try:
        assert (state_dir(tmp_path) / "build.lock").read_text() == f"pid {os.getpid()}"
    finally:
        lock.close()


def test_a_free_workspace_gives_the_lock_at_once(tmp_path: Path):
    lock = lock_workspace(tmp_path, wait=False)
    assert lock is not None and not lock.closed
    lock.close()


def test_the_lock_is_free_again_once_its_holder_closes_it(tmp_path: Path):
    holder = lock_workspace(tmp_path)
    assert lock_workspace(tmp_path, wait=False) is None
    holder.close()
    again = lock_workspace(tmp_path, wait=False)
    assert again is not None
    again.close()


def test_a_waiting_build_says_whom_it_waits_for_and_goes_on_when_the_holder_is_done(tmp_path: Path, capsys):
    holder = lock_workspace(tmp_path)
    order: list[str] = []
    got = []

    def second_build():
        got.append(lock_workspace(tmp_path))
        order.append("second has the lock")

    waiter = threading.Thread(target=second_build, daemon=True)
    waiter.start()
    said, deadline = "", time.monotonic() + 30
    while "kiln: waiting" not in said and time.monotonic() < deadline:  # until it says it waits (then it blocks)
        said += capsys.readouterr().err
        time.sleep(0.01)
    assert f"kiln: waiting for another build of this workspace to finish (pid {os.getpid()})" in said
    order.append("first lets go")
    holder.close()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert order == ["first lets go", "second has the lock"]
    assert got[0] is not None and (state_dir(tmp_path) / "build.lock").read_text() == f"pid {os.getpid()}"
    got[0].close()


def test_a_step_waits_while_running_steps_hold_the_memory_budget(tmp_path: Path, monkeypatch, capsys):
    from kiln.execute.resources import reserve

    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")

    class Step:
        def __init__(self, name):
            self.name = name

    order: list[str] = []
    first_in = threading.Event()

    def first():
        with reserve(tmp_path, Step("m/a/export_onnx"), 600):
            order.append("first starts")
            first_in.set()
            time.sleep(0.5)
            order.append("first ends")

    def second():
        first_in.wait()
        with reserve(tmp_path, Step("m/b/export_onnx"), 600, poll_s=0.02):
            order.append("second starts")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first starts", "first ends", "second starts"]
    assert "m/b/export_onnx waits for memory: needs 600 MiB, 600 of 1000 MiB reserved by m/a/export_onnx" in capsys.readouterr().err
    with reserve(tmp_path, Step("alone"), 5000):  # more than the budget, but nothing else runs: it goes
        pass


def test_reservations_of_dead_processes_are_dropped(tmp_path: Path, monkeypatch):
    from kiln.execute.resources import reserve

    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")
    state = tmp_path / "build/.kiln"
    state.mkdir(parents=True)
    (state / "memory.json").write_text(json.dumps({"gone": {"pid": 2 ** 22 + 12345, "mib": 900, "step": "crashed"}}))

    class Step:
        name = "m/a/validate"

    started = time.monotonic()
    with reserve(tmp_path, Step(), 600):
        pass
    assert time.monotonic() - started < 1.0


def test_default_jobs_is_the_cores_up_to_4_or_kiln_jobs(monkeypatch):
    from kiln.errors import UsageError
    from kiln.execute.resources import default_jobs

    monkeypatch.delenv("KILN_JOBS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_jobs() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_jobs() == 1
    monkeypatch.setenv("KILN_JOBS", "3")
    assert default_jobs() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KILN_JOBS", bad)
        with pytest.raises(UsageError, match=f"KILN_JOBS: '{bad}': expected a whole number"):
            default_jobs()
