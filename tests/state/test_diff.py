"""kiln diff (kiln.state.diff): per-target changes between two builds' reports and lockfiles, and
--fail-on gates that fail when a metric got worse in the direction that matters."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.errors import UsageError
from kiln.state.diff import parse_gate

REPORT = {
    "model": "tiny",
    "artifacts": [
        {"target": "onnx_fp32", "bytes": 1000, "passed": True, "status": "ran", "latency": {"median_ms": 2.0},
         "metrics": {"scores": {"min_cosine": 0.99999, "mean_cosine": 1.0, "max_abs_diff": 1e-6, "max_rel_diff": 1e-6, "nonfinite": 0}}},
        {"target": "onnx_int8", "bytes": 300, "passed": True, "status": "ran",
         "metrics": {"scores": {"min_cosine": 0.995, "mean_cosine": 0.999, "max_abs_diff": 0.01, "max_rel_diff": 0.02, "nonfinite": 0}}},
    ],
}
LOCK = {"lock_version": 1, "model": "tiny", "artifacts": [
    {"target": "onnx_fp32", "path": "build/tiny/onnx_fp32/model.onnx", "sha256": "a" * 64, "bytes": 1000},
    {"target": "onnx_int8", "path": "build/tiny/onnx_int8/model.onnx", "sha256": "b" * 64, "bytes": 300}]}


def _write(folder: Path, report: dict, lock: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report))
    if lock is not None:
        (folder / "kiln.lock.json").write_text(json.dumps(lock))
    return folder


def _worse(change) -> dict:
    report = copy.deepcopy(REPORT)
    change({a["target"]: a for a in report["artifacts"]})
    return report


def _diff(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["diff", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_builds_pass_every_gate(tmp_path, capsys):
    a, b = _write(tmp_path / "a", REPORT, LOCK), _write(tmp_path / "b", REPORT, LOCK)
    code, out, err = _diff(capsys, str(a), str(b), "--fail-on", "min_cosine=0", "--fail-on", "max_abs_diff=0")
    assert (code, err) == (0, "")
    assert "onnx_fp32: same digest" in out and "onnx_int8: same digest" in out


def test_a_cosine_drop_beyond_the_threshold_fails_naming_the_target(tmp_path, capsys):
    a = _write(tmp_path / "a", REPORT)
    b = _write(tmp_path / "b", _worse(lambda t: t["onnx_int8"]["metrics"]["scores"].update(min_cosine=0.990)))
    code, out, err = _diff(capsys, str(a / "report.json"), str(b / "report.json"), "--fail-on", "min_cosine=0.001")
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("kiln: regression: tiny/onnx_int8: scores.min_cosine: 0.995 -> 0.99,")
    assert "scores.min_cosine: 0.995 -> 0.99 (-0.005" in out
    # within the threshold, and a drop of a metric no gate names, pass
    assert _diff(capsys, str(a), str(b), "--fail-on", "min_cosine=0.01")[0] == 0
    assert _diff(capsys, str(a), str(b), "--fail-on", "max_abs_diff=0")[0] == 0


def test_lower_is_better_metrics_fail_when_they_rise_not_when_they_fall(tmp_path, capsys):
    a = _write(tmp_path / "a", REPORT)
    rose = _write(tmp_path / "rose", _worse(lambda t: t["onnx_fp32"]["metrics"]["scores"].update(max_abs_diff=1e-3)))
    fell = _write(tmp_path / "fell", _worse(lambda t: t["onnx_int8"]["metrics"]["scores"].update(max_abs_diff=1e-3)))
    assert _diff(capsys, str(a), str(rose), "--fail-on", "max_abs_diff=1e-4")[0] == 1
    assert _diff(capsys, str(a), str(fell), "--fail-on", "max_abs_diff=1e-4")[0] == 0


def test_nan_a_lost_metric_or_a_removed_target_never_passes_a_gate(tmp_path, capsys):
    a = _write(tmp_path / "a", REPORT)
    nan = _write(tmp_path / "nan", _worse(lambda t: t["onnx_int8"]["metrics"]["scores"].update(min_cosine=float("nan"))))
    lost = _write(tmp_path / "lost", _worse(lambda t: t["onnx_int8"].update(metrics=None)))
    removed = _write(tmp_path / "removed", {"model": "tiny", "artifacts": REPORT["artifacts"][:1]})
    for worse in (nan, lost, removed):
        code, _, err = _diff(capsys, str(a), str(worse), "--fail-on", "min_cosine=1")
        assert code == 1 and "onnx_int8" in err, worse


def test_size_and_latency_gates_take_percentages(tmp_path, capsys):
    a = _write(tmp_path / "a", REPORT)
    slower = _write(tmp_path / "b", _worse(lambda t: t["onnx_fp32"].update(latency={"median_ms": 2.3}, bytes=1040)))
    assert _diff(capsys, str(a), str(slower), "--fail-on", "latency_ms=10%")[0] == 1
    assert _diff(capsys, str(a), str(slower), "--fail-on", "latency_ms=20%", "--fail-on", "bytes=5%")[0] == 0
    assert _diff(capsys, str(a), str(slower), "--fail-on", "bytes=3%")[0] == 1


def test_lockfile_digest_change_is_shown(tmp_path, capsys):
    changed = copy.deepcopy(LOCK)
    changed["artifacts"][1]["sha256"] = "c" * 64
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(LOCK))
    b.write_text(json.dumps(changed))
    code, out, _ = _diff(capsys, str(a), str(b))
    assert code == 0 and f"onnx_int8: digest {'b' * 12} -> {'c' * 12}" in out and "onnx_fp32: same digest" in out


def test_against_a_git_ref_reads_the_committed_report(tmp_path, capsys, monkeypatch):
    build = _write(tmp_path / "build" / "tiny", REPORT, LOCK)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "add", "build"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "build"], check=True)
    _write(build, _worse(lambda t: t["onnx_fp32"]["metrics"]["scores"].update(mean_cosine=0.9)))
    monkeypatch.chdir(tmp_path)
    code, out, err = _diff(capsys, "--against", "HEAD", "--fail-on", "mean_cosine=0.01")
    assert code == 1 and "tiny/onnx_fp32: scores.mean_cosine: 1 -> 0.9" in err
    assert out.startswith("tiny: HEAD:build/tiny -> ")


@pytest.mark.parametrize("text", ["min_cosine", "cosine=0.1", "min_cosine=-1", "min_cosine=nan", "bytes=x%"])
def test_bad_gates_are_refused_in_one_line(text):
    with pytest.raises(UsageError, match="--fail-on"):
        parse_gate(text)


def test_no_previous_build_says_how_to_compare(tmp_path, capsys):
    build = _write(tmp_path / "build" / "tiny", REPORT)
    code, _, err = _diff(capsys, str(build))
    assert code == 2 and "give two paths or --against GIT_REF" in err
