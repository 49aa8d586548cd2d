"""validate when the format's runtime does not exist on this machine: the build fails with "not
validated: <reason>" unless the target accepts that, and then the artifact is published with the
reason in validation.json and the report. Inputs as the manifest says them: a stateful model (state
batched on axis 1, a scalar input) validates per sample. The report-only latency probe never fails a
validated target: when it cannot run, the report says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.build_rules.validate import Validate, ValidateParams
from kiln.errors import StepError
from kiln.rules import RunContext
from kiln.formats import target_format
from kiln.runtime.runners import RuntimeUnavailable


def _params(**more) -> ValidateParams:
    return ValidateParams(target="ir", format="openvino", precision="fp32", hardware="cpu", metrics=["min_cosine"],
                          outputs=["y"], thresholds={"min_cosine": 0.99}, **more)


@pytest.fixture
def no_runtime(monkeypatch, tmp_path: Path):
    def unavailable(*args, **kwargs):
        raise RuntimeUnavailable("OpenVINO has no CPU device on this machine (it has [])")

    monkeypatch.setattr(target_format("openvino"), "open_runner", unavailable)
    (tmp_path / "model.xml").write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    inputs = {"model": [tmp_path / "model.xml", tmp_path / "model.bin"], "reference": [tmp_path / "reference.safetensors"]}
    out = tmp_path / "out"
    out.mkdir()
    outputs = {"artifact": out / "model.xml", "validation": out / "validation.json", "weights": out / "model.bin"}
    return inputs, outputs, RunContext(tmp_path, "m/ir/validate")


def test_no_runtime_fails_the_build_naming_the_switch(no_runtime):
    inputs, outputs, ctx = no_runtime
    with pytest.raises(StepError) as caught:
        Validate().run(inputs, outputs, _params(), ctx)
    assert "not validated: OpenVINO has no CPU device on this machine" in str(caught.value)
    assert "targets.ir.allow_unvalidated = true" in str(caught.value)
    assert not any(p.exists() for p in outputs.values())


def test_an_accepted_unvalidated_artifact_is_published_with_the_reason(no_runtime):
    inputs, outputs, ctx = no_runtime
    info = Validate().run(inputs, outputs, _params(allow_unvalidated=True), ctx)
    assert outputs["artifact"].read_text() == "<net/>" and outputs["weights"].read_bytes() == b"\0" * 8
    written = json.loads(outputs["validation"].read_text())
    assert written == {"target": "ir", "validated": False, "not_validated": "OpenVINO has no CPU device on this machine (it has [])", "passed": None}
    assert info["not_validated"].startswith("OpenVINO has no CPU device")


def test_the_manifest_switch_reaches_only_the_validate_step():
    from workspaces import make_plan

    before = {s.id for s in make_plan().steps}
    after = make_plan(lambda d: d["targets"]["openvino_fp32"].__setitem__("allow_unvalidated", True))
    changed = [s for s in after.steps if s.id not in before]
    assert [(s.rule, s.targets) for s in changed] == [("validate", ["openvino_fp32"])]
    assert changed[0].params["allow_unvalidated"] is True


# ---- inputs as the manifest says them: a stateful model, batched on axis 1, with a scalar ---------

STATEFUL = '''
import torch


class Cell(torch.nn.Module):
    """x [batch, 4], state [2, batch, 8], scale [] -> y [batch, 4], new_state [2, batch, 8]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x, state, scale):
        new_state = torch.tanh(self.inp(x).unsqueeze(0) + self.mix(state)) * scale
        return self.out(new_state.sum(0)), new_state


def build():
    return Cell()
'''

STATEFUL_MANIFEST = '''
[model]
name = "cell"

[source]
kind = "torch"
factory = "cell:build"

[[inputs]]
name = "x"
shape = ["batch", 4]

[[inputs]]
name = "state"
shape = [2, "batch", 8]

[[inputs]]
name = "scale"
shape = []

[[outputs]]
name = "y"
shape = ["batch", 4]

[[outputs]]
name = "new_state"
shape = [2, "batch", 8]

[targets.onnx_fp32]
format = "onnx"

[validation]
data = "data/cell.npz"
batch_size = 4
'''


def stateful_workspace(root: Path):
    import numpy as np

    from conftest import new_workspace

    ws = new_workspace(root, {"cell": STATEFUL_MANIFEST})
    (ws.root / "cell.py").write_text(STATEFUL)
    rng = np.random.default_rng(0)
    np.savez(ws.root / "manifests/data/cell.npz", x=rng.standard_normal((10, 4)).astype(np.float32),
             state=rng.standard_normal((2, 10, 8)).astype(np.float32), scale=np.array(0.5, np.float32))
    return ws


def test_a_stateful_model_with_a_scalar_builds_and_validates_per_sample(tmp_path: Path):
    from kiln.native.safetensors import load_file

    ws = stateful_workspace(tmp_path / "ws")
    ws.doit("build", "manifest=manifests/cell.toml")
    report = ws.report("cell")
    (artifact,) = report["artifacts"]
    assert artifact["passed"] is True and artifact["status"] == "ran"
    # rows: one per sample for y, one per layer per sample for the state (its batch axis moved first)
    assert artifact["metrics"]["y"]["rows"] == 10 and artifact["metrics"]["new_state"]["rows"] == 20
    assert artifact["metrics"]["new_state"]["min_cosine"] > 0.9999
    reference = next(s for s in report["steps"] if s["step"].endswith("reference_outputs"))
    assert reference["info"] == {"samples": 10, "batches": 3}
    assert artifact["latency"]["shape"] == {"x": [1, 4], "state": [2, 1, 8], "scale": []}
    validation = json.loads((ws.root / "build/cell/onnx_fp32/validation.json").read_text())
    assert validation["samples"] == 10
    stored = load_file(str(next((ws.root / "build/.steps").glob("reference_outputs-*/reference.safetensors"))))
    assert [stored[f"{b:05d}/in/state"].shape for b in range(3)] == [(2, 4, 8), (2, 4, 8), (2, 2, 8)]
    assert stored["00002/out/new_state"].shape == (2, 2, 8) and stored["00000/in/scale"].shape == ()


# ---- the latency probe never fails a validated target ---------------------------------------------

FIXED_BATCH_MANIFEST = '''
[model]
name = "fixed"

[source]
kind = "onnx"
path = "models/fixed.onnx"

[[inputs]]
name = "x"
shape = ["batch", 6]

[[outputs]]
name = "y"
shape = ["batch", 6]

[targets.fp32]
format = "onnx"

[validation]
data = "data/fixed.npz"
batch_size = 4
'''


def fixed_batch_model(path: Path) -> None:
    """y = reshape(x, [4, 6]) + 1: declared dynamic, but only runs with exactly 4 samples, so the
    validation (batches of 4) passes while a one-sample latency probe cannot run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "four"], ["r"]), helper.make_node("Add", ["r", "one"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [numpy_helper.from_array(np.array([4, 6], np.int64), "four"), numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_latency_probe_that_cannot_run_records_why_and_the_build_passes(tmp_path: Path):
    import numpy as np

    from conftest import new_workspace

    ws = new_workspace(tmp_path / "ws", {"fixed": FIXED_BATCH_MANIFEST})
    fixed_batch_model(ws.root / "manifests/models/fixed.onnx")
    np.savez(ws.root / "manifests/data/fixed.npz", x=np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32))
    ws.doit("build", "manifest=manifests/fixed.toml")
    (artifact,) = ws.report("fixed")["artifacts"]
    assert artifact["passed"] is True and (ws.root / "build/fixed/fp32/model.onnx").exists()
    skipped = artifact["latency"]["skipped"]
    assert skipped.startswith("latency not measured: ") and "\n" not in skipped and "Got: 1 Expected: 4" in skipped


def test_a_latency_probe_that_raises_is_reported_not_raised(no_runtime, monkeypatch):
    """Whatever the format's probe raises after publishing, the validated target stays published."""
    import numpy as np

    from kiln.native.safetensors import save_file

    inputs, outputs, ctx = no_runtime
    monkeypatch.setattr(target_format("openvino"), "open_runner", lambda artifact: lambda feed: {"y": feed["x"] * 2})

    def broken(artifact, feed):
        raise RuntimeError("probe exploded\nsecond line")

    monkeypatch.setattr(target_format("openvino"), "latency", broken)
    x = np.ones((3, 2), np.float32)
    save_file({"00000/in/x": x, "00000/out/y": x * 2}, str(inputs["reference"][0]))
    info = Validate().run(inputs, outputs, _params(), ctx)
    assert info["passed"] is True and info["samples"] == 3
    assert info["latency"] == {"skipped": "latency not measured: probe exploded second line"}
    assert outputs["artifact"].exists() and json.loads(outputs["validation"].read_text())["passed"] is True


@pytest.mark.parametrize("factor,passed", [(2.0, True), (-2.0, False)])
def test_a_runner_that_holds_something_open_is_closed_whether_the_gate_passes_or_fails(no_runtime, monkeypatch, factor: float, passed: bool):
    """A pmml runner holds a JVM; a failed gate's traceback would keep the runner, and the JVM, alive."""
    import numpy as np

    from kiln.native.safetensors import save_file

    inputs, outputs, ctx = no_runtime
    closed = []

    def open_runner(artifact):
        def run(feed):
            return {"y": feed["x"] * factor}

        run.close = lambda: closed.append(True)
        return run

    monkeypatch.setattr(target_format("openvino"), "open_runner", open_runner)
    monkeypatch.setattr(target_format("openvino"), "latency", lambda artifact, feed: None)
    x = np.ones((3, 2), np.float32)
    save_file({"00000/in/x": x, "00000/out/y": x * 2}, str(inputs["reference"][0]))
    if passed:
        assert Validate().run(inputs, outputs, _params(), ctx)["passed"] is True
    else:
        with pytest.raises(StepError, match="validation failed"):
            Validate().run(inputs, outputs, _params(), ctx)
    assert closed == [True]
