"""kiln.runtime.reference.ReferenceSet.measure: the order batches run in never changes a complete
measurement, and a gate that more data can only make worse stops a failing one early."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.native.safetensors import save_file
from kiln.runtime.reference import ReferenceSet


def reference_file(tmp_path, batches: int = 5):
    rng = np.random.default_rng(0)
    tensors = {}
    for b in range(batches):
        x = rng.standard_normal((4 + b, 6)).astype(np.float32)
        tensors[f"{b:05d}/in/x"] = x
        tensors[f"{b:05d}/out/y"] = (x * 2.0).astype(np.float32)
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path))
    return path


def noisy(bad_batch_rows: int | None = None, seed: int = 1):
    """A runner a little off everywhere; far off on the batch with that many rows."""
    rng = np.random.default_rng(seed)

    def run(feed):
        x = feed["x"]
        y = x * 2.0 + rng.standard_normal(x.shape).astype(np.float32) * 0.01
        if x.shape[0] == bad_batch_rows:
            y = -y
        return {"y": y.astype(np.float32)}

    return run


def test_any_order_gives_the_file_order_metrics_bit_for_bit(tmp_path):
    refs = ReferenceSet(reference_file(tmp_path), ["y"], None, "t/validate")
    want = refs.measure(noisy(seed=3)).metrics
    for order in ([4, 2], [3, 0, 1, 2, 4], []):
        got = refs.measure(noisy(seed=3) if not order else _replay(refs, order, seed=3), order=order)
        assert got.complete and got.metrics == want
    assert refs.metrics(noisy(seed=3)) == want


def _replay(refs, order, seed):
    """The same outputs per batch as noisy(seed) gives in file order, whatever order asks for them."""
    outputs = {}
    run = noisy(seed=seed)
    for feed, _ in refs.batches:
        outputs[feed["x"].shape[0]] = run(feed)
    return lambda feed: outputs[feed["x"].shape[0]]


def test_a_failed_minimum_gate_stops_at_the_first_batch_that_fails_it(tmp_path):
    refs = ReferenceSet(reference_file(tmp_path), ["y"], None, "t/validate")
    ran = []

    def run(feed):
        ran.append(feed["x"].shape[0])
        return noisy(bad_batch_rows=7)(feed)

    measured = refs.measure(run, stop_on={"min_cosine": 0.99, "mean_cosine": 0.99}, order=[3])  # batch 3 has 7 rows
    assert ran == [7] and not measured.complete and measured.metrics["y"]["min_cosine"] < 0
    ran.clear()
    measured = refs.measure(run, stop_on={"mean_cosine": 0.5})  # a mean can recover: no stop
    assert ran == [4, 5, 6, 7, 8] and measured.complete and set(measured.batch_worst) == {0, 1, 2, 3, 4}
    assert measured.batch_worst[3] < 0 < min(v for i, v in measured.batch_worst.items() if i != 3)


@pytest.mark.parametrize("passing", [True, False])
def test_a_passing_run_is_measured_whole(tmp_path, passing):
    refs = ReferenceSet(reference_file(tmp_path), ["y"], None, "t/validate")
    measured = refs.measure(noisy(bad_batch_rows=None if passing else 4), stop_on={"min_cosine": 0.9})  # 4 rows: batch 0
    assert measured.complete == passing


def test_a_concurrent_runner_gives_the_sequential_measurement_and_stops_at_the_same_batch(tmp_path, monkeypatch):
    import threading

    from kiln.runtime import reference
    from kiln.runtime.reference import concurrent_runner

    monkeypatch.setattr(reference, "BATCH_WORKERS", 3)
    refs = ReferenceSet(reference_file(tmp_path, batches=7), ["y"], None, "t/validate")
    outputs = {feed["x"].shape[0]: noisy(bad_batch_rows=6, seed=4)(feed) for feed, _ in refs.batches}
    together = threading.Barrier(2, timeout=10)  # the first two calls must be in flight at once
    calls = iter(range(10**6))

    def run(feed):
        if next(calls) < 2:
            together.wait()
        return outputs[feed["x"].shape[0]]

    sequential = refs.measure(lambda feed: outputs[feed["x"].shape[0]])
    concurrent = refs.measure(concurrent_runner(run))
    assert concurrent.metrics == sequential.metrics and concurrent.complete
    done = []
    stopped = refs.measure(concurrent_runner(run), stop_on={"min_cosine": 0.9}, progress=lambda d, t: done.append(d))
    assert not stopped.complete and set(stopped.batch_worst) == {0, 1, 2} and done == [1, 2, 3]  # 6 rows: batch 2
