"""kiln.state.uptodate: is a step up to date, and if not, why. Real steps of real rules
(simplify_onnx, convert_fp16) over small files in a throwaway workspace, with records written the way
kiln.execute.step.run_step writes them. The key decides (a changed input, param or component
rebuilds; so does a record whose key does not match its own components), the outputs must still be
what the record holds, and only then is the change put in words (describe_change, or the last run of
the same rule for the same target when the step id has no record yet)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.base.digests import digest
from kiln.base.fsio import write_json_atomic
from kiln.base.paths import relative
from kiln.plan.steps import Step, identity
from kiln.state import uptodate
from kiln.state.records import last_path, read_record, record_path, write_record
from kiln.state.uptodate import components, describe_change, is_up_to_date, step_key, why

FP16_PARAMS = {"keep_io_types": True, "keep_fp32_ops": []}


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rewrite(path: Path, data: bytes) -> None:
    """New bytes in place, with an mtime the digest cache cannot mistake for the old one."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def make_step(root: Path, rule: str, params: dict, model: str = "m", targets: tuple[str, ...] = ("t",)) -> Step:
    """A step as the planner makes it: id from rule, params and input paths; output in build/.steps/<id>/."""
    inputs = {"model": (root / "build" / ".steps" / "export_onnx-000000000000" / "model.onnx",)}
    step_id = f"{rule}-{identity(rule, params, inputs, root)[:12]}"
    return Step(id=step_id, rule=rule, params=params, inputs=inputs, outputs={"model": root / "build" / ".steps" / step_id / "model.onnx"},
                model=model, targets=list(targets))


def input_of(step: Step) -> Path:
    return step.inputs["model"][0]


def output_of(step: Step) -> Path:
    return step.outputs["model"]


def run_step_by_hand(step: Step, root: Path, output: bytes = b"converted model") -> dict:
    """What run_step leaves behind after running the rule: its outputs, its record, the last-run files."""
    write_file(output_of(step), output)
    current = components(step, root)
    outputs = {role: {"path": relative(p, root), "sha256": digest(root, p), "bytes": p.stat().st_size} for role, p in step.outputs.items()}
    write_record(root, step, {"step": step.name, "id": step.id, "key": step_key(current), "components": current, "outputs": outputs,
                              "reason": "not built yet", "seconds": 0.5, "info": {}, "restored": False})
    for model, target in step.owners():
        write_json_atomic(last_path(root, step, target, model), current)
    return current


@pytest.fixture
def built(tmp_path: Path) -> Step:
    """A convert_fp16 step that has run: its input, output and record are in place."""
    step = make_step(tmp_path, "convert_fp16", FP16_PARAMS)
    write_file(input_of(step), b"fp32 model bytes")
    run_step_by_hand(step, tmp_path)
    return step


# ---- the decision ------------------------------------------------------------------------------------

def test_a_step_whose_key_and_outputs_match_its_record_is_up_to_date(tmp_path: Path, built: Step):
    assert why(built, tmp_path) is None
    assert is_up_to_date(built, tmp_path)


def test_a_step_of_a_rule_without_params_is_up_to_date_after_it_ran(tmp_path: Path):
    step = make_step(tmp_path, "simplify_onnx", {})
    write_file(input_of(step), b"exported model")
    run_step_by_hand(step, tmp_path)
    assert why(step, tmp_path) is None


def test_the_record_holds_the_components_of_its_key(tmp_path: Path, built: Step):
    record = read_record(tmp_path, built)
    assert record.key == step_key(record.components)
    assert record.components["rule"] == "convert_fp16" and record.components["params"] == FP16_PARAMS
    assert record.components["inputs"] == {"model": [["model.onnx", digest(tmp_path, input_of(built))]]}
    assert "kiln" in record.tools and "onnx" in record.tools and record.hardware is None


def test_a_step_never_built_is_not_built_yet(tmp_path: Path):
    step = make_step(tmp_path, "convert_fp16", FP16_PARAMS)
    write_file(input_of(step), b"fp32 model bytes")
    assert why(step, tmp_path) == "not built yet"
    assert not is_up_to_date(step, tmp_path)


def test_a_missing_input_is_named_as_not_built_yet(tmp_path: Path):
    step = make_step(tmp_path, "convert_fp16", FP16_PARAMS)
    assert why(step, tmp_path) == f"input {relative(input_of(step), tmp_path)} is not built yet"


def test_a_changed_input_byte_rebuilds_and_names_the_input(tmp_path: Path, built: Step):
    before = digest(tmp_path, input_of(built))
    rewrite(input_of(built), b"fp32 model bytez")
    after = digest(tmp_path, input_of(built))
    assert why(built, tmp_path) == f"input model/model.onnx changed: sha256:{before[:12]} -> sha256:{after[:12]}"


def test_an_input_changed_back_is_up_to_date_again(tmp_path: Path, built: Step):
    rewrite(input_of(built), b"something else entirely")
    assert why(built, tmp_path) is not None
    rewrite(input_of(built), b"fp32 model bytes")
    assert why(built, tmp_path) is None


def test_a_touched_input_with_the_same_bytes_is_up_to_date(tmp_path: Path, built: Step):
    rewrite(input_of(built), b"fp32 model bytes")
    assert why(built, tmp_path) is None


def test_a_changed_param_under_the_same_record_rebuilds_with_the_param_named(tmp_path: Path, built: Step):
    built.params = FP16_PARAMS | {"keep_fp32_ops": ["LayerNormalization"]}
    assert why(built, tmp_path) == "parameter changed: params.keep_fp32_ops: [] -> ['LayerNormalization']"


def test_a_missing_output_rebuilds(tmp_path: Path, built: Step):
    output_of(built).unlink()
    assert why(built, tmp_path) == f"output {relative(output_of(built), tmp_path)} is missing"


def test_an_output_changed_on_disk_rebuilds(tmp_path: Path, built: Step):
    rewrite(output_of(built), b"converted modeL")
    assert why(built, tmp_path) == (f"output {relative(output_of(built), tmp_path)} is not what this step wrote"
                                    " (changed on disk, or built by another configuration)")


def test_a_new_key_component_rebuilds_and_is_named(tmp_path: Path, built: Step, monkeypatch):
    real = uptodate.components
    monkeypatch.setattr(uptodate, "components", lambda step, root: real(step, root) | {"env": {"CUDA_VISIBLE_DEVICES": "0"}})
    assert why(built, tmp_path) == "key component env changed"
    assert not is_up_to_date(built, tmp_path)


def test_a_record_whose_key_does_not_match_its_components_rebuilds(tmp_path: Path, built: Step):
    data = read_record(tmp_path, built).data
    write_record(tmp_path, built, data | {"key": "0" * 64})  # e.g. a key made of components the record does not hold
    assert why(built, tmp_path) == "key changed (the record's components do not say how)"


# ---- the explanation when the step id has no record: the last run of this rule for this target ------

def test_a_new_param_value_is_explained_from_the_last_run_of_the_target(tmp_path: Path, built: Step):
    changed = make_step(tmp_path, "convert_fp16", FP16_PARAMS | {"keep_io_types": False})
    assert changed.id != built.id
    assert why(changed, tmp_path) == "parameter changed: params.keep_io_types: True -> False"


def test_switching_a_param_back_finds_the_old_record(tmp_path: Path, built: Step):
    changed = make_step(tmp_path, "convert_fp16", FP16_PARAMS | {"keep_io_types": False})
    run_step_by_hand(changed, tmp_path, output=b"other model")
    assert why(make_step(tmp_path, "convert_fp16", FP16_PARAMS), tmp_path) is None


def test_the_last_run_of_another_target_does_not_explain(tmp_path: Path, built: Step):
    other_target = make_step(tmp_path, "convert_fp16", FP16_PARAMS | {"keep_io_types": False}, targets=("u",))
    assert why(other_target, tmp_path) == "not built yet"


def test_the_last_run_of_a_sharing_manifest_explains_too(tmp_path: Path, built: Step):
    changed = make_step(tmp_path, "convert_fp16", FP16_PARAMS | {"keep_io_types": False}, model="other", targets=("v",))
    assert why(changed, tmp_path) == "not built yet"
    changed.shared_with.append(("m", "t"))  # manifest m's target t needs it too, and ran it last with other params
    assert why(changed, tmp_path) == "parameter changed: params.keep_io_types: True -> False"


def test_a_last_run_with_the_same_components_falls_back_to_not_built_yet(tmp_path: Path, built: Step):
    record_path(tmp_path, built).unlink()  # e.g. the record was lost; the last-run file says nothing differs
    assert why(built, tmp_path) == "not built yet"


# ---- describe_change: the first difference, in words ------------------------------------------------

BASE = {"rule": "convert_fp16", "version": 1, "params": {"opset": 17, "ops": ["Add"], "nested": {"a": 1}},
        "inputs": {"model": [["model.onnx", "a" * 64]], "data": [["x.npz", "c" * 64]]}, "tools": {"kiln": "0.1.0", "onnx": "1.17.0"}}


def changed(**diff) -> str | None:
    return describe_change(BASE, BASE | diff)


def test_equal_components_have_no_change():
    assert describe_change(BASE, dict(BASE)) is None
    assert describe_change(BASE | {"hardware": {"gpu": "H200"}}, BASE | {"hardware": {"gpu": "H200"}}) is None


@pytest.mark.parametrize(("diff", "expected"), [
    ({"version": 2}, "rule convert_fp16 version changed: 1 -> 2"),
    ({"params": {"opset": 18, "ops": ["Add"], "nested": {"a": 1}}}, "parameter changed: params.opset: 17 -> 18"),
    ({"params": {"opset": 17, "ops": ["Mul"], "nested": {"a": 1}}}, "parameter changed: params.ops[0]: 'Add' -> 'Mul'"),
    ({"params": {"opset": 17, "ops": ["Add", "Mul"], "nested": {"a": 1}}}, "parameter changed: params.ops: ['Add'] -> ['Add', 'Mul']"),
    ({"params": {"opset": 17, "ops": ["Add"], "nested": {"a": 2}}}, "parameter changed: params.nested.a: 1 -> 2"),
    ({"params": {"opset": 17, "ops": ["Add"], "nested": {"a": 1}, "keep_io_types": False}}, "parameter changed: params.keep_io_types: '<unset>' -> False"),
    ({"inputs": {"model": [["model.onnx", "b" * 64]], "data": [["x.npz", "c" * 64]]}},
     "input model/model.onnx changed: sha256:aaaaaaaaaaaa -> sha256:bbbbbbbbbbbb"),
    ({"inputs": {"model": [["model.onnx", "a" * 64]], "data": [["x.npz", "c" * 64], ["y.npz", "d" * 64]]}},
     "input data/y.npz changed: absent -> sha256:dddddddddddd"),
    ({"inputs": {"model": [["model.onnx", "a" * 64]]}}, "input data/x.npz changed: sha256:cccccccccccc -> absent"),
    ({"tools": {"kiln": "0.1.0", "onnx": "1.18.0"}}, "tool onnx changed: 1.17.0 -> 1.18.0"),
    ({"tools": {"kiln": "0.1.0", "onnx": "1.17.0", "onnxruntime": "1.20.0"}}, "tool onnxruntime changed: None -> 1.20.0"),
    ({"hardware": {"gpu": "H200"}}, "hardware changed: hardware: None -> {'gpu': 'H200'}"),
])
def test_each_known_component_is_explained(diff: dict, expected: str):
    assert changed(**diff) == expected


def test_a_hardware_fact_change_names_the_fact():
    old, new = BASE | {"hardware": {"gpu": "H100", "tensorrt": "10.0"}}, BASE | {"hardware": {"gpu": "H100", "tensorrt": "10.1"}}
    assert describe_change(old, new) == "hardware changed: hardware.tensorrt: '10.0' -> '10.1'"


def test_the_first_difference_is_named_in_a_fixed_order():
    """rule version, then params (by sorted key), then inputs, tools and hardware."""
    params = {"opset": 18, "ops": ["Mul"], "nested": {"a": 1}}
    inputs = {"model": [["model.onnx", "b" * 64]], "data": [["x.npz", "c" * 64]]}
    assert changed(version=2, params=params, inputs=inputs, tools={}) == "rule convert_fp16 version changed: 1 -> 2"
    assert changed(params=params, inputs=inputs, tools={}) == "parameter changed: params.ops[0]: 'Add' -> 'Mul'"
    assert changed(inputs=inputs, tools={}).startswith("input model/model.onnx changed")
    assert changed(tools={}, hardware={"gpu": "H200"}) == "tool kiln changed: 0.1.0 -> None"


def test_an_unknown_component_is_named_generically():
    assert changed(env={"CUDA_VISIBLE_DEVICES": "0"}) == "key component env changed"
    assert describe_change(BASE | {"env": 1}, BASE) == "key component env changed"


def test_the_same_inputs_in_another_order_are_a_change():
    reordered = {"data": [["x.npz", "c" * 64]], "model": [["model.onnx", "a" * 64]]}
    assert changed(inputs=reordered) is None  # the same roles, only the dict order differs: not a change
    two = BASE | {"inputs": {"data": [["x.npz", "c" * 64], ["y.npz", "d" * 64]]}}
    swapped = BASE | {"inputs": {"data": [["y.npz", "d" * 64], ["x.npz", "c" * 64]]}}
    assert step_key(two) != step_key(swapped)
    assert describe_change(two, swapped) == "inputs changed order"


def test_an_old_baseline_missing_components_is_still_compared():
    """A last-run file from an older kiln may lack components; the new ones are then the change."""
    assert describe_change({"rule": "convert_fp16", "version": 1}, BASE).startswith("parameter changed: params")


def test_every_kind_of_change_has_its_reason():
    from kiln.state.uptodate import describe_change

    base = {"rule": "r", "version": 1, "params": {"opset": 17}, "inputs": {"model": [["m.onnx", "a" * 64]]},
            "tools": {"onnx": "1.0"}, "hardware": {"gpu": "H100", "tensorrt": "10.0"}}
    def changed(**diff):
        return describe_change(base, base | diff)
    assert changed() is None
    assert changed(version=2) == "rule r version changed: 1 -> 2"
    assert changed(params={"opset": 18}) == "parameter changed: params.opset: 17 -> 18"
    assert changed(inputs={"model": [["m.onnx", "b" * 64]]}) == "input model/m.onnx changed: sha256:aaaaaaaaaaaa -> sha256:bbbbbbbbbbbb"
    assert changed(tools={"onnx": "1.1"}) == "tool onnx changed: 1.0 -> 1.1"
    assert changed(hardware={"gpu": "H200", "tensorrt": "10.0"}) == "hardware changed: hardware.gpu: 'H100' -> 'H200'"
