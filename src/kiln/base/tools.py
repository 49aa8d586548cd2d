"""Versions of the tools a step's key holds (installed distributions, and kiln itself)."""

from __future__ import annotations

import functools
from importlib import metadata

import kiln
from kiln.base.toolenv import PREFIX as TOOLENV
from kiln.base.toolenv import tool_env


@functools.cache
def tool_version(name: str) -> str:
    """Installed version of a tool (a distribution name, or "kiln"), or the identity of a tool
    environment ("toolenv:<name>", kiln.base.toolenv: its pinned requirements, which are its lock);
    read once per process."""
    if name == "kiln":
        return kiln.__version__
    if name.startswith(TOOLENV):
        return tool_env(name[len(TOOLENV):]).version()
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def tool_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    return {name: tool_version(name) for name in sorted(set(names) | {"kiln"})}
