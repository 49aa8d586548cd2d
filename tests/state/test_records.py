"""kiln.state.records: the step record on disk (build/.kiln/steps/<id>.json) as StepRecord reads it,
write_record/read_record round trips (atomic; a torn or missing record reads as "never built"),
tools_of merging the tool versions of several records, and where records, last-run baselines and
failure files live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.base.paths import state_dir
from kiln.plan.steps import Step
from kiln.state.records import StepRecord, failure_path, last_path, read_record, record_path, tools_of, write_record

A, B, C = "a" * 64, "b" * 64, "c" * 64


def make_step(root: Path, step_id: str = "convert_fp16-0123456789ab", model: str = "m", targets: list[str] | None = None) -> Step:
    folder = root / "build" / ".steps" / step_id
    return Step(id=step_id, rule="convert_fp16", params={"keep_io_types": True}, inputs={"model": (root / "in" / "model.onnx",)},
                outputs={"model": folder / "model.onnx"}, model=model, targets=targets or ["fp16"])


def record_data(**changes) -> dict:
    """A record as kiln.execute.step.run_step writes it."""
    data = {
        "step": "m/fp16/convert_fp16", "id": "convert_fp16-0123456789ab", "key": C,
        "components": {"rule": "convert_fp16", "version": 1, "params": {"keep_io_types": True},
                       "inputs": {"model": [["model.onnx", A]], "data": [["x.npz", A], ["y.npz", B]]},
                       "tools": {"kiln": "0.1.0", "onnx": "1.17.0"}},
        "outputs": {"model": {"path": "build/.steps/convert_fp16-0123456789ab/model.onnx", "sha256": B, "bytes": 12}},
        "reason": "not built yet", "seconds": 1.25, "info": {"nodes": 7}, "restored": False,
    }
    return data | changes


def test_a_record_exposes_key_components_and_outputs():
    data = record_data()
    record = StepRecord(data)
    assert record.key == C
    assert record.components == data["components"]
    assert record.tools == {"kiln": "0.1.0", "onnx": "1.17.0"}
    assert record.outputs["model"] == {"path": "build/.steps/convert_fp16-0123456789ab/model.onnx", "sha256": B, "bytes": 12}
    assert record.reason == "not built yet" and record.seconds == 1.25 and record.info == {"nodes": 7}


def test_input_digests_follow_the_steps_file_order_per_role():
    record = StepRecord(record_data())
    assert record.input_digests("data") == [A, B]
    assert record.input_digests("model") == [A]


def test_hardware_is_none_unless_the_key_holds_machine_facts():
    assert StepRecord(record_data()).hardware is None
    data = record_data()
    data["components"] = data["components"] | {"hardware": {"gpu": "H200", "compute_capability": "9.0"}}
    assert StepRecord(data).hardware == {"gpu": "H200", "compute_capability": "9.0"}


@pytest.mark.parametrize("info", [None, {}])
def test_a_record_without_facts_has_empty_info(info):
    data = record_data(info=info)
    assert StepRecord(data).info == {}
    assert StepRecord({k: v for k, v in data.items() if k != "info"}).info == {}


def test_write_then_read_gives_the_same_record(tmp_path: Path):
    step = make_step(tmp_path)
    write_record(tmp_path, step, record_data())
    record = read_record(tmp_path, step)
    assert record is not None and record.data == record_data()


def test_a_rewritten_record_is_read_anew(tmp_path: Path):
    step = make_step(tmp_path)
    write_record(tmp_path, step, record_data())
    assert read_record(tmp_path, step).key == C
    write_record(tmp_path, step, record_data(key=A, reason="parameter changed"))
    assert read_record(tmp_path, step).key == A and read_record(tmp_path, step).reason == "parameter changed"


def test_writing_leaves_no_temp_file_beside_the_record(tmp_path: Path):
    step = make_step(tmp_path)
    write_record(tmp_path, step, record_data())
    write_record(tmp_path, step, record_data(key=A))
    assert sorted(p.name for p in record_path(tmp_path, step).parent.iterdir()) == [f"{step.id}.json"]


def test_a_write_that_fails_before_its_rename_keeps_the_previous_record(tmp_path: Path, monkeypatch):
    step = make_step(tmp_path)
    write_record(tmp_path, step, record_data())

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_record(tmp_path, step, record_data(key=A))
    monkeypatch.undo()
    assert read_record(tmp_path, step).key == C


def test_a_missing_record_reads_as_none(tmp_path: Path):
    assert read_record(tmp_path, make_step(tmp_path)) is None


@pytest.mark.parametrize("text", ['{"step": "m/fp16/convert_fp16", "key": "aa', "", "\x00\x00\x00"])
def test_a_torn_record_reads_as_none(tmp_path: Path, text: str):
    step = make_step(tmp_path)
    path = record_path(tmp_path, step)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert read_record(tmp_path, step) is None


def test_tools_of_merges_every_records_tools_sorted_by_name():
    first = StepRecord(record_data())
    second_data = record_data()
    second_data["components"] = second_data["components"] | {"tools": {"torch": "2.4.0", "kiln": "0.1.0", "numpy": "2.0.0"}}
    merged = tools_of([first, StepRecord(second_data)])
    assert merged == {"kiln": "0.1.0", "numpy": "2.0.0", "onnx": "1.17.0", "torch": "2.4.0"}
    assert list(merged) == sorted(merged)


def test_tools_of_no_records_is_empty():
    assert tools_of([]) == {}


def test_steps_sharing_an_id_share_one_record_whichever_manifest_asks(tmp_path: Path):
    mine = make_step(tmp_path, model="a", targets=["x"])
    theirs = make_step(tmp_path, model="b", targets=["y", "z"])
    assert record_path(tmp_path, mine) == record_path(tmp_path, theirs) == state_dir(tmp_path) / "steps" / f"{mine.id}.json"
    write_record(tmp_path, mine, record_data())
    assert read_record(tmp_path, theirs).key == C


def test_steps_with_other_ids_have_their_own_records(tmp_path: Path):
    first, second = make_step(tmp_path), make_step(tmp_path, step_id="convert_fp16-ba9876543210")
    assert record_path(tmp_path, first) != record_path(tmp_path, second)
    write_record(tmp_path, first, record_data())
    assert read_record(tmp_path, second) is None


def test_records_of_two_workspaces_are_separate(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_record(one, make_step(one), record_data())
    assert read_record(two, make_step(two)) is None


def test_last_path_is_per_model_target_and_rule_not_per_step_id(tmp_path: Path):
    step = make_step(tmp_path, model="bert", targets=["fp16", "fp16_b"])
    other_id = make_step(tmp_path, step_id="convert_fp16-ba9876543210", model="bert", targets=["fp16"])
    assert last_path(tmp_path, step, "fp16") == state_dir(tmp_path) / "last" / "bert" / "fp16.convert_fp16.json"
    assert last_path(tmp_path, step, "fp16") == last_path(tmp_path, other_id, "fp16")
    assert last_path(tmp_path, step, "fp16_b") != last_path(tmp_path, step, "fp16")


def test_last_path_of_a_sharing_manifest_names_that_model(tmp_path: Path):
    step = make_step(tmp_path, model="a", targets=["fp16"])
    assert last_path(tmp_path, step, "fp16", "b") == state_dir(tmp_path) / "last" / "b" / "fp16.convert_fp16.json"


def test_the_failure_file_sits_beside_the_record_and_is_not_the_record(tmp_path: Path):
    step = make_step(tmp_path)
    assert failure_path(tmp_path, step) == state_dir(tmp_path) / "steps" / f"{step.id}.failed.json"
    write_record(tmp_path, step, record_data())
    failure_path(tmp_path, step).write_text('{"step": "m/fp16/convert_fp16", "error": "boom"}')
    assert read_record(tmp_path, step).key == C  # a failure never replaces the last good record
