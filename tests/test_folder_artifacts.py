"""A step output, and a published artifact, that is a folder (Core ML's model.mlpackage, a TensorFlow
SavedModel), end to end through doit, kiln's reporter and the real validate rule.

The plan is built by hand: a test rule (test_folder_make) writes a folder, model.pkg, from a text
file of "<relative path>=<text>" lines, and validate publishes it for a test format (registered here
for the test's duration) whose runner multiplies x by the number in the folder's Data/scale.txt.
Checked: the first build publishes the folder as a folder at build/m/t/model.pkg, with its tree
digest and bytes in the lockfile, provenance and report, and `kiln verify` passes; a second build is
up to date; a file edited, added or removed in the published folder, or edited in the .steps/
intermediate, makes the step that wrote it run again, its record naming the file; a rerun that fails
(the rule, or validation) leaves the published folder as it was; with a cache, a fresh workspace
restores both folders with identical bytes; empty folders inside are published, restored, and
missed (by name) when removed; `doit clean` removes folder outputs."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from doit.cmd_base import ModuleTaskLoader
from doit.doit_cmd import DoitMain

import kiln.formats
from kiln.base.fsio import read_json
from kiln.engine.reporter import reporter_for
from kiln.engine.tasks import to_task
from kiln.errors import StepError
from kiln.native.safetensors import save_file
from kiln.plan.steps import Plan, Step, identity
from kiln.rules import Params, Rule, RunContext, register
from kiln.state.lockfile import lock_path, verify
from kiln.state.provenance import FILE
from kiln.state.records import read_record

MAKE = "test_folder_make"
FORMAT = "test_folder"
X = np.arange(12, dtype=np.float32).reshape(4, 3)


class MakeParams(Params):
    pass


@register
class MakeFolder(Rule):
    """Writes a folder at its output: one file per "<relative path>=<text>" line of its input, an
    empty folder per "<relative path>/" line; a line "fail" fails the step after writing part of it."""

    name: ClassVar[str] = MAKE
    version: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = MakeParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: MakeParams, ctx: RunContext) -> dict[str, Any]:
        for line in inputs["text"][0].read_text().splitlines():
            if line == "fail":
                raise StepError(ctx.step, "the spec says fail")
            if line.endswith("/"):  # a SavedModel's empty assets/, a Core ML package's empty weights folder
                (outputs["model"] / line).mkdir(parents=True, exist_ok=True)
                continue
            rel, text = line.split("=", 1)
            (outputs["model"] / rel).parent.mkdir(parents=True, exist_ok=True)
            (outputs["model"] / rel).write_text(text)
        return {}


class ScaleFormat:
    """Just what validate asks of a format: y = x * the number in the folder's Data/scale.txt."""

    format = FORMAT
    validation_tools: tuple[str, ...] = ()

    def open_runner(self, artifact):
        scale = float((artifact.path / "Data" / "scale.txt").read_text())
        return lambda feed: {"y": feed["x"] * np.float32(scale)}

    def latency(self, artifact: Path, sample: dict) -> None:
        return None

    def validation_hardware(self) -> None:
        return None


@pytest.fixture(autouse=True)
def scale_format(monkeypatch):
    monkeypatch.setitem(kiln.formats._BY_NAME, FORMAT, ScaleFormat())
    monkeypatch.setenv("KILN_CACHE", "off")
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)


SPEC = "Manifest.json={}\nData/scale.txt=2\nData/weights/weight.bin=0123456789\nassets/"


def workspace(root: Path, spec: str = SPEC) -> Plan:
    """src/spec.txt, src/reference.safetensors (y = 2x) and manifests/m.toml; the plan that makes the
    folder and publishes it."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "spec.txt").write_text(spec)
    save_file({"0000/in/x": X, "0000/out/y": X * 2}, root / "src" / "reference.safetensors")
    (root / "manifests").mkdir()
    (root / "manifests" / "m.toml").write_text("# the plan is built by hand\n")
    make_inputs = {"text": (root / "src" / "spec.txt",)}
    make_id = f"{MAKE}-{identity(MAKE, {}, make_inputs, root)[:12]}"
    make = Step(id=make_id, rule=MAKE, params={}, inputs=make_inputs, outputs={"model": root / "build" / ".steps" / make_id / "model.pkg"},
                model="m", targets=["t"])
    params = {"model": "m", "target": "t", "format": FORMAT, "precision": "fp32", "hardware": "cpu", "metrics": ["max_abs_diff"],
              "outputs": ["y"], "thresholds": {"max_abs_diff": 1e-6}}
    inputs = {"model": (make.outputs["model"],), "reference": (root / "src" / "reference.safetensors",)}
    publish_id = f"validate-{identity('validate', params, inputs, root)[:12]}"
    published = root / "build" / "m" / "t"
    publish = Step(id=publish_id, rule="validate", params=params, inputs=inputs, model="m", targets=["t"], deps=[make.id],
                   outputs={"artifact": published / "model.pkg", "validation": published / "validation.json"})
    return Plan("m", root / "manifests" / "m.toml", root, [make, publish])


def build(plan: Plan, *args: str) -> tuple[int, list[str]]:
    """doit in this process with kiln's reporter (report, lockfile, provenance); returns its exit
    code and what it wrote."""
    def task_build():
        names = {s.id: s.name for s in plan.steps}
        for step in plan.steps:
            yield to_task(step, plan, names)

    namespace = {"DOIT_CONFIG": {"dep_file": str(plan.root / "build" / ".kiln" / "doit.db"), "backend": "sqlite3",
                                 "default_tasks": ["build"], "reporter": reporter_for([plan])}, "task_build": task_build}
    (plan.root / "build" / ".kiln").mkdir(parents=True, exist_ok=True)  # as doit_globals does, before doit opens its database
    if args[:1] == ("clean",):  # a command of its own, without run's -o
        return DoitMain(ModuleTaskLoader(namespace)).run(list(args)), []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "doit.out"
        code = DoitMain(ModuleTaskLoader(namespace)).run(["-o", str(out), *(args or ("build",))])
        return code, out.read_text().splitlines()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def empty_folders(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() + "/" for p in folder.rglob("*") if p.is_dir() and not any(p.iterdir()))


def tree_digest(folder: Path) -> str:
    """The definition, computed here by hand: files and empty folders, after the version tag."""
    lines = {rel: hashlib.sha256(data).hexdigest() for rel, data in tree(folder).items()} | dict.fromkeys(empty_folders(folder), "dir")
    return hashlib.sha256(b"kiln-tree-v1\0" + "".join(f"{rel}\0{lines[rel]}\n" for rel in sorted(lines)).encode()).hexdigest()


def ran(lines: list[str]) -> list[str]:
    return [line[3:].split("  ")[0].removeprefix("build:") for line in lines if line.startswith(".  ")]


def up_to_date(lines: list[str]) -> list[str]:
    return [line[3:].removeprefix("build:") for line in lines if line.startswith("-- ")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workspace built once (copy it before changing it)."""
    root = tmp_path_factory.mktemp("folders") / "ws"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(kiln.formats._BY_NAME, FORMAT, ScaleFormat())
        patch.setenv("KILN_CACHE", "off")
        code, lines = build(workspace(root))
    assert code == 0, lines
    return root


@pytest.fixture
def ws(built: Path, tmp_path: Path) -> tuple[Path, Plan]:
    shutil.copytree(built, tmp_path / "ws")
    root = tmp_path / "ws"
    return root, replan(root)


def replan(root: Path) -> Plan:
    """The same plan for a workspace whose src/ already exists."""
    with tempfile.TemporaryDirectory() as scratch:
        plan = workspace(Path(scratch))
    swap = lambda p: root / p.relative_to(Path(scratch))  # noqa: E731 - a one-line path rewrite
    for step in plan.steps:
        step.inputs = {role: tuple(swap(p) for p in files) for role, files in step.inputs.items()}
        step.outputs = {role: swap(p) for role, p in step.outputs.items()}
    return Plan(plan.model, swap(plan.manifest), root, plan.steps)


PUBLISHED = "build/m/t/model.pkg"


def test_the_first_build_publishes_the_folder_and_locks_its_digest_and_bytes(built: Path):
    published = built / PUBLISHED
    assert published.is_dir() and tree(published) == {"Data/scale.txt": b"2", "Data/weights/weight.bin": b"0123456789", "Manifest.json": b"{}"}
    assert empty_folders(published) == ["assets/"]  # published with the folder, though it holds nothing
    plan = replan(built)
    assert tree(plan.steps[0].outputs["model"]) == tree(published) and empty_folders(plan.steps[0].outputs["model"]) == ["assets/"]
    digest, size = tree_digest(published), 1 + 10 + 2
    lock = read_json(lock_path(plan))
    (artifact,) = lock["artifacts"]
    assert artifact == {"target": "t", "path": PUBLISHED, "sha256": digest, "bytes": size}
    statement = read_json(built / "build/m/t" / FILE)
    assert {"name": PUBLISHED, "digest": {"sha256": digest}} in statement["subject"]
    report = read_json(built / "build/m/report.json")
    assert report["artifacts"][0]["path"] == PUBLISHED and report["artifacts"][0]["bytes"] == size
    assert read_json(built / "build/m/t/validation.json")["passed"] is True
    assert verify(plan) == []
    assert not list((built / "build").rglob(".*.kiln-*.tmp"))


def test_a_second_build_is_up_to_date(ws):
    root, plan = ws
    code, lines = build(plan)
    assert code == 0 and ran(lines) == [] and up_to_date(lines) == ["m/t/test_folder_make", "m/t/validate"]


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_file_changed_in_the_published_folder_makes_validate_publish_it_again(ws, change: str):
    root, plan = ws
    published = root / PUBLISHED
    good = tree(published)
    if change == "edit":
        (published / "Data" / "weights" / "weight.bin").write_bytes(b"tampered!!")
        file = "Data/weights/weight.bin"
    elif change == "add":
        (published / "extra.txt").write_text("")
        file = "extra.txt"
    else:
        (published / "Manifest.json").unlink()
        file = "Manifest.json"
    assert verify(plan) == [f"{PUBLISHED}: sha256 {tree_digest(published)[:12]} differs from the locked {read_json(lock_path(plan))['artifacts'][0]['sha256'][:12]}"]
    code, lines = build(plan)
    assert code == 0 and ran(lines) == ["m/t/validate"]
    word = {"edit": "changed", "add": "added", "remove": "removed"}[change]
    assert read_record(root, plan.steps[1]).reason.startswith(f"output {PUBLISHED} is not what this step wrote ({PUBLISHED}/{file} {word};")
    assert tree(published) == good and verify(plan) == []


def test_an_empty_folder_removed_from_the_published_folder_makes_validate_publish_it_again_naming_it(ws):
    root, plan = ws
    published = root / PUBLISHED
    (published / "assets").rmdir()
    assert len(verify(plan)) == 1 and verify(plan)[0].startswith(f"{PUBLISHED}: sha256 ")
    code, lines = build(plan)
    assert code == 0 and ran(lines) == ["m/t/validate"]
    assert read_record(root, plan.steps[1]).reason.startswith(f"output {PUBLISHED} is not what this step wrote ({PUBLISHED}/assets/ removed;")
    assert empty_folders(published) == ["assets/"] and verify(plan) == []


def test_a_file_edited_in_the_intermediate_folder_makes_its_step_run_again_naming_it(ws):
    root, plan = ws
    make = plan.steps[0]
    (make.outputs["model"] / "Data" / "scale.txt").write_text("3")
    code, lines = build(plan)
    assert code == 0 and ran(lines) == ["m/t/test_folder_make"] and up_to_date(lines) == ["m/t/validate"]  # same bytes again: no republish
    rel = f"build/.steps/{make.id}/model.pkg"
    assert read_record(root, make).reason == f"output {rel} is not what this step wrote ({rel}/Data/scale.txt changed; changed on disk, or built by another configuration)"
    assert (make.outputs["model"] / "Data" / "scale.txt").read_text() == "2"


@pytest.mark.parametrize(("spec", "error"), [
    (SPEC.replace("scale.txt=2", "scale.txt=3"), "m/t/validate: validation failed, artifact not published: y max_abs_diff"),
    ("Manifest.json=new\nfail", "m/t/test_folder_make: the spec says fail"),
])
def test_a_failing_rerun_leaves_the_published_folder_intact(ws, spec: str, error: str):
    root, plan = ws
    published = root / PUBLISHED
    good, lock = tree(published), read_json(lock_path(plan))
    (root / "src" / "spec.txt").write_text(spec)
    code, lines = build(plan)
    assert code != 0 and any(line.startswith(error) for line in lines), lines
    assert tree(published) == good and read_json(lock_path(plan)) == lock
    assert sorted(p.name for p in published.parent.iterdir()) == ["model.pkg", FILE, "validation.json"]  # no temp folder left
    assert not list((root / "build").rglob(".*.kiln-*.tmp"))


def test_a_fresh_workspace_restores_both_folders_from_the_cache_with_identical_bytes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "on")
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    first = workspace(tmp_path / "first")
    assert build(first)[0] == 0
    second = workspace(tmp_path / "second")
    code, lines = build(second)
    assert code == 0 and ran(lines) == ["m/t/test_folder_make", "m/t/validate"]
    for step_first, step_second in zip(first.steps, second.steps, strict=True):
        assert read_record(second.root, step_second).data["restored"] is True
        for role, path in step_first.outputs.items():
            other = step_second.outputs[role]
            assert (tree(path) == tree(other)) if path.is_dir() else (path.read_bytes() == other.read_bytes())
            assert not path.is_dir() or empty_folders(other) == ["assets/"]
    assert read_json(lock_path(second))["artifacts"] == read_json(lock_path(first))["artifacts"]
    assert verify(second) == []
    assert up_to_date(build(second)[1]) == ["m/t/test_folder_make", "m/t/validate"]


def test_doit_clean_removes_folder_outputs(ws):
    root, plan = ws
    code, _ = build(plan, "clean")
    assert not code  # doit's clean command returns None when it succeeds
    assert not (root / PUBLISHED).exists() and not plan.steps[0].outputs["model"].exists()
    assert not (root / "build/m/t/validation.json").exists()


@pytest.mark.parametrize("where", ["published", "intermediate"])
def test_the_no_op_fast_path_sees_a_file_edited_inside_a_folder_output(ws, where: str):
    """kiln.state.fresh remembers a folder output by its tree digest: editing one file inside it
    sends the manifest down the full path (which then rebuilds it, as above)."""
    from types import SimpleNamespace

    from kiln.state import fresh
    from kiln.state.report import noop_report

    root, plan = ws
    plan.resolved = SimpleNamespace(listed_folder=None, aliases=(), lookups=())  # what planning read: nothing here
    plan.manifest_sha256 = hashlib.sha256(plan.manifest.read_bytes()).hexdigest()
    fresh.remember(plan, noop_report(plan))
    assert list(fresh.unchanged(root, [plan.manifest])) == [plan.manifest]
    folder = root / PUBLISHED if where == "published" else plan.steps[0].outputs["model"]
    (folder / "Data" / "scale.txt").write_text("7")
    assert fresh.unchanged(root, [plan.manifest]) == {}
