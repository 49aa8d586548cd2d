"""Tool environments (kiln.base.toolenv): created from pinned requirements on first use, atomically,
reused afterwards, seeing kiln's environment after their own packages, never touching it; their
identity keys the steps that use them; a failed install is one line naming the requirement and log.

The fast tests use a one-package environment (typing_extensions 4.12.2, the very pin that keeps
litert-torch out of kiln's environment, where 4.16 is installed); the real litert-torch
environment is installed once by a slow test."""

from __future__ import annotations

import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from kiln.base import toolenv
from kiln.base.toolenv import ToolEnv, ensure, lock, tool_env
from kiln.base.tools import tool_version
from kiln.errors import StepError

SHADOWED = "typing_extensions==4.12.2"


def parent_freeze() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout


def in_env(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def requirements(folder: Path, text: str, name: str = "tiny") -> ToolEnv:
    path = folder / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return ToolEnv(name, path, ("typing_extensions",))


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    """One tiny environment, created by two builds at once, with kiln's `pip freeze` around it."""
    root = tmp_path_factory.mktemp("envs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_TOOLENV_DIR", str(root))
        env = requirements(root.parent / f"{root.name}-req", f"# a comment\n{SHADOWED}\n")
        before = parent_freeze()
        creations = []
        real_create = toolenv._create
        patch.setattr(toolenv, "_create", lambda *a: (creations.append(a), real_create(*a)))
        pythons: list[Path] = []
        threads = [threading.Thread(target=lambda: pythons.append(ensure(env))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        yield {"env": env, "root": root, "pythons": pythons, "creations": creations, "before": before, "after": parent_freeze()}


def test_two_creators_at_once_make_one_environment_in_the_cache_folder(created):
    env, root = created["env"], created["root"]
    assert len(created["creations"]) == 1 and len(created["pythons"]) == 2 and len(set(created["pythons"])) == 1
    assert created["pythons"][0] == env.python() and env.folder().parent == root
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted([env.folder().name, env.log().name])
    assert not list(root.glob(".tmp-*"))  # built in a temp folder and renamed into place


def test_the_environment_shadows_kiln_packages_and_sees_the_rest(created):
    python = created["pythons"][0]
    site = in_env(python, "import typing_extensions; print(typing_extensions.__file__)")
    assert Path(site).is_relative_to(created["env"].folder())
    assert in_env(python, "from importlib.metadata import version; print(version('typing_extensions'))") == "4.12.2"
    assert metadata.version("typing_extensions") != "4.12.2"  # kiln's own is another
    # torch and kiln are kiln's own, from kiln's environment: not reinstalled
    seen = in_env(python, "import importlib.util as u, kiln; from importlib.metadata import version; print(version('torch'), u.find_spec('torch').origin, kiln.__file__)").split()
    import kiln
    import torch

    assert seen == [metadata.version("torch"), torch.__file__, kiln.__file__]


def test_creating_it_leaves_kiln_environment_untouched(created):
    assert created["before"] == created["after"]


def test_the_lock_is_exactly_the_pins(created):
    assert lock(created["env"]) == "typing-extensions==4.12.2\n"


def test_an_existing_environment_is_reused_without_running_anything(created, monkeypatch):
    monkeypatch.setenv("KILN_TOOLENV_DIR", str(created["root"]))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert ensure(created["env"]) == created["pythons"][0]


def test_the_identity_follows_the_requirements_and_needs_no_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_TOOLENV_DIR", str(tmp_path / "envs"))
    one = requirements(tmp_path / "a", f"{SHADOWED}\n")
    same = requirements(tmp_path / "b", f"# the same pin, another comment\n{SHADOWED}  # why\n")
    other = requirements(tmp_path / "c", "typing_extensions==4.12.1\n")
    assert one.version() == same.version() != other.version()
    assert one.folder() == same.folder() != other.folder()
    assert f"py{sys.version_info[0]}.{sys.version_info[1]}" in one.version()
    # what a rule's key holds for "toolenv:<name>": read from the shipped file, nothing created
    shipped = tool_env("litert_torch")
    assert tool_version("toolenv:litert_torch") == shipped.version()
    assert "litert-torch" in shipped.pins() and not (tmp_path / "envs").exists()


def test_a_requirement_pip_cannot_install_is_one_line_naming_it_and_the_log(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_TOOLENV_DIR", str(tmp_path / "envs"))
    env = requirements(tmp_path / "req", "typing_extensions==0.0.1\n", name="broken")
    with pytest.raises(StepError) as raised:
        ensure(env, "convert_x")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("convert_x: tool environment 'broken': pip could not install typing_extensions==0.0.1")
    assert str(env.log()) in message and "typing_extensions==0.0.1" in env.log().read_text()
    assert [p.name for p in (tmp_path / "envs").iterdir() if not p.name.startswith(".")] == [env.log().name]  # no environment, no temp


def test_a_requirement_that_is_not_an_exact_pin_is_refused_naming_the_line(tmp_path: Path):
    env = requirements(tmp_path, f"{SHADOWED}\nlitert-torch>=0.10\n")
    with pytest.raises(StepError, match=r"tiny.txt:2: 'litert-torch>=0.10' is not an exact pin"):
        env.pins()


def test_unknown_environment_names_the_known_ones():
    with pytest.raises(KeyError, match="litert_torch"):
        tool_env("nope")


@pytest.mark.slow
def test_the_real_litert_torch_environment_installs_beside_kiln(tmp_path: Path, monkeypatch):
    """The shipped environment from the registry (pip's cache): litert-torch imports, with kiln's
    torch; its lock is the shipped pins; kiln's environment is as it was."""
    monkeypatch.setenv("KILN_TOOLENV_DIR", str(tmp_path))
    env = tool_env("litert_torch")
    before = parent_freeze()
    python = ensure(env)
    assert parent_freeze() == before
    assert lock(env) == "".join(f"{n}=={v}\n" for n, v in sorted(env.pins().items()))
    seen = in_env(python, "import litert_torch, torch; from importlib.metadata import version; print(torch.__version__, version('typing_extensions'))")
    assert seen.split()[-2:] == [metadata.version("torch"), "4.12.2"]
