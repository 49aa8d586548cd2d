"""kiln.state.report: build/<model>/report.json and the summary line. Per step its status (ran, up to
date, failed from the failure file, not run) and why; the counts; per published artifact its path,
size, metrics, latency and "not validated" reason; skipped targets. write_report writes it and returns
the summary line; the no-op fast path (report_template + publish_unchanged) writes the same bytes,
but for the time and seconds, and prints the same summary line as the full path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln.base.fsio import dumps_by_line, write_json_atomic
from kiln.plan.steps import Plan, Step
from kiln.state import report as report_module
from kiln.state.records import failure_path, write_record
from kiln.state.report import (FAILED, NOT_RUN, RAN, UP_TO_DATE, build_report, noop_report, publish_unchanged, report_path,
                               report_template, write_report)

METRICS = {"logits": {"max_abs": 0.001, "min_cosine": 0.99999}}
THRESHOLDS = {"max_abs": 0.01}
LATENCY = {"p50_ms": 1.5, "p90_ms": 2.0}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_plan(root: Path) -> Plan:
    """m.toml: export (shared by targets onnx and ov), then a validate step per target; ov publishes
    model.xml with its weights model.bin."""
    steps_dir, out = root / "build" / ".steps", root / "build" / "m"
    export = Step("export_onnx-000000000001", "export_onnx", {"opset": 17}, {"source": (root / "net.py",)},
                  {"model": steps_dir / "export_onnx-000000000001" / "model.onnx"}, "m", ["onnx", "ov"])
    validate_onnx = Step("validate-000000000002", "validate", {"target": "onnx"}, {"model": (export.outputs["model"],)},
                         {"artifact": out / "onnx" / "model.onnx", "validation": out / "onnx" / "validation.json"}, "m", ["onnx"], [export.id])
    validate_ov = Step("validate-000000000003", "validate", {"target": "ov"}, {"model": (export.outputs["model"],)},
                       {"artifact": out / "ov" / "model.xml", "validation": out / "ov" / "validation.json", "weights": out / "ov" / "model.bin"},
                       "m", ["ov"], [export.id])
    return Plan("m", root / "manifests" / "m.toml", root, [export, validate_onnx, validate_ov])


def record(plan: Plan, step: Step, sizes: dict[str, int], reason: str = "not built yet", seconds: float = 2.0, info: dict | None = None) -> None:
    """The record a run of the step left (output sizes by role)."""
    outputs = {role: {"path": str(step.outputs[role].relative_to(plan.root)), "sha256": sha256(role.encode()), "bytes": size}
               for role, size in sizes.items()}
    write_record(plan.root, step, {"step": step.name, "id": step.id, "key": sha256(step.id.encode()), "components": {"tools": {}},
                                   "outputs": outputs, "reason": reason, "seconds": seconds, "info": info or {}, "restored": False})


def validated(**more) -> dict:
    return {"target": "t", "samples": 8, "thresholds": THRESHOLDS, "metrics": METRICS, "passed": True} | more


def built_plan(root: Path) -> Plan:
    """Every step has a record: export, and both validate steps (ov measured a latency)."""
    plan = make_plan(root)
    export, onnx, ov = plan.steps
    record(plan, export, {"model": 1000}, seconds=5.0, info={"opset": 17})
    record(plan, onnx, {"artifact": 1000, "validation": 300}, info=validated())
    record(plan, ov, {"artifact": 200, "validation": 300, "weights": 800}, info=validated(latency=LATENCY))
    return plan


def statuses(plan: Plan, *values: str) -> dict[str, str]:
    return {step.name: status for step, status in zip(plan.steps, values)}


def entries(report: dict) -> dict[str, dict]:
    return {entry["step"]: entry for entry in report["steps"]}


def fixed_clock(monkeypatch, now: str = "2026-12-04T18:00:00Z", monotonic: float = 100.0) -> None:
    monkeypatch.setattr(report_module, "_now", lambda: now)
    monkeypatch.setattr(report_module, "time", SimpleNamespace(monotonic=lambda: monotonic))


# ---- build_report: steps ----------------------------------------------------------------------------

def test_a_step_that_ran_says_why_and_how_long(tmp_path: Path):
    plan = built_plan(tmp_path)
    record(plan, plan.steps[0], {"model": 1000}, reason="parameter changed: params.opset: 17 -> 18", seconds=5.0, info={"opset": 18})
    entry = entries(build_report(plan, statuses(plan, RAN, UP_TO_DATE, UP_TO_DATE), 7.0))["m/onnx+ov/export_onnx"]
    assert entry == {"step": "m/onnx+ov/export_onnx", "rule": "export_onnx", "targets": ["onnx", "ov"], "status": RAN,
                     "why": "parameter changed: params.opset: 17 -> 18", "seconds": 5.0, "last_run_seconds": 5.0,
                     "key": sha256(b"export_onnx-000000000001"),
                     "outputs": [{"path": "build/.steps/export_onnx-000000000001/model.onnx", "bytes": 1000}], "info": {"opset": 18}}


def test_an_up_to_date_step_took_no_time_this_run(tmp_path: Path):
    plan = built_plan(tmp_path)
    entry = entries(build_report(plan, statuses(plan, UP_TO_DATE, UP_TO_DATE, UP_TO_DATE), 0.1))["m/onnx+ov/export_onnx"]
    assert entry["status"] == UP_TO_DATE and entry["why"] == "key unchanged and outputs intact"
    assert entry["seconds"] == 0.0 and entry["last_run_seconds"] == 5.0


def test_a_failed_step_is_described_from_its_failure_file(tmp_path: Path):
    plan = built_plan(tmp_path)
    failed = plan.steps[1]
    write_json_atomic(failure_path(tmp_path, failed), {"step": failed.name, "reason": "input changed", "error": "validation failed: max_abs 0.5 > 0.01",
                                                       "facts": validated(passed=False), "seconds": 3.25})
    entry = entries(build_report(plan, statuses(plan, UP_TO_DATE, FAILED, UP_TO_DATE), 4.0))["m/onnx/validate"]
    assert entry == {"step": "m/onnx/validate", "rule": "validate", "targets": ["onnx"], "status": FAILED, "why": "input changed",
                     "error": "validation failed: max_abs 0.5 > 0.01", "seconds": 3.25, "facts": validated(passed=False)}


def test_a_failed_step_without_a_failure_file_points_at_doits_output(tmp_path: Path):
    plan = built_plan(tmp_path)
    entry = entries(build_report(plan, statuses(plan, FAILED, UP_TO_DATE, UP_TO_DATE), 1.0))["m/onnx+ov/export_onnx"]
    assert entry["status"] == FAILED and entry["error"] == "see doit's output" and entry["why"] is None


def test_a_step_missing_from_the_statuses_was_not_run(tmp_path: Path):
    plan = make_plan(tmp_path)
    record(plan, plan.steps[0], {"model": 1000})
    report = build_report(plan, statuses(plan, RAN), 1.0)
    assert entries(report)["m/onnx/validate"] == {"step": "m/onnx/validate", "rule": "validate", "targets": ["onnx"], "status": NOT_RUN,
                                                  "why": "not built yet"}



def test_a_step_that_was_not_run_is_not_said_to_be_up_to_date(tmp_path: Path):
    plan = built_plan(tmp_path)
    # onnx's validate failed and doit stopped there (no --continue): ov's validate was never checked
    entry = entries(build_report(plan, statuses(plan, UP_TO_DATE, FAILED), 1.0))["m/ov/validate"]
    assert entry["status"] == NOT_RUN
    assert entry["why"] != "key unchanged and outputs intact"


@pytest.mark.parametrize(("values", "counts", "ok"), [
    ((RAN, RAN, RAN), {RAN: 3, UP_TO_DATE: 0, FAILED: 0, NOT_RUN: 0}, True),
    ((UP_TO_DATE, UP_TO_DATE, UP_TO_DATE), {RAN: 0, UP_TO_DATE: 3, FAILED: 0, NOT_RUN: 0}, True),
    ((RAN, UP_TO_DATE, FAILED), {RAN: 1, UP_TO_DATE: 1, FAILED: 1, NOT_RUN: 0}, False),
    ((RAN, UP_TO_DATE), {RAN: 1, UP_TO_DATE: 1, FAILED: 0, NOT_RUN: 1}, False),
])
def test_counts_and_ok_follow_the_statuses(tmp_path: Path, values: tuple[str, ...], counts: dict[str, int], ok: bool):
    plan = built_plan(tmp_path)
    report = build_report(plan, statuses(plan, *values), 1.0)
    assert report["counts"] == counts and report["ok"] is ok


def test_a_shared_step_is_reported_by_this_manifests_own_targets(tmp_path: Path):
    plan = built_plan(tmp_path)
    export = plan.steps[0]
    export.shared_with.append(("n", "fp32"))
    other = Plan("n", tmp_path / "manifests" / "n.toml", tmp_path, [export])
    report = build_report(other, {"m/onnx+ov/export_onnx": UP_TO_DATE}, 0.5)  # doit's task is named after the first manifest
    assert [(e["step"], e["targets"], e["status"]) for e in report["steps"]] == [("n/fp32/export_onnx", ["fp32"], UP_TO_DATE)]


def test_the_report_holds_model_seconds_and_skipped_targets(tmp_path: Path):
    plan = built_plan(tmp_path)
    plan.skipped = {"trt_b": "no usable NVIDIA GPU", "trt_a": "the tensorrt package is not installed"}
    report = build_report(plan, statuses(plan, RAN, RAN, RAN), 12.34567)
    assert report["model"] == "m" and report["seconds"] == 12.346
    assert report["skipped"] == [{"target": "trt_a", "why": "the tensorrt package is not installed"}, {"target": "trt_b", "why": "no usable NVIDIA GPU"}]


# ---- build_report: artifacts ------------------------------------------------------------------------

def test_each_published_artifact_has_its_path_size_and_metrics(tmp_path: Path):
    plan = built_plan(tmp_path)
    artifacts = build_report(plan, statuses(plan, RAN, RAN, UP_TO_DATE), 1.0)["artifacts"]
    assert artifacts == [
        {"target": "onnx", "status": RAN, "metrics": METRICS, "thresholds": THRESHOLDS, "passed": True, "path": "build/m/onnx/model.onnx", "bytes": 1000},
        # the companion's bytes count, validation.json's do not
        {"target": "ov", "status": UP_TO_DATE, "metrics": METRICS, "thresholds": THRESHOLDS, "passed": True, "latency": LATENCY,
         "path": "build/m/ov/model.xml", "bytes": 1000},
    ]


def test_an_artifact_published_without_validation_says_why(tmp_path: Path):
    plan = built_plan(tmp_path)
    record(plan, plan.steps[2], {"artifact": 200, "validation": 300, "weights": 800},
           info={"target": "ov", "validated": False, "not_validated": "OpenVINO has no CPU device here"})
    ov = build_report(plan, statuses(plan, RAN, RAN, RAN), 1.0)["artifacts"][1]
    assert ov["validation"] == "not validated: OpenVINO has no CPU device here"
    assert ov["metrics"] is None and ov["passed"] is None and ov["path"] == "build/m/ov/model.xml"


def test_a_failed_validation_reports_its_metrics_but_no_artifact(tmp_path: Path):
    plan = make_plan(tmp_path)
    record(plan, plan.steps[0], {"model": 1000})
    failed = plan.steps[1]
    write_json_atomic(failure_path(tmp_path, failed), {"step": failed.name, "reason": "not built yet", "error": "validation failed",
                                                       "facts": validated(passed=False), "seconds": 1.0})
    onnx = build_report(plan, statuses(plan, RAN, FAILED), 1.0)["artifacts"][0]
    assert onnx == {"target": "onnx", "status": FAILED, "metrics": METRICS, "thresholds": THRESHOLDS, "passed": False}


def test_an_artifact_never_built_has_no_path(tmp_path: Path):
    plan = make_plan(tmp_path)
    onnx = build_report(plan, {}, 0.0)["artifacts"][0]
    assert onnx == {"target": "onnx", "status": NOT_RUN, "metrics": None, "thresholds": None, "passed": None}


# ---- write_report and the summary line --------------------------------------------------------------

def test_write_report_writes_the_models_report_and_returns_the_summary(tmp_path: Path):
    plan = built_plan(tmp_path)
    report = build_report(plan, statuses(plan, RAN, UP_TO_DATE, UP_TO_DATE), 3.0)
    line = write_report(tmp_path, report)
    assert line == "kiln: m: 1 ran, 2 up to date, 0 failed -> build/m/report.json"
    assert report_path(tmp_path, "m") == tmp_path / "build" / "m" / "report.json"
    assert json.loads(report_path(tmp_path, "m").read_text()) == report


def test_the_summary_names_steps_not_run_only_when_there_are_some(tmp_path: Path):
    plan = built_plan(tmp_path)
    line = write_report(tmp_path, build_report(plan, statuses(plan, RAN, FAILED), 3.0))
    assert line == "kiln: m: 1 ran, 0 up to date, 1 failed, 1 not run -> build/m/report.json"


def test_a_new_report_replaces_the_last_one(tmp_path: Path):
    plan = built_plan(tmp_path)
    write_report(tmp_path, build_report(plan, statuses(plan, RAN, RAN, RAN), 3.0))
    write_report(tmp_path, build_report(plan, statuses(plan, UP_TO_DATE, UP_TO_DATE, UP_TO_DATE), 0.2))
    assert json.loads(report_path(tmp_path, "m").read_text())["counts"][UP_TO_DATE] == 3
    assert [p.name for p in report_path(tmp_path, "m").parent.iterdir()] == ["report.json"]  # no temp left behind


# ---- the no-op fast path ------------------------------------------------------------------------------

def test_the_noop_report_has_every_step_up_to_date(tmp_path: Path):
    plan = built_plan(tmp_path)
    report = noop_report(plan)
    assert report["counts"] == {RAN: 0, UP_TO_DATE: 3, FAILED: 0, NOT_RUN: 0} and report["ok"] and report["seconds"] == 0.0


def test_the_template_does_not_depend_on_when_it_was_made(tmp_path: Path, monkeypatch):
    plan = built_plan(tmp_path)
    fixed_clock(monkeypatch, now="2026-01-01T00:00:00Z")
    first = report_template(noop_report(plan))
    fixed_clock(monkeypatch, now="2026-12-31T23:59:59Z")
    assert report_template(noop_report(plan)) == first
    assert "2026" not in first


def test_publish_unchanged_writes_what_the_full_check_would_have(tmp_path: Path, monkeypatch):
    plan = built_plan(tmp_path)
    fixed_clock(monkeypatch, now="2026-12-04T18:00:00Z", monotonic=100.0)
    template = report_template(noop_report(plan))
    full_line = write_report(tmp_path, noop_report(plan) | {"seconds": 2.5})  # what the full path writes and prints
    full_bytes = report_path(tmp_path, "m").read_bytes()
    report_path(tmp_path, "m").unlink()
    lines = publish_unchanged(tmp_path, [("m", 3, template)], started=97.5)
    assert lines == [full_line] == ["kiln: m: 0 ran, 3 up to date, 0 failed -> build/m/report.json"]
    assert report_path(tmp_path, "m").read_bytes() == full_bytes


def test_publish_unchanged_fills_in_the_time_and_seconds(tmp_path: Path, monkeypatch):
    plan = built_plan(tmp_path)
    template = report_template(noop_report(plan))
    fixed_clock(monkeypatch, now="2026-12-04T18:00:00Z", monotonic=100.0)
    publish_unchanged(tmp_path, [("m", 3, template)], started=99.8766)
    written = json.loads(report_path(tmp_path, "m").read_text())
    assert written["generated_at"] == "2026-12-04T18:00:00Z" and written["seconds"] == 0.123
    assert written == noop_report(plan) | {"generated_at": "2026-12-04T18:00:00Z", "seconds": 0.123}


def test_publish_unchanged_writes_one_report_per_manifest(tmp_path: Path):
    first = built_plan(tmp_path)
    templates = [("m", 3, report_template(noop_report(first))), ("n", 7, dumps_by_line({"model": "n", "generated_at": "@generated_at@", "seconds": "@seconds@"}))]
    lines = publish_unchanged(tmp_path, templates, started=0.0)
    assert lines == ["kiln: m: 0 ran, 3 up to date, 0 failed -> build/m/report.json",
                     "kiln: n: 0 ran, 7 up to date, 0 failed -> build/n/report.json"]
    assert json.loads(report_path(tmp_path, "m").read_text())["model"] == "m"
    assert json.loads(report_path(tmp_path, "n").read_text())["model"] == "n"


def test_publish_unchanged_of_nothing_writes_nothing(tmp_path: Path):
    assert publish_unchanged(tmp_path, [], started=0.0) == []
    assert not (tmp_path / "build").exists()


# ---- quantized artifacts: latency against fp32, layers kept in float ----------------------------------

SHAPE = {"input_ids": [1, 128], "attention_mask": [1, 128]}
FALLBACK = {"goal": {"min_cosine": 0.98, "mean_cosine": 0.99}, "passed": True,
            "kept": [{"node": "/model/encoder/layer.3/intermediate/dense/Gemm", "weight": "model.encoder.layer.3.intermediate.dense.weight",
                      "alone": {"min_cosine": 0.9887, "mean_cosine": 0.9981}}],
            "trials": [{"kept": 0, "min_cosine": 0.9692, "mean_cosine": 0.996, "passed": False},
                       {"kept": 1, "min_cosine": 0.9821, "mean_cosine": 0.998, "passed": True}],
            "bytes_cost": 1769472, "latency_ms": {"all_quantized": 7.8, "with_fallback": 8.1}, "scan_seconds": 41.2, "search_seconds": 12.3}


def timing(ms: float, shape: dict | None = None, threads: int = 2) -> dict:
    return {"median_ms": ms, "p10_ms": ms * 0.9, "runs": 30, "threads": threads, "shape": shape or SHAPE}


def quantized_plan(root: Path) -> Plan:
    """export (shared by all) -> validate fp32; -> quantize_dynamic (with a fallback) -> validate int8;
    -> quantize_int4 -> validate int4: each validate measured a latency on the same shape."""
    steps_dir, out = root / "build" / ".steps", root / "build" / "m"
    export = Step("export_onnx-0000000000a1", "export_onnx", {}, {}, {"model": steps_dir / "e" / "model.onnx"}, "m", ["fp32", "int4", "int8"])
    steps = [export]
    for target, precision, rule in (("fp32", "fp32", None), ("int4", "int4", "quantize_int4"), ("int8", "int8", "quantize_dynamic")):
        deps = [export.id]
        if rule:
            quantize = Step(f"{rule}-0000000000b{len(steps)}", rule, {}, {}, {"model": steps_dir / target / "model.onnx"}, "m", [target], deps)
            steps.append(quantize)
            deps = [quantize.id]
        steps.append(Step(f"validate-0000000000c{len(steps)}", "validate", {"target": target, "format": "onnx", "precision": precision}, {},
                          {"artifact": out / target / "model.onnx", "validation": out / target / "validation.json"}, "m", [target], deps))
    plan = Plan("m", root / "manifests" / "m.toml", root, steps)
    latencies = {"fp32": 22.5, "int4": 28.5, "int8": 8.063}
    for step in steps:
        if step.publishes:
            record(plan, step, {"artifact": 1000, "validation": 10}, info=validated(latency=timing(latencies[step.targets[0]])))
        else:
            record(plan, step, {"model": 1000}, info={"fallback": FALLBACK} if step.rule == "quantize_dynamic" else {})
    return plan


def test_quantized_artifacts_show_latency_next_to_fp32_and_a_slower_one_is_a_warning(tmp_path: Path):
    plan = quantized_plan(tmp_path)
    report = build_report(plan, dict.fromkeys((s.name for s in plan.steps), UP_TO_DATE), 1.0)
    artifacts = {a["target"]: a for a in report["artifacts"]}
    assert "latency_vs_fp32" not in artifacts["fp32"]
    assert artifacts["int8"]["latency_vs_fp32"] == {"target": "fp32", "ratio": 0.358, "fp32_ms": 22.5, "ms": 8.063}
    assert artifacts["int4"]["latency_vs_fp32"] == {"target": "fp32", "ratio": 1.267, "fp32_ms": 22.5, "ms": 28.5}
    assert report["warnings"] == ["int4 (int4) runs 1.27x slower than fp32 (28.5 vs 22.5 ms,"
                                  " shape attention_mask [1, 128], input_ids [1, 128], 2 threads)"]  # as the record keeps it
    # the quantize step's fallback facts reach the artifact it made, and only that one
    assert artifacts["int8"]["fallback"] == FALLBACK and "fallback" not in artifacts["int4"] and "fallback" not in artifacts["fp32"]
    assert json.loads(dumps_by_line(report)) == report  # and the report stays JSON


def artifact(target: str, precision: str | None, latency: dict | None = None, fmt: str = "onnx") -> dict:
    return {"target": target, "format": fmt, "precision": precision} | ({"latency": latency} if latency else {})


def test_latency_is_compared_only_on_the_same_shape_and_threads_with_the_same_format():
    from kiln.state.report import compare_latency

    arts = [artifact("fp32", "fp32", timing(20.0)), artifact("fp16_long", "fp16", timing(30.0, {"input_ids": [1, 512]})),
            artifact("int8_4threads", "int8", timing(30.0, threads=4)), artifact("ov_int8", "int8", timing(30.0), fmt="openvino"),
            artifact("skipped", "int8", {"skipped": "latency not measured: no CPU"}), artifact("none", "int4")]
    assert compare_latency(arts, [], {}) == []
    assert all("latency_vs_fp32" not in a for a in arts)


def test_the_fp32_artifact_sharing_most_steps_is_the_baseline_then_the_first_by_name():
    from kiln.state.report import compare_latency

    def steps(*chains: tuple[str, list[str]]) -> list[dict]:
        return [{"step": name, "rule": "r", "targets": targets} for name, targets in chains]

    arts = [artifact("b_fp32", "fp32", timing(10.0)), artifact("a_fp32", "fp32", timing(40.0)), artifact("int8", "int8", timing(20.0))]
    shared_with_b = steps(("export", ["a_fp32", "b_fp32", "int8"]), ("simplify", ["b_fp32", "int8"]))
    assert compare_latency(arts, shared_with_b, {}) == ["int8 (int8) runs 2.00x slower than b_fp32 (20 vs 10 ms, shape input_ids [1, 128],"
                                                        " attention_mask [1, 128], 2 threads)"]
    assert arts[2]["latency_vs_fp32"]["target"] == "b_fp32"
    del arts[2]["latency_vs_fp32"]
    assert compare_latency(arts, steps(("export", ["a_fp32", "b_fp32", "int8"])), {}) == []  # a tie: a_fp32, and faster than it
    assert arts[2]["latency_vs_fp32"] == {"target": "a_fp32", "ratio": 0.5, "fp32_ms": 40.0, "ms": 20.0}


def test_a_ratio_that_rounds_to_one_still_reads_slower():
    from kiln.state.report import ratio_text

    assert (ratio_text(1.004), ratio_text(1.264), ratio_text(0.358)) == ("1.004", "1.26", "0.36")
