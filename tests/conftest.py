"""Shared fixtures: throwaway workspaces (a root with dodo.py and manifests/) and a doit runner.

Builds of the real model are slow on 2 cores, so one bert build is made per session and copied
into each test that changes something; copies keep their step records (ids are workspace-relative).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]

# A developer's own team settings must not reach the tests: a remote cache would serve (or, with
# uploads on, receive) test outputs, and an executor setting would send test builds to a cluster.
# The tests that need them set them themselves.
for _name in [n for n in os.environ if n.startswith(("KILN_REMOTE_CACHE", "KILN_EXECUTOR", "KILN_RAY"))]:
    del os.environ[_name]


@dataclass
class Workspace:
    root: Path

    def manifest(self, name: str = "bert") -> Path:
        return self.root / "manifests" / f"{name}.toml"

    def edit(self, old: str, new: str, name: str = "bert") -> None:
        path = self.manifest(name)
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))

    def doit(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=self.root, capture_output=True, text=True, env=_env())
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kiln(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=self.root, capture_output=True, text=True, env=_env())

    def report(self, model: str = "bert") -> dict:
        return json.loads((self.root / "build" / model / "report.json").read_text())

    def statuses(self, model: str = "bert") -> dict[str, str]:
        return {s["step"]: s["status"] for s in self.report(model)["steps"]}

    def ran(self, model: str = "bert") -> list[str]:
        return sorted(name for name, status in self.statuses(model).items() if status == "ran")

    def files(self) -> dict[str, int]:
        """Every file under build/ (path -> size), for 'nothing written / nothing lost' checks."""
        build = self.root / "build"
        return {str(p.relative_to(build)): p.stat().st_size for p in build.rglob("*") if p.is_file()} if build.exists() else {}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def new_workspace(path: Path, manifests: dict[str, str] | None = None) -> Workspace:
    """A workspace with the repo's dodo.py, data and example models; manifests from the repo unless given."""
    (path / "manifests").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", path / "dodo.py")
    for folder in ("data", "models"):
        shutil.copytree(REPO / "manifests" / folder, path / "manifests" / folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if manifests is None:
        shutil.copy(REPO / "manifests" / "bert.toml", path / "manifests" / "bert.toml")
    else:
        for name, text in manifests.items():
            (path / "manifests" / f"{name}.toml").write_text(text)
    return Workspace(path)


def example_workspace(path: Path, *names: str) -> Workspace:
    """A workspace holding the repo's manifests/<name>.toml for each name."""
    return new_workspace(path, {name: (REPO / "manifests" / f"{name}.toml").read_text() for name in names})


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return new_workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def built_bert(tmp_path_factory) -> Workspace:
    """manifests/bert.toml built once per test session (read-only: copy it before changing it)."""
    ws = new_workspace(tmp_path_factory.mktemp("bert") / "ws")
    ws.doit("build", "manifest=manifests/bert.toml")
    return ws


@pytest.fixture
def bert_copy(built_bert: Workspace, tmp_path: Path) -> Workspace:
    """A private copy of the built bert workspace, to change and rebuild."""
    # without .kiln/ (the step cache): tests of rebuild decisions must see rules run
    shutil.copytree(built_bert.root, tmp_path / "ws", symlinks=True, ignore=lambda folder, names: [".kiln"] if Path(folder) == built_bert.root else [])
    return Workspace(tmp_path / "ws")


def run_in_threads(jobs: dict[str, Callable[[], Any]], copies: int = 2) -> list[tuple[str, Any]]:
    """Call every job `copies` times, all at once from separate threads (native kernels release the
    GIL, so they really overlap); returns (name, result) pairs in completion order."""
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def run(name: str) -> None:
        out = jobs[name]()
        with lock:
            results.append((name, out))

    threads = [threading.Thread(target=run, args=(name,)) for name in list(jobs) * copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
