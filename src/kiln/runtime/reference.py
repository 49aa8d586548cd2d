"""The reference file (reference_outputs' safetensors: every validation batch's inputs and the source
model's outputs) read back, and the gate metrics of any runner measured on it: what validation
publishes by, and what the quantizers' sensitivity scan and accuracy-budget search measure with, so
the three agree to the last digit when they run the same model the same way."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from kiln.errors import StepError

# Batches a concurrent runner computes at once: the cores validation's one-thread sessions leave idle.
BATCH_WORKERS = max(1, min(4, os.cpu_count() or 1))


def batch_axes(path: Path) -> dict[str, dict[str, int | None]]:
    """Where each input and output of the reference file has its samples (reference_outputs'
    "batch_axes" metadata); a file without it has every tensor batched on axis 0, which is what a
    name absent from these dicts means to their readers."""
    from kiln.native.safetensors import safe_open

    with safe_open(str(path)) as f:
        stored = (f.metadata() or {}).get("batch_axes")
    return json.loads(stored) if stored else {"inputs": {}, "outputs": {}}


def reference_batches(path: Path) -> Iterator[tuple[dict, dict]]:
    """Yield (inputs, outputs) per batch from reference_outputs' file, in batch order."""
    from kiln.native.safetensors import load_file

    batches: dict[str, dict[str, dict]] = defaultdict(lambda: {"in": {}, "out": {}})
    for key, value in load_file(str(path)).items():
        batch, kind, name = key.split("/", 2)
        batches[batch][kind][name] = value
    for batch in sorted(batches):
        yield batches[batch]["in"], batches[batch]["out"]


def padding(feed: dict, mask: str | None, axes: dict[str, int | None]):
    """The padding mask of this batch with its batch axis first, as the metrics cut rows."""
    import numpy as np

    if mask is None or mask not in feed or axes.get(mask, 0) is None:
        return None
    return np.moveaxis(feed[mask], axes.get(mask, 0), 0)


class ReferenceSet:
    """The reference file in memory, ready to measure runners against: metrics(run) gives
    {output: {metric: value}} exactly as validation computes them."""

    def __init__(self, path: Path, outputs: list[str], padding_mask: str | None, step: str, max_samples: int | None = None):
        from kiln.runtime.data import sample_count

        self.outputs, self.padding_mask, self.step = outputs, padding_mask, step
        self.axes = batch_axes(path)
        self.batches, self.samples = [], 0
        for feed, expected in reference_batches(path):
            if max_samples is not None and self.samples >= max_samples:
                break
            self.batches.append((feed, expected))
            self.samples += sample_count(feed, self.axes["inputs"])

    def metrics(self, run: Callable[[dict], dict], wanted: list[str] | None = None) -> dict[str, dict[str, Any]]:
        return self.measure(run, wanted).metrics

    def measure(self, run: Callable[[dict], dict], wanted: list[str] | None = None, stop_on: dict[str, float] | None = None,
                order: list[int] | None = None, progress: Callable[[int, int], None] | None = None) -> Measurement:
        """The metrics of `run` over the batches. order: the batch indices to run first (the rest
        follow in file order); the metrics are still folded in file order, so a complete measurement
        is the same to the last bit whatever the order. stop_on: gates; once one batch fails a gate
        that more data can only make worse (metrics.MONOTONE_GATES) or gives NaN/Inf, the rest are
        not run: the measurement is then partial (complete False) but already fails that gate.
        A runner marked concurrent (concurrent_runner) runs BATCH_WORKERS batches at a time; its
        results are taken in the same order all the same, so what ran and what it gave do not depend
        on timing. progress(done, total) after each batch taken."""
        from kiln.runtime.metrics import MONOTONE_GATES, OutputMetrics, failures

        first = [i for i in order or [] if 0 <= i < len(self.batches)]
        sequence = list(dict.fromkeys(first + list(range(len(self.batches)))))
        monotone = {k: v for k, v in (stop_on or {}).items() if k in MONOTONE_GATES}
        parts: dict[int, dict[str, OutputMetrics]] = {}
        for index, part in self._parts(sequence, run):
            parts[index] = part
            if progress is not None:
                progress(len(parts), len(self.batches))
            if stop_on is not None and failures({n: m.summary() for n, m in part.items()}, monotone):
                break
        per_output = {name: OutputMetrics() for name in self.outputs}
        for index in sorted(parts):
            for name, part in parts[index].items():
                per_output[name].extend(part)
        batch_worst = {i: min(m.summary()["min_cosine"] for m in part.values()) for i, part in parts.items()}
        return Measurement({name: select_metrics(m.summary(), wanted) for name, m in per_output.items()},
                           len(parts) == len(self.batches), batch_worst, per_output)

    def _parts(self, sequence: list[int], run: Callable[[dict], dict]) -> Iterator[tuple[int, dict]]:
        """(index, per-output metrics of that batch) in `sequence` order, computed up to
        BATCH_WORKERS ahead when the runner is concurrent. Stopping the iteration early leaves at
        most that many batches computed for nothing."""
        workers = min(BATCH_WORKERS, len(sequence)) if getattr(run, "concurrent", False) else 1
        if workers <= 1:
            for index in sequence:
                yield index, self._batch(index, run)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="kiln-batch") as pool:
            ahead: deque = deque()
            todo = iter(sequence)
            try:
                while True:
                    while len(ahead) < workers and (index := next(todo, None)) is not None:
                        ahead.append((index, pool.submit(self._batch, index, run)))
                    if not ahead:
                        return
                    index, future = ahead.popleft()
                    yield index, future.result()
            finally:
                for _, future in ahead:
                    future.cancel()

    def _batch(self, index: int, run: Callable[[dict], dict]) -> dict:
        from kiln.runtime.metrics import OutputMetrics

        feed, expected = self.batches[index]
        got = run(feed)
        mask = padding(feed, self.padding_mask, self.axes["inputs"])
        metrics = {name: OutputMetrics() for name in self.outputs}
        for name in self.outputs:
            try:
                metrics[name].add(expected[name], got[name], mask, self.axes["outputs"].get(name, 0))
            except ValueError as err:
                raise StepError(self.step, f"output {name!r}: {err}") from None
        return metrics


@dataclass
class Measurement:
    metrics: dict[str, dict[str, Any]]  # {output: {metric: value}}, over the batches run
    complete: bool  # every batch ran (False: stopped early on a failed gate)
    batch_worst: dict[int, float]  # batch index -> its lowest row cosine over the outputs, for the batches run
    per_output: dict[str, Any]  # output -> its kiln.runtime.metrics.OutputMetrics (summary, distribution)


def concurrent_runner(run: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """Marks a runner that several threads may call at once, each call computing what it computes
    alone (an onnxruntime session with a fixed intra-op thread count: Run is thread-safe and each
    batch's arithmetic does not depend on what else runs): ReferenceSet.measure then runs batches
    side by side on the idle cores, with the same results."""
    run.concurrent = True  # type: ignore[attr-defined]
    return run


def select_metrics(summary: dict, wanted: list[str] | None) -> dict:
    if wanted is None:
        return summary
    return {k: v for k, v in summary.items() if k in wanted or k in ("rows", "nonfinite", "mismatched")}


def worst_over_outputs(metrics: dict[str, dict]) -> dict[str, float]:
    """One number per metric over all outputs, the worst of them (what a gate on every output sees):
    the lowest cosine, the largest difference. Counts (rows, nonfinite, mismatched) are left out."""
    worst: dict[str, float] = {}
    for values in metrics.values():
        for metric, value in values.items():
            if metric in ("rows", "nonfinite", "mismatched"):
                continue
            pick = min if metric.endswith("cosine") else max
            worst[metric] = float(value) if metric not in worst else pick(worst[metric], float(value))
    return {k: round(v, 6) for k, v in sorted(worst.items())}


def session_runner(sess, names: list[str], step: str, concurrent: bool = True) -> Callable[[dict], dict]:
    """run(feed) -> {output: value} for an onnxruntime session, fed the model's own inputs out of a
    reference batch; an input the reference file lacks fails the step naming it. concurrent: mark it
    so (concurrent_runner); leave that off for sessions of several intra-op threads, which already
    use the cores (and spin on them)."""
    wanted = [i.name for i in sess.get_inputs()]

    def run(feed: dict) -> dict:
        missing = [name for name in wanted if name not in feed]
        if missing:
            raise StepError(step, f"the validation data has no input {missing[0]!r} the model takes (it has {', '.join(sorted(feed))})")
        return dict(zip(names, sess.run(names, {name: feed[name] for name in wanted})))

    return concurrent_runner(run) if concurrent else run
