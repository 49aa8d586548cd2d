"""A tiny model with the reference file validation would make for it, for the scan and the
accuracy-budget fallback: tiny_onnx's layers, one of them made far more sensitive than the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import tiny_onnx
from kiln.native.safetensors import save_file
from kiln.runtime.onnxrt import session

BUDGET = {"outputs": ["Y"], "metrics": ["max_abs_diff", "mean_cosine", "min_cosine"]}


def sensitive_model(folder: Path) -> Path:
    """tiny_onnx's model with one weight column of fc1 100x the others: per-channel int8 does not
    care, but per-tensor activation ranges and int4 blocks downstream do."""
    path = tiny_onnx.tiny_model(folder / "fp32.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "W1":
            w = numpy_helper.to_array(init).copy()
            w[:, 3] *= 100.0
            init.CopyFrom(numpy_helper.from_array(w, "W1"))
    onnx.save(model, str(path))
    return path


def reference(folder: Path, model: Path, batches: int = 3) -> Path:
    """reference_outputs' file for `model`: the fp32 model's own outputs on random inputs."""
    rng = np.random.default_rng(7)
    sess = session(model)
    tensors = {}
    for b in range(batches):
        x = rng.standard_normal((5, 4, tiny_onnx.K)).astype(np.float32)
        tensors[f"{b:05d}/in/X"] = x
        tensors[f"{b:05d}/out/Y"] = sess.run(["Y"], {"X": x})[0]
    path = folder / "reference.safetensors"
    save_file(tensors, str(path))
    return path


def calibration(folder: Path, model: Path, refs: Path) -> Path:
    """calibrate's file for `model`: every weight layer's input observed on the reference inputs."""
    from kiln.native.calibration import Calibration
    from kiln.runtime.onnx_graph import layers_to_quantize, load, with_outputs
    from kiln.runtime.reference import reference_batches

    proto = load(model)
    activations = sorted({layer.activation for layer in layers_to_quantize(proto, [], "t")})
    sess = session(with_outputs(proto, activations))
    observed = Calibration(256)
    for feed, _ in reference_batches(refs):
        for name, value in zip(activations, sess.run(activations, feed)):
            observed.update(name, value)
    path = folder / "calibration.json"
    path.write_text(observed.to_json())
    return path
