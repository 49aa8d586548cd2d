"""kiln.plan.steps.critical_first (the order doit is given the tasks: long chains start first under
-n) and the validation batching order the reference step is planned with."""

from __future__ import annotations

from pathlib import Path

from kiln.plan.steps import Step, critical_first, seconds_after
from workspaces import make_plan


def _step(name: str, deps: list[str] = ()) -> Step:
    return Step(id=name, rule=name, params={}, inputs={}, outputs={"out": Path(f"/ws/{name}")}, model="m", deps=list(deps))


def test_the_step_heading_the_longest_chain_comes_first_ties_in_plan_order():
    reference = _step("reference")
    export = _step("export")
    simplify = _step("simplify", ["export"])
    calibrate = _step("calibrate", ["simplify"])
    quantize = _step("quantize", ["calibrate", "reference"])
    check_fp32 = _step("check_fp32", ["simplify", "reference"])
    steps = [reference, export, simplify, check_fp32, calibrate, quantize]
    order = [s.id for s in critical_first(steps, lambda s: 1.0)]
    assert order == ["export", "simplify", "reference", "calibrate", "check_fp32", "quantize"]
    # a known-long step pulls its chain forward
    heavy = {"reference": 30.0}
    assert [s.id for s in critical_first(steps, lambda s: heavy.get(s.id, 1.0))][0] == "reference"


def test_seconds_after_a_step_is_its_longest_chain_of_dependents_without_itself():
    """What orders the torch lock: the export (1 s) heads a 3 s chain, reference_outputs (5 s) a 1 s
    one, so the export goes first and its chain runs beside reference_outputs."""
    reference, export = _step("reference"), _step("export")
    simplify = _step("simplify", ["export"])
    check = _step("check", ["simplify", "reference"])
    seconds = {"reference": 5.0, "export": 1.0, "simplify": 2.0, "check": 1.0}
    after = seconds_after([reference, export, simplify, check], lambda s: seconds[s.id])
    assert after == {"reference": 1.0, "export": 3.0, "simplify": 1.0, "check": 0.0}
    assert [s.id for s in critical_first([reference, export, simplify, check], lambda s: seconds[s.id])][0] == "reference"


def test_every_step_comes_after_its_dependencies():
    for plan in (make_plan(),):
        order = critical_first(plan.steps, lambda s: 1.0)
        assert len(order) == len(plan.steps)
        position = {s.id: i for i, s in enumerate(order)}
        for step in order:
            assert all(position[d] < position[step.id] for d in step.deps), step.name


def test_validation_text_keeps_file_order_for_the_first_batch_and_the_scanned_samples():
    reference = next(s for s in make_plan().steps if s.rule == "reference_outputs")
    assert reference.params["by_length_after"] == 64  # bert.toml: batch_size 32, scan_samples 64 (fallback auto)

    def no_fallback(data):
        for target in data["targets"].values():
            (target.get("options") or {}).pop("fallback", None)

    reference = next(s for s in make_plan(no_fallback).steps if s.rule == "reference_outputs")
    assert reference.params["by_length_after"] == 32  # the first batch only

    def bigger_scan(data):
        data["targets"]["onnx_int4"]["options"]["scan_samples"] = 100

    assert next(s for s in make_plan(bigger_scan).steps if s.rule == "reference_outputs").params["by_length_after"] == 100
