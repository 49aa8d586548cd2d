from __future__ import annotations

import json

from conftest import Workspace


def test_schema_is_json_schema_of_the_manifest(workspace: Workspace):
    proc = workspace.kiln("schema")
    assert proc.returncode == 0
    assert set(json.loads(proc.stdout)["properties"]) == {"model", "source", "inputs", "outputs", "targets", "validation", "calibration"}


def test_check_accepts_the_default_manifest(workspace: Workspace):
    proc = workspace.kiln("check", "bert")
    assert proc.returncode == 0 and "ok: model bert, 29 steps, artifacts: build/bert/onnx_fp32/model.onnx, build/bert/onnx_fp16/model.onnx, build/bert/onnx_int8/model.onnx, build/bert/onnx_int8_static/model.onnx, build/bert/onnx_int4/model.onnx, build/bert/torchscript/model.pt, build/bert/torch_export/model.pt2, build/bert/openvino_fp32/model.xml, build/bert/openvino_fp16/model.xml, build/bert/safetensors_fp16/model.safetensors" in proc.stdout


def test_bad_manifest_exits_2_with_one_line_and_writes_nothing(workspace: Workspace):
    workspace.edit("opset = 17", "opset = 99")
    for proc in (workspace.kiln("check", "bert"), workspace.doit("build", "manifest=manifests/bert.toml", check=False)):
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line.endswith("manifests/bert.toml: targets.onnx_fp32.opset: 99 is not allowed; expected less than or equal to 20")
    assert not (workspace.root / "build").exists()


def test_explain_before_any_build(workspace: Workspace):
    proc = workspace.kiln("explain", "bert", "onnx_fp32")
    assert proc.returncode == 0
    assert "run  bert/onnx_fp32+6more/export_onnx: not built yet" in proc.stdout
    bad = workspace.kiln("explain", "bert", "nope")
    assert bad.returncode == 2 and "targets.nope: no such target" in bad.stderr
