"""kiln.base.tools: the versions step keys hold, Java's included (PMML runs in a JVM)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kiln.base.tools import java_version


def _fake_java(folder: Path, stderr: str) -> None:
    java = folder / "java"
    lines = "".join(f"echo '{line}' >&2\n" for line in stderr.splitlines())  # echo: a shell builtin (PATH holds only java)
    java.write_text(f"#!/bin/sh\n{lines}")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)


def test_the_java_version_is_read_from_the_jvm_on_path(tmp_path: Path, monkeypatch):
    _fake_java(tmp_path, "Property settings:\n    java.vendor = Debian\n    java.version = 21.0.3\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_version() == "21.0.3"  # a JVM swapped for another changes the keys of PMML steps


def test_no_java_on_path_is_not_installed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert java_version() == "not installed"
    _fake_java(tmp_path, "garbage")
    assert java_version() == "unknown"
    assert os.environ["PATH"] == str(tmp_path)
