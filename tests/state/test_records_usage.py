"""kiln.state.records: what a step's run cost (StepRecord.usage) and what its rule last used
(observed_path, read_observed, write_observed), which sizes its next memory reservation."""

from __future__ import annotations

from pathlib import Path

from kiln.plan.steps import Step
from kiln.state.records import observed_path, read_observed, read_record, write_observed, write_record

USAGE = {"started_at": 1796000000.25, "cpu_seconds": 1.5, "peak_rss_mib": 300.0, "used_mib": 120.5, "reserved_mib": 256, "exclusive": True}


def make_step(root: Path) -> Step:
    return Step("export_onnx-000000000001", "export_onnx", {}, {}, {"model": root / "model.onnx"}, "m", ["t"])


def test_a_record_gives_what_its_run_cost_and_an_older_record_nothing(tmp_path: Path):
    step = make_step(tmp_path)
    base = {"step": "m/t/export_onnx", "id": step.id, "key": "k", "components": {"tools": {}}, "outputs": {}, "reason": "r", "seconds": 2.0}
    write_record(tmp_path, step, base | USAGE | {"info": {}})
    assert read_record(tmp_path, step).usage == USAGE
    write_record(tmp_path, step, base)  # written by a kiln that did not measure
    assert read_record(tmp_path, step).usage == {}


def test_what_a_rule_used_is_kept_per_step_id_and_a_torn_file_is_ignored(tmp_path: Path):
    step = make_step(tmp_path)
    assert read_observed(tmp_path, step) is None
    write_observed(tmp_path, step, {"rule": "export_onnx", "used_mib": 120.5, "peak_rss_mib": 300.0})
    assert observed_path(tmp_path, step) == tmp_path / "build" / ".kiln" / "observed" / f"{step.id}.json"
    assert read_observed(tmp_path, step)["used_mib"] == 120.5
    observed_path(tmp_path, step).write_text('{"used_mib": ')
    assert read_observed(tmp_path, step) is None
    observed_path(tmp_path, step).write_text('{"used_mib": "lots"}')
    assert read_observed(tmp_path, step) is None
