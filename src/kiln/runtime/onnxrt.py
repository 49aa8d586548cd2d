"""onnxruntime sessions made the same way everywhere kiln runs a model."""

from __future__ import annotations

from pathlib import Path


def session(model: Path | bytes, optimize: bool = True, threads: int = 1, spinning: bool = True):
    """A CPU session. One intra-op thread by default: reductions then run in a fixed order, so the
    validation metrics kiln reports are the same on every run and every machine size.
    spinning=False: idle worker threads sleep instead of spinning, which latency probes use: two
    spinning sessions (or other busy processes) on a small machine steal each other's cores and
    made side-by-side timings depend on the order they ran in (fp32 BERT read 75 ms instead of 24)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"])
