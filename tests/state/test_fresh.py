"""kiln.fresh: a plain `doit build` does not plan a manifest whose whole closure is as its last
complete build left it, and plans (and rebuilds, with the reason) every manifest where anything
its up-to-date check reads has changed."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import Workspace, _env
from workspaces import mlp, mlp_workspace, two_manifests
from kiln.state import fresh


def build(ws: Workspace, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -X importtime -m doit build ...`: stderr says which modules the build imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "doit", *args], cwd=ws.root, capture_output=True, text=True, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def planned(proc: subprocess.CompletedProcess) -> bool:
    """Whether the build planned any manifest (the planner validates with kiln.define.spec, pydantic)."""
    return "kiln.define.spec" in proc.stderr


def executed(proc: subprocess.CompletedProcess) -> list[str]:
    return [line[3:].split("  ")[0] for line in proc.stdout.splitlines() if line.startswith(".  ")]  # ".  build:<step>  <seconds> s"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    """Two manifests built once (read-only: copy it before changing it)."""
    ws = mlp_workspace(tmp_path_factory.mktemp("fresh") / "ws")
    ws.doit("build")
    return ws


@pytest.fixture
def ws(built: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(built.root, tmp_path / "ws", symlinks=True, ignore=lambda folder, names: [".kiln"] if Path(folder) == built.root else [])
    return Workspace(tmp_path / "ws")


def test_an_unchanged_workspace_is_not_planned(ws: Workspace):
    before = ws.report("a")
    time.sleep(1.1)  # generated_at has whole seconds
    proc = build(ws, "build")
    assert not planned(proc) and executed(proc) == []
    assert "kiln: a: 0 ran, 3 up to date, 0 failed -> build/a/report.json" in proc.stdout
    assert "kiln: b: 0 ran, 3 up to date, 0 failed -> build/b/report.json" in proc.stdout
    report = ws.report("a")  # what the full check writes for a no-op build
    assert report["generated_at"] > before["generated_at"] and report["ok"]
    assert {s["status"] for s in report["steps"]} == {"up to date"} and report["counts"]["up to date"] == 3
    assert [s["key"] for s in report["steps"]] == [s["key"] for s in before["steps"]]
    assert report["artifacts"] == [dict(a, status="up to date") for a in before["artifacts"]]
    assert ws.kiln("verify").returncode == 0


def test_kiln_build_leaves_unchanged_manifests_unplanned_too(ws: Workspace):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kiln.cli", "build", "-n", "2"], cwd=ws.root, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and not planned(proc) and "kiln: a: 0 ran, 3 up to date, 0 failed" in proc.stdout
    off = subprocess.run([sys.executable, "-X", "importtime", "-m", "kiln.cli", "build"], cwd=ws.root, capture_output=True, text=True, env=_env() | {"KILN_FRESH": "off"})
    assert off.returncode == 0 and planned(off)


def test_a_manifest_edited_while_it_builds_is_remembered_as_it_was_planned(ws: Workspace):
    """The entry holds the bytes the build planned from, not what is on disk when it ends."""
    from kiln.plan.load import load_plans
    from kiln.state.report import UP_TO_DATE, build_report

    (plan,) = load_plans(ws.root, "a")
    ws.edit("batch_size = 16", "batch_size = 8", name="a")  # lands while the build runs
    fresh.remember(plan, build_report(plan, dict.fromkeys((s.name for s in plan.steps), UP_TO_DATE), 0.0))
    assert fresh.unchanged(ws.root, [ws.manifest("a"), ws.manifest("b")]) == {ws.manifest("b"): _entry(ws, "b")[1]}
    assert "reference_outputs" in " ".join(executed(build(ws, "build")))


def test_a_module_that_would_shadow_the_factory_is_planned(tmp_path: Path):

    ws = two_manifests(tmp_path / "ws")  # torch sources: factory "tinynet:build", found at the workspace root
    ws.doit("build")
    assert not planned(build(ws, "build"))
    shutil.copy(ws.root / "tinynet.py", ws.root / "manifests/tinynet.py")  # beside the manifests: found first now
    proc = build(ws, "build")
    assert planned(proc) and executed(proc)  # the module file is another path: new step ids


def test_touched_files_are_rechecked_refreshed_and_stay_unplanned(ws: Workspace):
    """Every file touched (new mtime and ctime, same bytes): still a no-op without planning, and the
    digest cache now holds the new stat, so the next build does not read those bytes again."""
    files = [p for p in (ws.root / "manifests").rglob("*") if p.is_file()] + [p for p in (ws.root / "build").rglob("*") if p.is_file() and ".kiln" not in p.parts[-3:-1]]
    now = time.time_ns()
    for path in files:
        os.utime(path, ns=(now, now))
    proc = build(ws, "build")
    assert not planned(proc) and executed(proc) == []
    source = ws.root / "manifests/models/a.onnx"
    with sqlite3.connect(ws.root / "build/.kiln/digests.sqlite") as db:
        (mtime_ns,) = db.execute("SELECT mtime_ns FROM file_digests WHERE path = ?", (str(source),)).fetchone()
    assert mtime_ns == source.stat().st_mtime_ns == now


def test_a_changed_source_is_planned_and_rebuilt_with_its_reason(ws: Workspace):
    mlp(ws.root / "manifests/models/a.onnx", seed=99)
    proc = build(ws, "build")
    assert planned(proc)
    assert sorted(executed(proc)) == ["build:a/fp32/reference_outputs", "build:a/fp32/simplify_onnx", "build:a/fp32/validate"]
    why = {s["step"]: s["why"] for s in ws.report("a")["steps"]}
    assert why["a/fp32/simplify_onnx"].startswith("input model/a.onnx changed: sha256:")
    assert {s["status"] for s in ws.report("b")["steps"]} == {"up to date"}  # b was not planned, only reported
    assert not planned(build(ws, "build"))  # and a is remembered again


def test_a_missing_or_changed_artifact_is_rebuilt(ws: Workspace):
    artifact = ws.root / "build/b/fp32/model.onnx"
    good = artifact.read_bytes()
    artifact.unlink()
    proc = build(ws, "build")
    assert executed(proc) == ["build:b/fp32/validate"] and artifact.read_bytes() == good
    artifact.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert executed(build(ws, "build")) == ["build:b/fp32/validate"] and artifact.read_bytes() == good


def test_only_the_edited_manifest_is_planned(ws: Workspace):
    ws.edit("batch_size = 16", "batch_size = 8", name="a")
    proc = build(ws, "build")
    assert sorted(executed(proc)) == ["build:a/fp32/reference_outputs", "build:a/fp32/validate"]
    assert "kiln: b: 0 ran, 3 up to date, 0 failed" in proc.stdout and "kiln: a: 2 ran, 1 up to date, 0 failed" in proc.stdout


def test_a_repointed_symlink_is_planned(ws: Workspace):
    data = ws.root / "manifests/data"
    (data / "x.npz").rename(data / "x1.npz")
    (data / "x.npz").symlink_to("x1.npz")
    np.savez(data / "x2.npz", x=np.random.default_rng(8).standard_normal((32, 8)).astype(np.float32))
    first = build(ws, "build")
    assert planned(first) and len(executed(first)) == 4  # new data bytes: both references and validations
    assert not planned(build(ws, "build"))
    (data / "x.npz").unlink()
    (data / "x.npz").symlink_to("x2.npz")
    proc = build(ws, "build")
    assert planned(proc) and len(executed(proc)) == 4


def test_a_new_manifest_cannot_take_the_model_name_of_an_unchanged_one(ws: Workspace):
    shutil.copy(ws.manifest("a"), ws.manifest("c"))
    before = ws.files()
    proc = build(ws, "build", check=False)
    before.pop(".kiln/digests.sqlite")
    assert proc.returncode == 2
    assert f"kiln: error: {ws.manifest('c')}: model.name: 'a' is already used by {ws.manifest('a')}" in proc.stderr
    after = ws.files()
    after.pop(".kiln/digests.sqlite")  # a cache: it learnt the copied files' stats
    assert after == before


def test_forced_builds_and_other_doit_commands_see_every_task(ws: Workspace):
    proc = build(ws, "-a", "build")  # doit's --always-execute: every task runs
    assert planned(proc) and len(executed(proc)) == 6
    listed = build(ws, "list", "--all")
    assert "build:a/fp32/validate" in listed.stdout and "build:b/fp32/validate" in listed.stdout
    off = subprocess.run([sys.executable, "-X", "importtime", "-m", "doit", "build"], cwd=ws.root, capture_output=True, text=True, env=_env() | {"KILN_FRESH": "off"})
    assert off.returncode == 0 and planned(off) and executed(off) == []


def test_a_failed_build_forgets_the_manifest(ws: Workspace):
    entry = fresh.entry_path(ws.root, ws.manifest("a"))
    assert entry.is_file()
    ws.edit("[validation]", '[targets.fp16]\nformat = "onnx"\nprecision = "fp16"\nthresholds = { max_abs_diff = 1e-12 }\n\n[validation]', name="a")
    proc = build(ws, "build", check=False)
    assert proc.returncode == 1 and not entry.exists()
    assert fresh.entry_path(ws.root, ws.manifest("b")).is_file()


def _entry(ws: Workspace, name: str) -> tuple[Path, dict]:
    path = fresh.entry_path(ws.root, ws.manifest(name))
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("change", ["tool", "code", "folder", "format"])
def test_an_entry_holds_only_under_the_same_tools_code_and_folders(ws: Workspace, change: str, monkeypatch):
    manifests = [ws.manifest("a"), ws.manifest("b")]
    assert set(fresh.unchanged(ws.root, manifests)) == set(manifests)
    path, entry = _entry(ws, "a")
    if change == "tool":
        entry["tools"]["onnxruntime"] = "0.0.1"
    elif change == "format":
        entry["format"] = fresh.FORMAT + 1
    elif change == "folder":  # a Hugging Face source's folder: a file added or removed changes its mtime
        entry["folders"] = {"manifests/models": 1}
    path.write_text(json.dumps(entry))
    if change == "code":
        monkeypatch.setattr(fresh, "code_fingerprint", lambda: "kiln was edited")
        assert fresh.unchanged(ws.root, manifests) == {}
    else:
        assert set(fresh.unchanged(ws.root, manifests)) == {ws.manifest("b")}


def test_the_entry_names_every_file_the_full_check_reads(ws: Workspace):
    _, entry = _entry(ws, "a")
    names = [name for name, _ in entry["files"]]
    assert names[0] == "manifests/a.toml"  # checked first: an edited manifest is found before any artifact is hashed
    assert {"manifests/models/a.onnx", "manifests/data/x.npz", "build/a/kiln.lock.json", "build/a/fp32/model.onnx",
            "build/a/fp32/provenance.intoto.json", "build/a/fp32/validation.json"} <= set(names)
    assert sum(n.startswith("build/.kiln/steps/") for n in names) == 3
    assert entry["tools"]["kiln"] and entry["model"] == "a" and entry["steps"] == 3
