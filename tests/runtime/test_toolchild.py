"""Running kiln code in a tool environment (kiln.runtime.toolchild): the job goes in as JSON, the
child runs on the environment's Python with kiln importable, offline, its output in the step's log;
a failure, a crash and a timeout are one-line StepErrors; nothing can download."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kiln.base.toolenv import ToolEnv, ensure
from kiln.errors import StepError
from kiln.runtime.toolchild import run_in_toolenv

# installed into the test's environment only: the functions a tool child would run
PROBE = '''
import json, os, sys, time
from pathlib import Path
from kiln.runtime.child import fail, read_job


def ok():
    job = read_job()
    print("converting in the tool environment")
    Path(job["out"]).write_text(json.dumps({"python": sys.executable, "job": job, "hashseed": os.environ.get("PYTHONHASHSEED"),
                                            "hf_offline": os.environ.get("HF_HUB_OFFLINE"), "pythonpath": os.environ.get("PYTHONPATH"),
                                            "first": [p for p in sys.path if "site-packages" in p][:1]}))


def offline():
    from kiln.runtime.toolchild import no_downloads

    job = read_job()
    no_downloads()
    found = {}
    try:
        import kagglehub  # noqa: F401
        found["kagglehub"] = "imported"
    except ImportError:
        found["kagglehub"] = "ImportError"
    import socket
    try:
        socket.create_connection(("127.0.0.1", 9))
        found["socket"] = "connected"
    except OSError as err:
        found["socket"] = str(err)
    Path(job["out"]).write_text(json.dumps(found))


def tool_fails():
    read_job()
    try:
        raise ValueError("cannot lower aten.foo")
    except ValueError as err:
        fail(err)


def sleeps():
    read_job()
    print("started", flush=True)
    time.sleep(60)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An environment with no pinned packages (nothing to install) plus the probe module."""
    root = tmp_path_factory.mktemp("envs")
    requirements = root / "probe.txt"
    requirements.write_text("# nothing pinned: kiln's environment alone\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_TOOLENV_DIR", str(root / "cache"))
        env = ToolEnv("probe", requirements)
        python = ensure(env)
        site = next(env.folder().glob("lib/python*/site-packages"))
        (site / "kiln_probe.py").write_text(PROBE)
        yield env, python


def test_the_child_runs_the_job_on_the_environment_python_offline_into_the_log(env, tmp_path: Path, capsys):
    tool, python = env
    job = {"out": str(tmp_path / "result.json"), "numbers": [1, 2]}
    run_in_toolenv("convert_x", tool, "kiln_probe:ok", job, "conversion failed")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["python"] == str(python) != sys.executable
    assert result["job"] == job and result["hashseed"] == "0" and result["hf_offline"] == "1"
    assert "converting in the tool environment" in capsys.readouterr().out  # the step runner points stdout at the log


def test_a_child_can_neither_import_kagglehub_nor_open_a_connection(env, tmp_path: Path):
    run_in_toolenv("convert_x", env[0], "kiln_probe:offline", {"out": str(tmp_path / "found.json")}, "conversion failed")
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["kagglehub"] == "ImportError" and "network access is off" in found["socket"]


def test_a_tool_failure_is_one_line_with_the_tools_error(env):
    with pytest.raises(StepError) as raised:
        run_in_toolenv("convert_x", env[0], "kiln_probe:tool_fails", {}, "litert-torch conversion failed")
    assert str(raised.value) == "convert_x: litert-torch conversion failed: ValueError: cannot lower aten.foo"


def test_a_missing_function_is_one_line_naming_it(env):
    with pytest.raises(StepError, match=r"^convert_x: ImportError: cannot import name 'nothing' from 'kiln_probe'"):
        run_in_toolenv("convert_x", env[0], "kiln_probe:nothing", {}, "conversion failed")


def test_a_child_past_its_timeout_is_stopped_and_named(env, capsys):
    with pytest.raises(StepError, match=r"^convert_x: conversion failed: timed out after 3 s in tool environment 'probe'$"):
        run_in_toolenv("convert_x", env[0], "kiln_probe:sleeps", {}, "conversion failed", timeout=3)
    assert "started" in capsys.readouterr().out


def test_the_childs_environment_has_no_pythonpath_from_the_parent(env, tmp_path: Path, monkeypatch):
    """kiln's environment reaches the child through the tool environment's .pth, after its own
    packages; a PYTHONPATH would put folders before them and undo the shadowing."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    run_in_toolenv("convert_x", env[0], "kiln_probe:ok", {"out": str(tmp_path / "r.json")}, "conversion failed")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["pythonpath"] is None and Path(result["first"][0]).is_relative_to(env[0].folder())
    assert os.environ["PYTHONPATH"] == str(tmp_path / "elsewhere")  # this process's own is left alone
