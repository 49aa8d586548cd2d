"""kiln.state.html: build/<model>/report.html and build/index.html, drawn from what a real build
left (the sklearn iris example, built once for this module without its Java-only PMML target): one
self-contained file each (no script, nothing fetched), every target with its size and metrics, the
trade-off, error, calibration and timeline plots as inline SVG, changes since the previous build,
names from the manifest escaped, the same bytes for the same build; and the page loads in headless
Chromium with no console error and every plot in its DOM."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Workspace, new_workspace

from kiln.state.html import write_index_html, write_model_html

MODEL = "sklearn_iris"
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def iris_without_pmml() -> str:
    """The example manifest less its PMML target (Java): the test builds in seconds anywhere."""
    text = (REPO / "manifests" / "sklearn_iris.toml").read_text()
    start = text.index("[targets.pmml]")
    return text[:start] + text[text.index("[validation]", start):]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    pytest.importorskip("skl2onnx")
    ws = new_workspace(tmp_path_factory.mktemp("html") / "ws", {MODEL: iris_without_pmml()})
    ws.doit("build", f"manifest=manifests/{MODEL}.toml")
    return ws


@pytest.fixture
def build(built: Workspace, tmp_path: Path) -> Path:
    """A private copy of the built workspace's build/ folder (tests change its report)."""
    shutil.copytree(built.root / "build", tmp_path / "build")
    return tmp_path / "build"


def report_of(build: Path) -> dict:
    return json.loads((build / MODEL / "report.json").read_text())


def save_report(build: Path, report: dict) -> None:
    (build / MODEL / "report.json").write_text(json.dumps(report))


def svg_ids(page: str) -> list[str]:
    return re.findall(r'<svg class="plot" id="([^"]+)"', page)


def add_calibration(build: Path) -> None:
    """A calibrate step with a calibration.json of one tensor whose values span exactly [-2, 3], and a
    quantize step that used [-1.5, 2.5] for it: what a static int8 target leaves."""
    import numpy as np

    from kiln.native.calibration import Calibration

    values = np.concatenate([np.linspace(-2.0, 3.0, 4001, dtype=np.float32), np.zeros(999, np.float32)])
    calibration = Calibration(2048)
    calibration.update("dense<in>", values)
    path = build / MODEL / "int8" / "calibration.json"
    path.parent.mkdir(parents=True)
    path.write_text(calibration.to_json())
    report = report_of(build)
    report["steps"] += [
        {"step": f"{MODEL}/int8/calibrate", "rule": "calibrate", "status": "ran", "seconds": 0.5, "targets": ["int8"],
         "outputs": [{"path": f"build/{MODEL}/int8/calibration.json", "bytes": path.stat().st_size}]},
        {"step": f"{MODEL}/int8/quantize_static", "rule": "quantize_static", "status": "ran", "seconds": 0.25, "targets": ["int8"],
         "info": {"method": "percentile", "ranges": {"dense<in>": [-1.5, 2.5]}}},
    ]
    save_report(build, report)


def test_page_shows_every_target_with_its_size_and_metrics_in_plots_that_need_nothing_from_outside(build: Path):
    report = report_of(build)
    page = write_model_html(build, MODEL, None).read_text()
    assert (build / MODEL / "report.html").is_file()
    onnx = next(a for a in report["artifacts"] if a["target"] == "onnx")
    size = f"{onnx['bytes']} B" if onnx["bytes"] < 1024 else f"{onnx['bytes'] / 1024:.1f} KiB"
    assert ">onnx<" in page and f">{size}<" in page
    validation = json.loads((build / MODEL / "onnx" / "validation.json").read_text())
    assert f"{validation['metrics']['probabilities']['max_abs_diff']:.6g}" in page  # from its validation.json
    assert {"plot-tradeoff", "plot-errors-label", "plot-errors-probabilities", "plot-timeline"} <= set(svg_ids(page))
    assert "no previous build" in page and "no calibrate step" in page
    # one file that works offline: no script, no stylesheet or image fetched, no link out
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {SVG_NAMESPACE}


def test_a_target_that_failed_shows_this_builds_metrics_not_the_last_good_ones(build: Path):
    report = report_of(build)
    onnx = next(a for a in report["artifacts"] if a["target"] == "onnx")
    onnx |= {"status": "failed", "passed": False, "metrics": {"probabilities": {"max_abs_diff": 0.75, "min_cosine": 0.5}}}
    del onnx["path"], onnx["bytes"]  # a failed step publishes nothing; the old validation.json is still there
    save_report(build, report)
    page = write_model_html(build, MODEL, None).read_text()
    targets = page[page.index("<h2>Targets"):page.index("<h2>Size")]
    assert "✘ failed" in targets and "✔" not in targets
    assert ">0.75<" in page


def test_the_same_build_gives_the_same_bytes_with_no_time_but_the_reports(build: Path):
    first = write_model_html(build, MODEL, report_of(build)).read_bytes()
    second = write_model_html(build, MODEL, report_of(build)).read_bytes()
    assert first == second
    assert set(re.findall(rb"\d{4}-\d\d-\d\dT[\d:]+Z?", first)) == {report_of(build)["generated_at"].encode()}


def test_names_from_the_manifest_are_escaped(build: Path):
    report = report_of(build)
    hostile = '<img src=x onerror="alert(1)">&'
    report["model"] = hostile
    report["artifacts"][0]["target"] = hostile
    report["artifacts"][0]["metrics"] = {hostile: {"max_abs_diff": 0.5, "min_cosine": 0.9}}
    report["steps"][0]["step"] = hostile
    save_report(build, report)
    page = write_model_html(build, MODEL, None).read_text()
    assert "<img" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in page
    assert all(re.fullmatch(r"[\w-]+", plot_id) for plot_id in svg_ids(page))  # ids stay valid whatever the name


def test_changes_since_the_previous_build_list_bytes_digest_and_metric_deltas(build: Path):
    current = report_of(build)
    previous = copy.deepcopy(current)
    onnx = next(a for a in previous["artifacts"] if a["target"] == "onnx")
    onnx["bytes"] -= 100
    onnx["metrics"]["probabilities"]["max_abs_diff"] = 0.25
    validate = next(s for s in previous["steps"] if s["rule"] == "validate")
    validate["key"] = "0" * 64
    page = write_model_html(build, MODEL, previous).read_text()
    changes = page[page.index("Changes since the previous build"):]
    assert "(+100, " in changes  # bytes grew by 100
    assert "probabilities max_abs_diff 0.25 → " in changes
    assert "rebuilt from different inputs (step key 000000000000 → " in changes

    unchanged = write_model_html(build, MODEL, current).read_text()
    assert "no target changed" in unchanged


def test_calibration_histograms_mark_each_methods_threshold_and_the_range_a_target_used(build: Path):
    add_calibration(build)
    page = write_model_html(build, MODEL, None).read_text()
    plots = [i for i in svg_ids(page) if i.startswith("plot-calibration-")]
    assert len(plots) == 1
    histogram = page[page.index(f'id="{plots[0]}"'):]
    histogram = histogram[:histogram.index("</svg>")]
    assert "dense&lt;in&gt;" in histogram
    assert ">minmax 3<" in histogram  # minmax keeps the data's extremes: |x| up to 3
    assert "minmax: [-2, 3]" in histogram
    assert "percentile" in histogram and "entropy" in histogram
    assert "used: int8 (percentile) [-1.5, 2.5]" in histogram


def test_timeline_draws_start_time_and_memory_and_does_without_them(build: Path):
    report = report_of(build)
    cost = ("started_at", "cpu_seconds", "peak_rss_mib", "used_mib", "reserved_mib", "exclusive")
    for step in report["steps"]:  # a report from before kiln measured steps
        for key in cost:
            step.pop(key, None), step.pop(f"last_run_{key}", None)
    save_report(build, report)
    page = write_model_html(build, MODEL, None).read_text()
    assert "laid end to end in plan order" in page and "peak RSS" not in page
    for i, step in enumerate(report["steps"]):
        step |= {"started_at": 1_000_000.0 + 10 * i, "seconds": 2.0, "cpu_seconds": 1.5, "peak_rss_mib": 100.0 * (i + 1), "reserved_mib": 1024}
    report["steps"][0]["warnings"] = report["warnings"] = ["first: used 1000 MiB of memory at its peak, within 10% of <the 1024 MiB>"]
    save_report(build, report)
    page = write_model_html(build, MODEL, None).read_text()
    timeline = page[page.index('id="plot-timeline"'):]
    assert "seconds since the first step started" in timeline and "laid end to end" not in timeline
    assert f">{(len(report['steps']) - 1) * 10 + 2} s<" in timeline  # the last step ends this long after the first began
    assert "peak RSS" in timeline and f">{100 * len(report['steps']):.1f} MiB<" in timeline and "reserved 1024 MiB" in timeline
    assert "CPU 1.5 s" in timeline and "within 10% of &lt;the 1024 MiB&gt;" in timeline


def test_index_links_every_models_page_with_a_row_per_target(build: Path):
    other = build / "other model"
    other.mkdir()
    report = report_of(build) | {"model": "other model"}
    (other / "report.json").write_text(json.dumps(report))
    page = write_index_html(build).read_text()
    assert page == (build / "index.html").read_text()
    assert f'href="{MODEL}/report.html"' in page and 'href="other%20model/report.html"' in page
    assert page.count("<tr>") == 1 + 2 * len(report["artifacts"])


@pytest.mark.browser
def test_report_opens_in_headless_chromium_with_every_plot_and_no_console_error(build: Path, tmp_path: Path):
    from browser import render

    add_calibration(build)
    page = write_model_html(build, MODEL, report_of(build))
    expected = svg_ids(page.read_text())
    assert len(expected) >= 5  # trade-off, two outputs' errors, calibration, timeline
    shown = render(page, tmp_path / "report.png")
    assert shown.console == []
    assert set(re.findall(r'<svg class="plot" id="([^"]+)"', shown.dom)) == set(expected)
    assert shown.screenshot.stat().st_size > 10_000  # a drawn page, not a blank one
    artifacts = REPO / "build" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shown.screenshot, artifacts / "report.png")


def test_nan_and_infinite_metrics_still_give_a_page_that_marks_them(tmp_path: Path):
    """Exactly when a model is broken its metrics are NaN or inf: the page is still written, and a NaN
    output is not hidden behind a good one (min over [0.99, nan] depends on order)."""
    from kiln.state.html import model_page, worst_cosine

    metrics = {"a": {"min_cosine": 0.99, "max_abs_diff": 0.1}, "b": {"min_cosine": float("nan"), "max_abs_diff": float("inf")}}
    report = {"model": "broken", "artifacts": [
        {"target": "nan_target", "format": "onnx", "precision": "fp16", "bytes": 2048, "status": "ran", "passed": True,
         "metrics": metrics, "thresholds": {"max_abs_diff": float("inf")}, "latency": {"median_ms": float("nan")}},
        {"target": "good", "format": "onnx", "precision": "fp32", "bytes": 4096, "status": "ran", "passed": True,
         "metrics": {"a": {"min_cosine": 0.999999, "max_abs_diff": 1e-6}}}]}
    assert math.isnan(worst_cosine(metrics)) and math.isnan(worst_cosine(dict(reversed(metrics.items()))))
    page = model_page(tmp_path, report, None, None)
    assert "nonfinite" in svg_section(page, "plot-tradeoff") and "nonfinite (inf)" in svg_section(page, "plot-errors-b")
    row = next(r for r in page.split("<tr>") if r.startswith("<td>nan_target</td>"))
    assert "<td class=n>nan</td>" in row and "nonfinite metric" in row and "passed" not in row
    assert "nan" not in page.replace("nan_target", "").split("plot-errors-a")[1].split("</svg>")[0]  # finite output a drawn as usual


def svg_section(page: str, plot_id: str) -> str:
    return page.split(f'id="{plot_id}"')[1].split("</svg>")[0]


def test_each_outputs_row_errors_are_drawn_per_target_from_validation_json(build: Path):
    validation = json.loads((build / MODEL / "onnx" / "validation.json").read_text())
    distribution = validation["distributions"]["probabilities"]  # written by the validate rule
    assert distribution["rows"] == validation["metrics"]["probabilities"]["rows"]
    assert all("distributions" not in a for a in report_of(build)["artifacts"])  # report.json stays small
    page = write_model_html(build, MODEL, None).read_text()
    plot = svg_section(page, "plot-distributions-probabilities")
    assert "1 − cosine per row" in plot and ">1e-12<" in plot and ">1e2<" in plot
    bars = re.findall(r"<title>onnx max_abs_diff ([^<]*): (\d+) rows</title>", plot)
    hist = distribution["max_abs_diff"]
    assert sum(int(n) for _, n in bars) == sum(hist["counts"]) + hist["zero"] + hist["overflow"] > 0


def test_distributions_escape_names_mark_the_gate_and_note_targets_built_without_them(tmp_path: Path):
    from kiln.runtime.metrics import OutputMetrics
    from kiln.state.html import model_page

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 16)).astype(np.float32)
    m = OutputMetrics()
    m.add(ref, ref + np.float32(1e-3) * rng.standard_normal((8, 16)).astype(np.float32))
    folder = tmp_path / "build" / "m" / "new<t>"
    folder.mkdir(parents=True)
    (folder / "validation.json").write_text(json.dumps({"metrics": {"<out>": m.summary()}, "distributions": {"<out>": m.distribution()},
                                                        "thresholds": {"min_cosine": 0.999, "max_abs_diff": 0.01}}))
    (tmp_path / "build" / "m" / "old").mkdir()
    (tmp_path / "build" / "m" / "old" / "validation.json").write_text(json.dumps({"metrics": {"<out>": m.summary()}}))
    report = {"model": "m", "artifacts": [
        {"target": "new<t>", "path": "build/m/new<t>/model.onnx", "status": "ran", "passed": True},
        {"target": "old", "path": "build/m/old/model.onnx", "status": "ran", "passed": True}]}
    page = model_page(tmp_path, report, None, None)
    plot = svg_section(page, "plot-distributions-_3cout_3e")
    assert "new&lt;t&gt;" in plot and "<out>" not in page and "<t>" not in page
    assert "<title>gate 0.001</title>" in plot and "<title>gate 0.01</title>" in plot  # 1 - min_cosine, max_abs_diff
    assert sum(int(n) for n in re.findall(r"max_abs_diff [^<]*: (\d+) rows", plot)) == 8
    assert "no distribution stored" in plot  # the old target's row
    assert page == model_page(tmp_path, report, None, None)
    older = model_page(tmp_path, {"model": "m", "artifacts": report["artifacts"][1:]}, None, None)
    assert "plot-distributions" not in older and "no target's validation.json has error distributions" in older


def test_quantized_targets_show_their_latency_against_fp32_and_the_layers_kept_in_float(tmp_path: Path):
    from kiln.state.html import model_page

    fallback = {"goal": {"min_cosine": 0.98}, "passed": True, "bytes_cost": 1769472, "latency_ms": {"all_quantized": 7.8, "with_fallback": 8.1},
                "kept": [{"node": "/l3/<Gemm>", "weight": "layer.3.<w>", "alone": {"min_cosine": 0.9887, "mean_cosine": 0.9981}}],
                "trials": [{"kept": 0, "min_cosine": 0.9692, "mean_cosine": 0.996, "passed": False},
                           {"kept": 1, "min_cosine": 0.9821, "mean_cosine": 0.998, "passed": True}],
                "scan": {"ran": True, "reused": False, "layers": 37, "samples": 64, "seconds": 41.2}, "search_seconds": 12.3}
    report = {"model": "m", "artifacts": [
        {"target": "fp32", "format": "onnx", "precision": "fp32", "status": "ran", "latency": {"median_ms": 22.5}},
        {"target": "int8", "format": "onnx", "precision": "int8", "status": "ran", "latency": {"median_ms": 8.063}, "fallback": fallback,
         "latency_vs_fp32": {"target": "fp32", "ratio": 0.358, "fp32_ms": 22.5, "ms": 8.063}},
        {"target": "int4", "format": "onnx", "precision": "int4", "status": "ran", "latency": {"median_ms": 28.5},
         "latency_vs_fp32": {"target": "fp32", "ratio": 1.267, "fp32_ms": 22.5, "ms": 28.5}}],
        "warnings": ["int4 (int4) runs 1.27x slower than fp32 (28.5 vs 22.5 ms, shape input_ids [1, 128], 2 threads)"]}
    page = model_page(tmp_path, report, None, None)
    targets = page[page.index("<h2>Targets"):page.index("<h2>Size")]
    assert "(0.36× fp32)</span>" in targets and '<span class=bad title="28.5 ms against fp32' in targets
    kept = page[page.index("<h2>Layers kept in higher precision"):page.index("<h2>Calibration")]
    assert "<code>layer.3.&lt;w&gt;</code>" in kept and "<td class=n>0.9887</td><td class=n>0.9981</td>" in kept and "<Gemm>" not in page
    assert "size +1.7 MiB" in kept and "7.8 ms all quantized → 8.1 ms" in kept and kept.count("<tr><td class=n>") == 2  # two trials
    assert "scan of 37 layers on 64 samples 41.2 s · search 12.3 s" in kept
    assert "runs 1.27x slower than fp32" in page
    from kiln.state.html import scan_summary

    assert scan_summary({"ran": False, "why": "the all-quantized model passes the gates"}) == ["no scan: the all-quantized model passes the gates"]
    assert scan_summary({"ran": True, "reused": True, "layers": 37, "samples": 64, "seconds": 0.01}) == ["scan of 37 layers on 64 samples reused from an earlier build"]
    assert scan_summary(None) == []  # a report from before the scan moved into the quantize step
    plain = model_page(tmp_path, {"model": "m", "artifacts": [dict(report["artifacts"][0])]}, None, None)
    assert "Layers kept in higher precision" not in plain and "×" not in plain  # no fallback, no ratio: nothing added


def test_the_trials_table_says_which_trials_stopped_early():
    from kiln.state.html import trials_table

    html = trials_table({"trials": [{"kept": 0, "min_cosine": 0.87, "mean_cosine": 0.99, "passed": False, "stopped_early": True},
                                    {"kept": 2, "min_cosine": 0.95, "mean_cosine": 0.995, "passed": True}]})
    assert html.count("stopped at the first batch failing") == 1
