"""Headless Chromium for tests of kiln's HTML pages: Debian's chromium, installed with apt when
missing (the test is skipped, with apt's reason, where that cannot be done)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def chromium() -> str:
    """The chromium executable; apt-get installs it once when it is missing."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if proc.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(command)} exited {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


@dataclass
class Rendered:
    dom: str  # the document after loading, as Chromium serializes it
    console: list[str]  # what the page wrote to the console (errors included: Chromium logs them all as CONSOLE)
    screenshot: Path


def render(page: Path, screenshot: Path, width: int = 1200, height: int = 2400) -> Rendered:
    """Load a local page in headless Chromium once: its DOM, its console lines and a screenshot."""
    proc = subprocess.run(
        [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
         f"--window-size={width},{height}", f"--screenshot={screenshot}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return Rendered(proc.stdout, console, screenshot)
