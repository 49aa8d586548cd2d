"""kiln.engine.reporter: kiln's end of a doit run.

reporter_for(plans) gives doit a reporter class that knows those plans (each call its own class, the
base left alone). At complete_run the reporter writes, per manifest the run touched, report.json and
the summary line; for a manifest whose steps all ran or were up to date, the lockfile, provenance and
a fresh entry (so the next plain build may leave it unplanned); for a failed one, no new lockfile and
no fresh entry (the earlier one is forgotten). Manifests the run did not touch are left alone, and a
step shared by two manifests touches both, each naming it by its own targets. The workspace lock is
held from initialize to complete_run, and released even when writing the reports fails.

The workspace (a.toml and b.toml on one ONNX file, so they share two steps; c.toml on its own) is
built once by doit in this process; each test copies it, plans it, and drives the reporter's methods
with doit Task objects as doit would."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed
from doit.task import Task

from conftest import Workspace, new_workspace
from kiln.engine import reporter as reporter_module
from kiln.engine.reporter import KilnReporter, reporter_for
from kiln.engine.tasks import doit_globals
from kiln.execute.resources import lock_workspace
from kiln.plan.load import load_plans
from kiln.plan.steps import Plan
from kiln.state import fresh
from workspaces import MANIFEST, mlp


def shared_workspace(root: Path) -> Workspace:
    shared = MANIFEST.replace("models/{name}.onnx", "models/shared.onnx")
    ws = new_workspace(root, {"a": shared.format(name="a"), "b": shared.format(name="b"), "c": MANIFEST.format(name="c")})
    mlp(ws.root / "manifests/models/shared.onnx", seed=0)
    mlp(ws.root / "manifests/models/c.onnx", seed=1)
    np.savez(ws.root / "manifests/data/x.npz", x=np.random.default_rng(7).standard_normal((32, 8)).astype(np.float32))
    return ws


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    """Built once by doit in this process, through dodo.py's namespace (read-only: copy it first)."""
    ws = shared_workspace(tmp_path_factory.mktemp("reporter") / "ws")
    with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"KILN_CACHE": "off"}):
        out = Path(folder) / "doit.out"  # doit binds sys.stdout on import: its reporter writes here instead
        code = DoitMain(ModuleTaskLoader(doit_globals(ws.root, "", skip_unchanged=False))).run(["-o", str(out), "build"])
        lines = out.read_text().splitlines()
    assert code == 0, lines
    assert [line for line in lines if line.startswith("kiln: ")] == [
        "kiln: a: 3 ran, 0 up to date, 0 failed -> build/a/report.json",
        "kiln: b: 3 ran, 0 up to date, 0 failed -> build/b/report.json",
        "kiln: c: 3 ran, 0 up to date, 0 failed -> build/c/report.json",
    ]
    return ws


@pytest.fixture
def ws(built: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(built.root, tmp_path / "ws", symlinks=True, ignore=lambda folder, names: [".kiln"] if Path(folder) == built.root else [])
    return Workspace(tmp_path / "ws")


@pytest.fixture
def plans(ws: Workspace) -> list[Plan]:
    return load_plans(ws.root, None)


def plan_of(plans: list[Plan], model: str) -> Plan:
    return next(p for p in plans if p.model == model)


def task(name: str) -> Task:
    return Task(f"build:{name}", None)


class Run:
    """A doit run as the reporter sees it: initialize, then per task what happened, then complete_run."""

    def __init__(self, plans: list[Plan]):
        self.out = io.StringIO()
        self.reporter = reporter_for(plans)(self.out, {})
        self.reporter.initialize([], [])

    def ran(self, *names: str) -> "Run":
        for name in names:
            self.reporter.execute_task(task(name))
            self.reporter.add_success(task(name))
        return self

    def up_to_date(self, *names: str) -> "Run":
        for name in names:
            self.reporter.skip_uptodate(task(name))
        return self

    def failed(self, name: str, message: str = "validation failed") -> "Run":
        self.reporter.execute_task(task(name))
        self.reporter.add_failure(task(name), TaskFailed(message))
        return self

    def complete(self) -> list[str]:
        self.reporter.complete_run()
        return [line for line in self.out.getvalue().splitlines() if line.startswith("kiln: ")]


C_STEPS = ("c/fp32/reference_outputs", "c/fp32/simplify_onnx", "c/fp32/validate")


def clear(ws: Workspace, model: str) -> dict[str, bytes]:
    """Remove what the reporter writes for a manifest; returns what was there."""
    files = [ws.root / f"build/{model}/report.json", ws.root / f"build/{model}/kiln.lock.json",
             ws.root / f"build/{model}/fp32/provenance.intoto.json", fresh.entry_path(ws.root, ws.manifest(model))]
    before = {str(p.relative_to(ws.root)): p.read_bytes() for p in files}
    for path in files:
        path.unlink()
    return before


# ---- the class doit instantiates ----------------------------------------------------------------

def test_reporter_for_gives_each_call_its_own_class_with_its_plans(tmp_path: Path):
    first_plans = [Plan("a", tmp_path / "manifests/a.toml", tmp_path, [])]
    second_plans = [Plan("b", tmp_path / "manifests/b.toml", tmp_path, [])]
    first, second = reporter_for(first_plans), reporter_for(second_plans)
    assert issubclass(first, KilnReporter) and issubclass(second, KilnReporter) and first is not second
    assert first.plans is first_plans and second.plans is second_plans
    assert KilnReporter.plans == []  # the base class is not changed
    assert first(io.StringIO(), {}).plans is first_plans  # what doit's instance sees


# ---- the end of a run -----------------------------------------------------------------------------

def test_a_manifest_whose_steps_ran_gets_its_report_lockfile_provenance_and_fresh_entry(ws: Workspace, plans: list[Plan]):
    before = clear(ws, "c")
    lines = Run(plans).ran(*C_STEPS).complete()
    assert lines == ["kiln: c: 3 ran, 0 up to date, 0 failed -> build/c/report.json"]
    report = ws.report("c")
    assert report["ok"] and report["counts"]["ran"] == 3 and [s["status"] for s in report["steps"]] == ["ran"] * 3
    assert (ws.root / "build/c/kiln.lock.json").read_bytes() == before["build/c/kiln.lock.json"]  # the same build, the same lockfile
    assert (ws.root / "build/c/fp32/provenance.intoto.json").is_file()
    assert set(fresh.unchanged(ws.root, [ws.manifest("c")])) == {ws.manifest("c")}  # the next plain build may skip it


def test_a_manifest_found_up_to_date_is_remembered_as_unchanged(ws: Workspace, plans: list[Plan]):
    clear(ws, "c")
    lines = Run(plans).up_to_date(*C_STEPS).complete()
    assert lines == ["kiln: c: 0 ran, 3 up to date, 0 failed -> build/c/report.json"]
    assert ws.report("c")["counts"]["up to date"] == 3 and (ws.root / "build/c/kiln.lock.json").is_file()
    assert set(fresh.unchanged(ws.root, [ws.manifest("c")])) == {ws.manifest("c")}


def test_a_failed_manifest_is_forgotten_and_keeps_its_last_good_lockfile(ws: Workspace, plans: list[Plan]):
    entry = fresh.entry_path(ws.root, ws.manifest("c"))
    lock = ws.root / "build/c/kiln.lock.json"
    good_lock = lock.read_bytes()
    assert entry.is_file()
    lines = Run(plans).ran(*C_STEPS[:2]).failed("c/fp32/validate").complete()
    assert lines == ["kiln: c: 2 ran, 0 up to date, 1 failed -> build/c/report.json"]
    report = ws.report("c")
    assert not report["ok"] and report["counts"]["failed"] == 1
    assert not entry.exists()  # the next build plans it
    assert lock.read_bytes() == good_lock


def test_manifests_the_run_did_not_touch_are_left_alone(ws: Workspace, plans: list[Plan]):
    untouched = {model: clear(ws, model) for model in ("a", "b")}
    clear(ws, "c")
    lines = Run(plans).ran(*C_STEPS).complete()
    assert lines == ["kiln: c: 3 ran, 0 up to date, 0 failed -> build/c/report.json"]
    for model, files in untouched.items():
        assert not any((ws.root / name).exists() for name in files), model


def test_a_shared_step_touches_every_manifest_that_shares_it_each_by_its_own_targets(ws: Workspace, plans: list[Plan]):
    for model in ("a", "b", "c"):
        clear(ws, model)
    lines = Run(plans).ran("a/fp32/simplify_onnx").complete()  # doit names a shared task after its first manifest
    assert lines == ["kiln: a: 1 ran, 0 up to date, 0 failed, 2 not run -> build/a/report.json",
                     "kiln: b: 1 ran, 0 up to date, 0 failed, 2 not run -> build/b/report.json"]
    assert {s["step"]: s["status"] for s in ws.report("b")["steps"]}["b/fp32/simplify_onnx"] == "ran"
    assert not (ws.root / "build/c/report.json").exists()
    assert not fresh.entry_path(ws.root, ws.manifest("a")).exists()  # a partial run proves nothing about the rest


def test_a_validate_step_failing_in_one_manifest_does_not_forget_the_other(ws: Workspace, plans: list[Plan]):
    lines = Run(plans).up_to_date("a/fp32/reference_outputs", "a/fp32/simplify_onnx", "b/fp32/validate").failed("a/fp32/validate").complete()
    assert lines == ["kiln: a: 0 ran, 2 up to date, 1 failed -> build/a/report.json",
                     "kiln: b: 0 ran, 3 up to date, 0 failed -> build/b/report.json"]
    assert not fresh.entry_path(ws.root, ws.manifest("a")).exists()
    assert fresh.entry_path(ws.root, ws.manifest("b")).is_file()


# ---- the workspace lock ---------------------------------------------------------------------------

def test_the_workspace_is_locked_from_initialize_to_complete_run(ws: Workspace, plans: list[Plan]):
    run = Run(plans)
    assert lock_workspace(ws.root, wait=False) is None  # a second build would wait
    run.up_to_date(*C_STEPS).complete()
    again = lock_workspace(ws.root, wait=False)
    assert again is not None
    again.close()


def test_the_lock_is_released_even_when_writing_the_reports_fails(ws: Workspace, plans: list[Plan], monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(reporter_module, "build_report", broken)
    run = Run(plans).up_to_date(*C_STEPS)
    with pytest.raises(OSError, match="disk full"):
        run.complete()
    again = lock_workspace(ws.root, wait=False)
    assert again is not None
    again.close()


# ---- an interrupted build -----------------------------------------------------------------------


def test_a_build_interrupted_in_a_step_does_not_report_it_as_ran(ws: Workspace, monkeypatch):
    from kiln.rules import get_rule

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while the step runs

    ws.edit("batch_size = 16", "batch_size = 8", name="c")  # reference_outputs and validate must run again
    monkeypatch.setattr(get_rule("validate"), "run", interrupted)
    monkeypatch.setenv("KILN_CACHE", "off")
    with tempfile.TemporaryDirectory() as folder:
        with pytest.raises(KeyboardInterrupt):
            DoitMain(ModuleTaskLoader(doit_globals(ws.root, "c", skip_unchanged=False))).run(["-o", str(Path(folder) / "out"), "build"])
    report = ws.report("c")
    assert {s["step"]: s["status"] for s in report["steps"]}["c/fp32/validate"] != "ran"
    assert not report["ok"]


# ---- what a failure prints ------------------------------------------------------------------------

def test_a_failed_step_prints_its_one_line_and_nothing_of_doits_failure_report():
    from doit.exceptions import TaskError, UnmetDependency

    from kiln.execute.step import StepFailed

    out = io.StringIO()
    reporter = reporter_for([])(out, {})
    reporter.initialize([], [])
    line = "m/t/export_onnx: ValueError: boom (at model.py:3) (log: build/.kiln/logs/export_onnx-1.log)"
    failing, waiting, broken = task("m/t/export_onnx"), task("m/t/validate"), task("m/t/calibrate")
    failing.executed = True  # doit's failure dump (captured output) is for executed tasks
    reporter.add_failure(failing, StepFailed(line))
    reporter.add_failure(waiting, UnmetDependency("build:m/t/export_onnx"))
    reporter.add_failure(broken, TaskError("PythonAction Error"))  # kiln itself broke outside a rule: doit's report, as before
    reporter.complete_run()
    lines = out.getvalue().splitlines()
    assert lines[:2] == [line, "m/t/validate: not run: m/t/export_onnx failed"]
    assert "TaskError - taskid:build:m/t/calibrate" in lines and not any("TaskFailed" in x or "<stdout>" in x for x in lines)
    assert reporter.statuses == {"m/t/export_onnx": "failed", "m/t/validate": "failed", "m/t/calibrate": "failed"}
