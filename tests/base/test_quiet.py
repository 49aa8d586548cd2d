"""kiln.base.quiet: a latency probe measures only while its step is the only one running, and no
step starts while it measures; it never waits for a neighbour's whole run."""

from __future__ import annotations

import multiprocessing
import threading
import time

from kiln.base.quiet import alone, running


def test_a_step_running_by_itself_is_alone(tmp_path):
    with running(tmp_path):
        with alone(tmp_path) as quiet:
            assert quiet is True
        with alone(tmp_path) as quiet:  # its shared hold was given back: a second probe works too
            assert quiet is True


def test_outside_a_build_there_is_nothing_to_share_with(tmp_path):
    with alone(tmp_path) as quiet:
        assert quiet is True


def _hold_in_thread(root, started: threading.Event, release: threading.Event) -> threading.Thread:
    def step():
        with running(root):
            started.set()
            release.wait(10)

    thread = threading.Thread(target=step)
    thread.start()
    assert started.wait(10)
    return thread


def test_another_step_in_a_thread_makes_the_probe_give_up_at_once(tmp_path):
    started, release = threading.Event(), threading.Event()
    neighbour = _hold_in_thread(tmp_path, started, release)
    try:
        with running(tmp_path):
            began = time.monotonic()
            with alone(tmp_path) as quiet:
                assert quiet is False
            assert time.monotonic() - began < 1.0  # did not wait for the neighbour
    finally:
        release.set()
        neighbour.join()
    with running(tmp_path), alone(tmp_path) as quiet:  # the neighbour is gone
        assert quiet is True


def _step_in_process(root, ready, release):
    with running(root):
        ready.set()
        release.wait(10)


def test_another_step_in_a_worker_process_counts_too(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_step_in_process, args=(tmp_path, ready, release))
    worker.start()
    try:
        assert ready.wait(30)
        with running(tmp_path), alone(tmp_path) as quiet:
            assert quiet is False
    finally:
        release.set()
        worker.join(30)
    assert worker.exitcode == 0


def test_no_step_starts_while_a_probe_measures(tmp_path):
    entered = []
    measuring, done = threading.Event(), threading.Event()

    def late_step():
        measuring.wait(10)
        with running(tmp_path):
            entered.append(time.monotonic())

    late = threading.Thread(target=late_step)
    late.start()
    with running(tmp_path):
        with alone(tmp_path) as quiet:
            assert quiet is True
            measuring.set()
            time.sleep(0.3)  # the late step tries to start meanwhile
            assert entered == []
            ended = time.monotonic()
        done.set()
    late.join(10)
    assert entered and entered[0] >= ended


def test_two_probes_at_once_do_not_deadlock(tmp_path):
    results = []
    barrier = threading.Barrier(2)

    def step():
        with running(tmp_path):
            barrier.wait(10)
            with alone(tmp_path) as quiet:
                results.append(quiet)

    threads = [threading.Thread(target=step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 2 and False in results  # at most one measured while the other ran
