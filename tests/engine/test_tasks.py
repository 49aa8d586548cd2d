"""kiln.engine.tasks: steps as doit tasks, and what dodo.py hands doit.

to_task, on steps built by hand (a rule registered here): the task's name, doc, actions (run_step),
uptodate (kiln's is_up_to_date), task_dep (the task names of the step's dependencies), targets and
clean; doit itself, run in-process on such tasks, builds a named task's dependencies first and skips
what kiln finds up to date. doit_globals, in-process on workspaces of tiny ONNX manifests (planning
only, except one in-process build): DOIT_CONFIG (doit's database and kiln's reporter under
build/.kiln), one task per step id even when two manifests share a step, manifest= selecting, a bad
manifest exiting with code 2 and one stderr line before anything is written, and which manifests are
taken as unchanged (none in a workspace never built; every unchanged one after a build, but none
while another build holds the workspace)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

from conftest import Workspace, new_workspace
from kiln.base.paths import state_dir
from kiln.engine.reporter import KilnReporter
from kiln.engine.tasks import clean_outputs, doit_globals, to_task
from kiln.execute.resources import lock_workspace
from kiln.execute.step import run_step
from kiln.plan.steps import Plan, Step, identity
from kiln.rules import Params, Rule, RunContext, register
from kiln.state.uptodate import is_up_to_date
from workspaces import MANIFEST, mlp, mlp_workspace

RULE = "test_tasks_append"


class AppendParams(Params):
    tail: str = ""


@register
class Append(Rule):
    """Writes its input's text plus the tail."""

    name: ClassVar[str] = RULE
    version: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ("numpy",)
    Params: ClassVar[type[Params]] = AppendParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: AppendParams, ctx: RunContext) -> dict[str, Any]:
        outputs["text"].write_text(inputs["text"][0].read_text() + params.tail)
        return {}


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "off")
    monkeypatch.delenv("KILN_FRESH", raising=False)


def hand_step(root: Path, source: Path, tail: str, target: str, folder: Path | None = None, deps: tuple[Step, ...] = ()) -> Step:
    inputs = {"text": (source,)}
    params = {"tail": tail}
    step_id = f"{RULE}-{identity(RULE, params, inputs, root)[:12]}"
    out = (folder or root / "build" / ".steps" / step_id) / "text.txt"
    return Step(id=step_id, rule=RULE, params=params, inputs=inputs, outputs={"text": out}, model="m", targets=[target],
                deps=[d.id for d in deps])


def hand_plan(root: Path) -> Plan:
    """m.toml: `first` appends " one" to src/in.txt, `second` appends " two" to first's output and
    puts it in build/m/t/."""
    source = root / "src" / "in.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("zero")
    first = hand_step(root, source, " one", "a")
    second = hand_step(root, first.outputs["text"], " two", "t", folder=root / "build" / "m" / "t", deps=(first,))
    return Plan("m", root / "manifests" / "m.toml", root, [first, second])


def run_doit(namespace: dict[str, Any], *args: str) -> tuple[int, list[str]]:
    """doit in this process; returns its exit code and the lines its reporter wrote (to a file: doit
    binds its default output stream, sys.stdout, when it is imported)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "doit.out"
        code = DoitMain(ModuleTaskLoader(namespace)).run(["-o", str(out), *args])
        return code, out.read_text().splitlines()


# ---- to_task ----------------------------------------------------------------------------------------

def test_to_task_gives_doit_the_steps_name_deps_targets_and_clean(tmp_path: Path):
    plan = hand_plan(tmp_path)
    first, second = plan.steps
    names = {s.id: s.name for s in plan.steps}
    task = to_task(second, plan, names)
    assert task["name"] == "m/t/test_tasks_append"
    assert task["task_dep"] == ["build:m/a/test_tasks_append"]
    assert task["targets"] == [str(tmp_path / "build" / "m" / "t" / "text.txt")]
    (clean, clean_args), = task["clean"]  # kiln's own: doit's leaves a folder output that is not empty
    assert clean is clean_outputs and clean_args == [[tmp_path / "build" / "m" / "t" / "text.txt"]]
    assert task["doc"] == "test_tasks_append for t of m.toml"
    assert to_task(first, plan, names)["task_dep"] == []


def test_the_clean_action_removes_file_and_folder_outputs_and_a_dry_run_removes_nothing(tmp_path: Path, capsys):
    folder, file = tmp_path / "model.mlpackage", tmp_path / "validation.json"
    (folder / "Data").mkdir(parents=True)
    (folder / "Data" / "weight.bin").write_bytes(b"w")
    file.write_text("{}")
    clean_outputs([folder, file, tmp_path / "never built"], dryrun=True)
    assert (folder / "Data" / "weight.bin").exists() and file.exists()
    assert capsys.readouterr().out.splitlines() == [f"removing file '{file}'", f"removing folder '{folder}'"]
    clean_outputs([folder, file])
    assert sorted(tmp_path.iterdir()) == []


def test_the_tasks_action_runs_the_step_and_its_uptodate_asks_kiln(tmp_path: Path):
    plan = hand_plan(tmp_path)
    names = {s.id: s.name for s in plan.steps}
    first, second = (to_task(s, plan, names) for s in plan.steps)
    (action, action_args), = second["actions"]
    (check, check_args), = second["uptodate"]
    assert action is run_step and action_args == [plan.steps[1], tmp_path]
    assert check is is_up_to_date and check_args == [plan.steps[1], tmp_path]
    assert check(*check_args) is False
    for task in (first, second):
        (action, action_args), = task["actions"]
        assert "key" in action(*action_args)
    assert (tmp_path / "build/m/t/text.txt").read_text() == "zero one two"
    assert check(*check_args) is True


def test_a_shared_step_says_how_many_other_manifests_targets_need_it(tmp_path: Path):
    plan = hand_plan(tmp_path)
    shared = plan.steps[0]
    shared.shared_with = [("b", "x"), ("c", "y")]
    assert to_task(shared, plan, {s.id: s.name for s in plan.steps})["doc"] == \
        "test_tasks_append for a of m.toml (and 2 targets of other manifests)"


def test_doit_builds_a_named_tasks_dependencies_first_and_skips_what_kiln_finds_up_to_date(tmp_path: Path):
    plan = hand_plan(tmp_path)

    def task_build():
        names = {s.id: s.name for s in plan.steps}
        for step in plan.steps:
            yield to_task(step, plan, names)

    namespace = {"DOIT_CONFIG": {"dep_file": str(tmp_path / "doit.db"), "backend": "sqlite3", "default_tasks": ["build"]},
                 "task_build": task_build}
    code, lines = run_doit(namespace, "build:m/t/test_tasks_append")
    assert code == 0 and lines == [".  build:m/a/test_tasks_append", ".  build:m/t/test_tasks_append"]
    assert (tmp_path / "build/m/t/text.txt").read_text() == "zero one two"
    code, lines = run_doit(namespace, "build")
    assert code == 0 and lines == ["-- build:m/a/test_tasks_append", "-- build:m/t/test_tasks_append"]
    source = tmp_path / "src" / "in.txt"
    source.write_text("nought")  # another size: the digest cache sees the change
    code, lines = run_doit(namespace, "build")
    assert code == 0 and lines == [".  build:m/a/test_tasks_append", ".  build:m/t/test_tasks_append"]
    assert (tmp_path / "build/m/t/text.txt").read_text() == "nought one two"


# ---- doit_globals -----------------------------------------------------------------------------------

def shared_workspace(root: Path) -> Workspace:
    """a.toml and b.toml: the same ONNX file and data, so their simplify and reference steps are one."""
    text = MANIFEST.replace("models/{name}.onnx", "models/shared.onnx")
    ws = new_workspace(root, {name: text.format(name=name) for name in ("a", "b")})
    mlp(ws.root / "manifests/models/shared.onnx", seed=0)
    np.savez(ws.root / "manifests/data/x.npz", x=np.random.default_rng(7).standard_normal((32, 8)).astype(np.float32))
    return ws


def tasks_of(namespace: dict[str, Any]) -> list[dict[str, Any]]:
    return list(namespace["task_build"]())


def test_doit_config_puts_doits_database_and_kilns_reporter_under_build_kiln(tmp_path: Path):
    ws = mlp_workspace(tmp_path / "ws")
    namespace = doit_globals(ws.root, "", skip_unchanged=False)
    config = namespace["DOIT_CONFIG"]
    assert config["dep_file"] == str(ws.root / "build" / ".kiln" / "doit.db") and config["backend"] == "sqlite3"
    assert config["default_tasks"] == ["build"]
    reporter = config["reporter"]
    assert issubclass(reporter, KilnReporter) and [p.model for p in reporter.plans] == ["a", "b"]
    assert state_dir(ws.root).is_dir()
    names = [t["name"] for t in tasks_of(namespace)]
    assert sorted(names) == sorted(f"{m}/fp32/{r}" for m in "ab" for r in ("reference_outputs", "simplify_onnx", "validate"))


def test_a_step_two_manifests_share_is_one_task(tmp_path: Path):
    ws = shared_workspace(tmp_path / "ws")
    namespace = doit_globals(ws.root, "", skip_unchanged=False)
    plans = namespace["DOIT_CONFIG"]["reporter"].plans
    assert sum(len(p.steps) for p in plans) == 6
    tasks = tasks_of(namespace)
    names = [t["name"] for t in tasks]
    assert sorted(names) == ["a/fp32/reference_outputs", "a/fp32/simplify_onnx", "a/fp32/validate", "b/fp32/validate"]
    deps = {t["name"]: t["task_dep"] for t in tasks}
    assert sorted(deps["b/fp32/validate"]) == ["build:a/fp32/reference_outputs", "build:a/fp32/simplify_onnx"]
    assert all(dep.removeprefix("build:") in names for t in tasks for dep in t["task_dep"])  # doit finds every dependency
    assert len({target for t in tasks for target in t["targets"]}) == sum(len(t["targets"]) for t in tasks)  # no file made twice


def test_manifest_selects_which_manifests_become_tasks(tmp_path: Path):
    ws = mlp_workspace(tmp_path / "ws")
    namespace = doit_globals(ws.root, "b", skip_unchanged=False)
    assert [p.model for p in namespace["DOIT_CONFIG"]["reporter"].plans] == ["b"]
    assert sorted(t["name"] for t in tasks_of(namespace)) == ["b/fp32/reference_outputs", "b/fp32/simplify_onnx", "b/fp32/validate"]


@pytest.mark.parametrize("skip_unchanged", [True, False])
def test_a_bad_manifest_exits_with_code_2_and_one_line_before_anything_is_written(tmp_path: Path, capsys, skip_unchanged: bool):
    ws = mlp_workspace(tmp_path / "ws")
    ws.edit("batch_size = 16", "batch_size = -1", name="b")
    with pytest.raises(SystemExit) as exit_:
        doit_globals(ws.root, "", skip_unchanged=skip_unchanged)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"kiln: error: {ws.manifest('b')}: validation.batch_size") and "-1" in err
    assert not (ws.root / "build").exists()


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("KILN_REMOTE_CACHE_UPLOAD", "sometimes", "KILN_REMOTE_CACHE_UPLOAD: 'sometimes' is not allowed; use 0 or 1"),
    ("KILN_EXECUTOR", "dask", "KILN_EXECUTOR: 'dask' is not an executor; allowed: local, ray"),
])
def test_a_bad_build_setting_exits_with_code_2_and_one_line_before_anything_runs(tmp_path: Path, capsys, monkeypatch, variable, value, message):
    ws = mlp_workspace(tmp_path / "ws")
    monkeypatch.setenv("KILN_REMOTE_CACHE", "http://127.0.0.1:1")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        doit_globals(ws.root, "", skip_unchanged=False)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err
    assert not (ws.root / "build").exists()


def test_in_a_workspace_never_built_nothing_is_taken_as_unchanged(tmp_path: Path, capsys):
    ws = mlp_workspace(tmp_path / "ws")
    namespace = doit_globals(ws.root, "", skip_unchanged=True)
    assert [p.model for p in namespace["DOIT_CONFIG"]["reporter"].plans] == ["a", "b"]
    assert len(tasks_of(namespace)) == 6
    assert capsys.readouterr().out == ""  # no manifest reported as a no-op
    assert not (state_dir(ws.root) / "fresh").exists() and not (ws.root / "build" / "a").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    """a.toml and b.toml built once by doit in this process (read-only: copy it before changing it)."""
    ws = mlp_workspace(tmp_path_factory.mktemp("tasks") / "ws")
    with mock.patch.dict(os.environ, {"KILN_CACHE": "off"}):
        code, lines = run_doit(doit_globals(ws.root, "", skip_unchanged=False), "build")
    assert code == 0, lines
    assert "kiln: a: 3 ran, 0 up to date, 0 failed -> build/a/report.json" in lines
    return ws


@pytest.fixture
def ws(built: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(built.root, tmp_path / "ws", symlinks=True)
    return Workspace(tmp_path / "ws")


SUMMARIES = ["kiln: a: 0 ran, 3 up to date, 0 failed -> build/a/report.json",
             "kiln: b: 0 ran, 3 up to date, 0 failed -> build/b/report.json"]


def test_after_a_build_unchanged_manifests_are_reported_not_planned(ws: Workspace, capsys):
    namespace = doit_globals(ws.root, "", skip_unchanged=True)
    assert namespace["DOIT_CONFIG"]["reporter"].plans == [] and tasks_of(namespace) == []
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("kiln: ")] == SUMMARIES  # and the summary table
    assert ws.report("a")["counts"]["up to date"] == 3


def test_without_skip_unchanged_every_manifest_is_planned(ws: Workspace, capsys):
    namespace = doit_globals(ws.root, "", skip_unchanged=False)
    assert [p.model for p in namespace["DOIT_CONFIG"]["reporter"].plans] == ["a", "b"] and len(tasks_of(namespace)) == 6
    assert capsys.readouterr().out == ""


def test_while_another_build_holds_the_workspace_nothing_is_taken_as_unchanged(ws: Workspace, capsys):
    other_build = lock_workspace(ws.root)
    found: list[dict[str, Any]] = []
    try:
        planner = threading.Thread(target=lambda: found.append(doit_globals(ws.root, "", skip_unchanged=True)), daemon=True)
        planner.start()
        planner.join(timeout=60)  # a guard against waiting for the lock, not a timing assertion
        assert not planner.is_alive(), "planning waited for the other build instead of planning every manifest"
    finally:
        other_build.close()
    (namespace,) = found
    assert [p.model for p in namespace["DOIT_CONFIG"]["reporter"].plans] == ["a", "b"] and len(tasks_of(namespace)) == 6
    assert capsys.readouterr().out == ""
