"""Latency of a model's quantized ONNX artifacts next to its fp32 one, measured together.

    python benchmarks/bench_quantized_latency.py [--build build/bert] [--sequence 128] [--threads 2] [--runs 40]

Every build/<model>/<target>/model.onnx is loaded into its own onnxruntime CPU session (the given
threads, idle threads sleeping rather than spinning, as kiln's latency probe runs them) and run on
batch 1 of the given sequence length (token ids 2000, mask all ones: a BERT-style text model's
inputs; other inputs are filled from their declared shapes with zeros). The runs are interleaved
round by round, so a busy moment on the machine hits every artifact alike, and each artifact's
median and 10th percentile are printed with its size and its ratio to the fp32 artifact's median.
The report's own latency (validate) is measured on the first validation sample in separate steps,
possibly in separate builds: this script is the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def feed_for(session, sequence: int) -> dict[str, np.ndarray]:
    feed = {}
    for spec in session.get_inputs():
        shape = [1 if i == 0 else sequence if not isinstance(d, int) else d for i, d in enumerate(spec.shape)]
        dtype = np.int64 if "int64" in spec.type else np.int32 if "int32" in spec.type else np.float32
        value = np.zeros(shape, dtype)
        if spec.name == "input_ids":
            value[...] = 2000
        elif spec.name == "attention_mask":
            value[...] = 1
        feed[spec.name] = value
    return feed


def main() -> None:
    from kiln.runtime.onnxrt import session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=REPO / "build" / "bert")
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    models = {p.parent.name: p for p in sorted(args.build.glob("*/model.onnx"))}
    if not models:
        raise SystemExit(f"no */model.onnx under {args.build}: build the model first (kiln build)")
    sessions = {name: session(path, threads=args.threads, spinning=False) for name, path in models.items()}
    feeds = {name: feed_for(s, args.sequence) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[name])
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    fp32 = next((name for name in medians if name.endswith("fp32")), None)
    print(f"batch 1, sequence {args.sequence}, {args.threads} threads, {args.runs} interleaved runs each")
    print(f"{'artifact':20s} {'size MB':>8s} {'median ms':>10s} {'p10 ms':>8s} {'vs ' + (fp32 or 'fp32'):>16s}")
    for name, median in medians.items():
        ratio = f"{median / medians[fp32]:.2f}x" if fp32 else "-"
        print(f"{name:20s} {models[name].stat().st_size / 1e6:8.1f} {median:10.2f} {1000 * np.percentile(times[name], 10):8.2f} {ratio:>16s}")


if __name__ == "__main__":
    main()
