"""The end-of-build table (kiln.engine.summary): each target's row says what its report says,
with the metric its format is judged by."""

from __future__ import annotations

import io

from kiln.engine.summary import COLUMNS, plain_table, rich_table, target_rows


def report(*artifacts: dict, steps: list[dict] | None = None) -> dict:
    return {"model": "m", "artifacts": list(artifacts), "steps": steps or [], "skipped": []}


def step(target: str, rule: str, status: str, **extra) -> dict:
    return {"step": f"m/{target}/{rule}", "targets": [target], "status": status} | extra


def test_cosine_targets_show_the_worst_and_mean_over_outputs_and_differing_labels():
    metrics = {"logits": {"min_cosine": 0.9991, "mean_cosine": 0.9999}, "hidden": {"min_cosine": 0.9995, "mean_cosine": 0.9997},
               "label": {"mismatched": 2}}
    (row,) = target_rows(report({"target": "int8", "format": "onnx", "precision": "int8", "bytes": 3 << 20, "passed": True,
                                 "metrics": metrics, "latency": {"median_ms": 1.234}, "status": "ran"},
                                steps=[step("int8", "quantize_static", "ran", why="not built yet")]))
    assert (row["worst"], row["mean"]) == ("1-cos 9.0e-04 (2 labels differ)", "1-cos 2.0e-04")
    assert (row["size"], row["latency"], row["gate"], row["status"], row["why"]) == ("3.0 MiB", "1.23 ms", "pass", "ran", "quantize_static: not built yet")


def test_exact_formats_show_max_abs_diff_and_core_ml_off_macos_says_structural():
    exact, structural = target_rows(report(
        {"target": "onnx", "metrics": {"probabilities": {"max_abs_diff": 3e-7}}, "passed": True, "status": "up to date"},
        {"target": "coreml", "validation": "Core ML runs only on macOS: checked structurally", "metrics": None, "passed": True, "status": "up to date"}))
    assert (exact["worst"], exact["mean"], exact["status"]) == ("max|d| 3.0e-07", "-", "up to date")
    assert (structural["worst"], structural["gate"]) == ("structural", "pass")


def test_a_failed_gate_says_fail_and_names_the_error():
    (row,) = target_rows(report({"target": "fp16", "metrics": {"y": {"min_cosine": 0.9, "mean_cosine": 0.95}}, "passed": False, "status": "failed"},
                                steps=[step("fp16", "convert_fp16", "ran", why="not built yet"),
                                       step("fp16", "validate", "failed", error="validation failed: y min_cosine 0.9 < 0.999")]))
    assert (row["gate"], row["status"], row["why"]) == ("FAIL", "failed", "validate: validation failed: y min_cosine 0.9 < 0.999")


def test_the_plain_table_is_aligned_without_box_drawing():
    rows = target_rows(report({"target": "a", "passed": True, "status": "up to date"}, {"target": "longer_name", "passed": None, "status": "not run"}))
    title, *lines = plain_table(rows, "tiny").splitlines()
    assert title == "model tiny:"  # two manifests built together give two tables, each named
    assert lines[0].split() == list(COLUMNS) and len(lines) == 4
    assert lines[2].index("-") == lines[3].index("-") == lines[0].index("format")  # columns line up
    assert all(ord(ch) < 128 for line in lines for ch in line)


def test_fp32_and_fp16_cosines_differ_in_the_table():
    fp32, fp16 = target_rows(report(
        {"target": "fp32", "metrics": {"y": {"min_cosine": 1 - 8.4e-8, "mean_cosine": 1.0}}, "passed": True, "status": "ran"},
        {"target": "fp16", "metrics": {"y": {"min_cosine": 1 - 3.1e-5, "mean_cosine": 1 - 1e-6}}, "passed": True, "status": "ran"}))
    assert (fp32["worst"], fp32["mean"], fp16["worst"]) == ("1-cos 8.4e-08", "1-cos 0", "1-cos 3.1e-05")


def test_a_nan_output_is_not_hidden_behind_a_good_one_and_is_not_a_pass():
    """min([0.99, nan]) is 0.99: a NaN output must show, whatever its order, and an ungated NaN must
    not read "pass"."""
    for outputs in (("a", "b"), ("b", "a")):
        values = {"a": {"min_cosine": 0.99}, "b": {"min_cosine": float("nan")}}
        (row,) = target_rows(report({"target": "t", "metrics": {k: values[k] for k in outputs}, "passed": True, "status": "ran"}))
        assert (row["worst"], row["gate"]) == ("1-cos nan", "nan")
    (row,) = target_rows(report({"target": "t", "metrics": {"y": {"max_abs_diff": float("inf")}}, "passed": False, "status": "failed"}))
    assert (row["worst"], row["gate"]) == ("max|d| inf", "FAIL")


def test_an_80_column_terminal_clips_no_name_gate_status_or_number():
    from rich.console import Console

    why = "not built yet: inputs changed since the last build of this manifest"
    rows = target_rows(report(
        {"target": "onnx_fp16_long_name", "format": "onnx", "precision": "fp16", "bytes": 3 << 20, "latency": {"median_ms": 1.234},
         "metrics": {"y": {"min_cosine": 1 - 3.1e-5, "mean_cosine": 1 - 1e-6}}, "passed": True, "status": "ran"},
        steps=[step("onnx_fp16_long_name", "convert_fp16", "ran", why=why)]))
    for width in (80, 200):
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(rich_table("tiny", rows))
        text = console.file.getvalue()
        assert "…" not in text and "model tiny" in text.splitlines()[0]
        for cell in ("onnx_fp16_long_name", "1-cos 3.1e-05", "1-cos 1.0e-06", "pass", "ran", "3.0 MiB", "1.23 ms", "fp16"):
            assert cell in text, (width, cell)
        assert why.split()[-1] in text and max(len(line.rstrip()) for line in text.splitlines()) <= width


FALLBACK = {"goal": {"min_cosine": 0.98, "mean_cosine": 0.99}, "passed": True,
            "kept": [{"node": "/l1/Gemm", "weight": "model.encoder.layer.1.output.dense.weight", "alone": {"min_cosine": 0.9887, "mean_cosine": 0.9981}},
                     {"node": "/l3/Gemm", "weight": "model.encoder.layer.3.intermediate.dense.weight", "alone": {"min_cosine": 0.99, "mean_cosine": 0.999}}],
            "trials": [{"kept": 0, "min_cosine": 0.9692, "mean_cosine": 0.996, "passed": False},
                       {"kept": 1, "min_cosine": 0.9771, "mean_cosine": 0.997, "passed": False},
                       {"kept": 2, "min_cosine": 0.9821, "mean_cosine": 0.998, "passed": True}],
            "bytes_cost": 1769472, "latency_ms": {"all_quantized": 7.8, "with_fallback": 8.1}, "scan_seconds": 41.2, "search_seconds": 12.3}


def test_a_quantized_targets_latency_shows_its_ratio_to_fp32_and_its_fallback_a_line_under_the_table():
    rows = target_rows(report(
        {"target": "onnx_fp32", "precision": "fp32", "latency": {"median_ms": 22.5}, "status": "ran"},
        {"target": "onnx_int8_static", "precision": "int8", "latency": {"median_ms": 8.063}, "status": "ran", "fallback": FALLBACK,
         "latency_vs_fp32": {"target": "onnx_fp32", "ratio": 0.358, "fp32_ms": 22.5, "ms": 8.063}},
        {"target": "onnx_int4", "precision": "int4", "latency": {"median_ms": 28.5, "threads": 2, "shape": {"input_ids": [1, 128]}}, "status": "ran",
         "latency_vs_fp32": {"target": "onnx_fp32", "ratio": 1.267, "fp32_ms": 22.5, "ms": 28.5},
         "fallback": FALLBACK | {"passed": False, "kept": FALLBACK["kept"] * 3, "trials": FALLBACK["trials"][:1], "latency_ms": {}}}))
    assert [r["latency"] for r in rows] == ["22.50 ms", "8.06 ms (0.36x)", "28.50 ms (1.27x)"]
    text = plain_table(rows, "bert")
    assert text.splitlines()[-3:] == [
        "onnx_int8_static: kept 2 layers in float (/l1/Gemm, /l3/Gemm):"
        " min_cosine 0.969 -> 0.982, +1.8 MB, latency 7.8 -> 8.1 ms",
        "onnx_int4: gate not reached with 6 layers kept in float (/l1/Gemm, /l3/Gemm, /l1/Gemm, ... 3 more):"
        " min_cosine 0.969 (goal 0.98), +1.8 MB",
        "warning: onnx_int4 (int4) runs 1.27x slower than onnx_fp32 (28.5 vs 22.5 ms, shape input_ids [1, 128], 2 threads)"]  # the report's warning
    from rich.console import Console

    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(rich_table("bert", rows))
    assert "min_cosine 0.969 -> 0.982" in console.file.getvalue().replace("\n", " ")  # the terminal's table says it too


def test_targets_without_latency_comparison_or_fallback_keep_their_plain_row():
    rows = target_rows(report({"target": "a", "latency": {"skipped": "no CPU"}, "status": "ran",
                               "fallback": {"passed": True, "kept": [], "trials": [{"kept": 0, "min_cosine": 0.9853}]}},
                              {"target": "b", "latency": {"median_ms": 1.0}, "status": "ran"}))
    assert [r["latency"] for r in rows] == ["-", "1.00 ms"]
    assert rows[0]["fallback"] == "kept no layer in float: min_cosine 0.985" and "fallback" not in rows[1]
    assert len(plain_table(rows).splitlines()) == 5  # header, rule, two rows, the one fallback line


def test_a_search_that_never_met_the_gate_names_its_largest_try():
    failed = {"goal": {"min_cosine": 0.98}, "passed": False, "kept": [], "bytes_cost": None, "latency_ms": None,
              "trials": [{"kept": 0, "min_cosine": 0.9, "passed": False}, {"kept": 12, "min_cosine": 0.95, "passed": False}]}
    (row,) = target_rows(report({"target": "int4", "status": "failed", "fallback": failed}))
    assert row["fallback"] == "gate not reached with 12 layers kept in float: min_cosine 0.900 -> 0.950 (goal 0.98)"


def test_a_trial_stopped_at_its_first_failing_batch_shows_its_minimum_as_an_upper_bound():
    early = FALLBACK | {"trials": [FALLBACK["trials"][0] | {"stopped_early": True}, *FALLBACK["trials"][1:]]}
    rows = target_rows(report({"target": "onnx_int8", "precision": "int8", "latency": {"median_ms": 8.0}, "status": "ran", "fallback": early}))
    assert "min_cosine <=0.969 -> 0.982" in rows[0]["fallback"]


def test_a_fallback_latency_measured_beside_other_steps_says_so():
    noisy = FALLBACK | {"latency_ms": {"all_quantized": 7.8, "with_fallback": 8.1, "alone": False}}
    (row,) = target_rows(report({"target": "onnx_int8_static", "precision": "int8", "status": "ran", "fallback": noisy}))
    assert row["fallback"].endswith("latency 7.8 -> 8.1 ms (measured beside other steps)")
    quiet = FALLBACK | {"latency_ms": {"all_quantized": 7.8, "with_fallback": 8.1, "alone": True}}
    (row,) = target_rows(report({"target": "onnx_int8_static", "precision": "int8", "status": "ran", "fallback": quiet}))
    assert row["fallback"].endswith("latency 7.8 -> 8.1 ms")
