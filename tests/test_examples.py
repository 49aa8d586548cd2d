"""The example manifests besides bert: manifests/tinycnn.toml (a conv net defined in the repo, NCHW
images) builds every CPU format and each one computes the source's function; an ONNX file as the
source of ONNX-to-X targets (fp16, int8, OpenVINO)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import example_workspace

TINYCNN_TARGETS = {"onnx_fp32": 1e-5, "onnx_fp16": 1e-2, "openvino_fp32": 1e-5, "openvino_fp16": 1e-2, "torchscript": 0.0, "torch_export": 0.0,
                   "pytorch_fp16": 1e-2, "tflite_fp32": 1e-5, "tflite_int8": 5e-2, "tflite_int8_static": 5e-2}
# Core ML runs only on Apple platforms: off macOS the package gets a structural check, no metrics.
TINYCNN_STRUCTURAL = {"coreml_fp32", "coreml_fp16"}


@pytest.fixture(scope="module")
def built_tinycnn(tmp_path_factory):
    ws = example_workspace(tmp_path_factory.mktemp("tinycnn") / "ws", "tinycnn")
    ws.doit("build", "manifest=tinycnn")
    return ws


def test_tinycnn_builds_every_cpu_format_validated(built_tinycnn):
    report = built_tinycnn.report("tinycnn")
    assert report["ok"] and {a["target"] for a in report["artifacts"]} == set(TINYCNN_TARGETS) | TINYCNN_STRUCTURAL
    for artifact in report["artifacts"]:
        if artifact["target"] in TINYCNN_STRUCTURAL and sys.platform != "darwin":
            assert artifact["passed"] is True and artifact["metrics"] is None, artifact
            continue
        logits = artifact["metrics"]["logits"]
        assert logits["rows"] == 16 and logits["max_abs_diff"] <= TINYCNN_TARGETS[artifact["target"]], artifact


def test_tinycnn_onnx_keeps_nchw_and_the_dynamic_batch(built_tinycnn):
    import onnx

    model = onnx.load(str(built_tinycnn.root / "build/tinycnn/onnx_fp32/model.onnx"))
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32]
    assert {"Conv", "MaxPool", "GlobalAveragePool"} <= {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into the convs


def _onnx_source_manifest(built_tinycnn, root: Path) -> Path:
    """tinycnn's validated ONNX as the source of a new manifest with ONNX-to-X targets."""
    text = (built_tinycnn.root / "manifests/tinycnn.toml").read_text()
    head, _, _ = text.partition("[targets.onnx_fp32]")
    head = head.replace('name = "tinycnn"', 'name = "tinycnn_onnx"').replace('kind = "torch"', 'kind = "onnx"')
    head = head.replace('factory = "models.tinycnn:build"               # found beside this manifest', 'path = "tinycnn.onnx"')
    targets = '\n'.join(f'[targets.{name}]\nformat = "{fmt}"\nprecision = "{precision}"\n' for name, fmt, precision in (
        ("onnx_fp16", "onnx", "fp16"), ("onnx_int8", "onnx", "int8"), ("openvino_fp32", "openvino", "fp32")))
    ws = example_workspace(root, "tinycnn")
    ws.manifest("tinycnn").unlink()
    shutil.copy(built_tinycnn.root / "build/tinycnn/onnx_fp32/model.onnx", ws.root / "manifests/tinycnn.onnx")
    ws.manifest("tinycnn_onnx").write_text(head + targets + '\n[validation]\ndata = "data/tinycnn.npz"\nbatch_size = 8\n')
    return ws


def test_an_onnx_file_is_the_source_of_onnx_to_x_targets(built_tinycnn, tmp_path: Path):
    ws = _onnx_source_manifest(built_tinycnn, tmp_path / "ws")
    ws.doit("build")
    report = ws.report("tinycnn_onnx")
    assert report["ok"]
    rules = [s["rule"] for s in report["steps"]]
    assert "export_onnx" not in rules and {"convert_fp16", "quantize_dynamic", "convert_openvino"} <= set(rules)
    metrics = {a["target"]: a["metrics"]["logits"] for a in report["artifacts"]}
    assert metrics["openvino_fp32"]["max_abs_diff"] < 1e-5 and metrics["onnx_fp16"]["min_cosine"] > 0.999
    assert metrics["onnx_int8"]["min_cosine"] > 0.9


def test_an_onnx_source_cannot_give_torch_formats(built_tinycnn, tmp_path: Path):
    ws = _onnx_source_manifest(built_tinycnn, tmp_path / "ws")
    ws.edit('[targets.onnx_fp16]', '[targets.ts]\nformat = "torchscript"\n\n[targets.onnx_fp16]', name="tinycnn_onnx")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2 and "tinycnn_onnx.toml: targets.ts.format: 'torchscript' is not allowed" in proc.stderr
