"""Versions of the tools a step's key holds (installed distributions, kiln itself, the Java
runtime that PMML's converter and evaluator run in, and Python itself where the bytes depend on it)."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

import kiln
from kiln.base.cuda import tensorrt_version
from kiln.base.toolenv import PREFIX as TOOLENV
from kiln.base.toolenv import tool_env


JAVA = "java"  # not a Python distribution: the JVM on PATH
# tensorrt.__version__, read by kiln.base.cuda's probe: the `tensorrt` distribution is a metapackage that
# is absent when tensorrt-cu12/-cu13 is installed directly (how a CUDA major is pinned)
TENSORRT = "tensorrt"
# the interpreter's own version: traced TorchScript records the frames it traced under, the standard
# library's threading.py among them, whose line numbers move between CPython patch releases
PYTHON = "python"


@functools.cache
def tool_version(name: str) -> str:
    """Installed version of a tool (a distribution name, or "kiln"), or the identity of a tool
    environment ("toolenv:<name>", kiln.base.toolenv: its pinned requirements, which are its lock);
    read once per process."""
    if name == "kiln":
        return kiln.__version__
    if name.startswith(TOOLENV):
        return tool_env(name[len(TOOLENV):]).version()
    if name == JAVA:
        return java_version()
    if name == TENSORRT:
        return tensorrt_version()
    if name == PYTHON:
        return platform.python_version()
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def tool_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {name: tool_version(name) for name in sorted(set(names) | {"kiln"})}


def java_version() -> str:
    """java.version of the JVM on PATH (sklearn2pmml and JPMML run in it), or "not installed"."""
    import shutil
    import subprocess

    if shutil.which("java") is None:
        return "not installed"
    try:
        done = subprocess.run(["java", "-XshowSettings:properties", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in done.stderr.splitlines():
        key, _, value = line.strip().partition(" = ")
        if key == "java.version":
            return value.strip()
    return "unknown"
