"""validate when the format's runtime does not exist on this machine: the build fails with "not
validated: <reason>" unless the target accepts that, and then the artifact is published with the
reason in validation.json and the report."""

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
