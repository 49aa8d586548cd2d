"""Where a manifest's names point on sys.path: a factory's module file and a pkg: package's folder.

Light on purpose (no pydantic, no planner): resolve() uses it to plan, and kiln.fresh uses it to
check that an unplanned manifest's names still find the same files (a new module shadowing the
factory, a changed PYTHONPATH, a second install of a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def module_file(module: str, folders: list[Path]) -> str | None:
    """The file `import module` would load with `folders` first on sys.path, or None.

    Found without importing anything: importlib.util.find_spec imports a dotted name's parent
    packages (running their code at plan time) and answers later lookups from sys.modules, so a
    process that plans two workspaces would find the first one's package for both."""
    with on_sys_path(*folders):
        found = _find_on_disk(module)
    return found.origin if found is not None and found.origin and Path(found.origin).is_file() else None


def _find_on_disk(module: str):
    """The spec of `module`, looked up part by part through sys.meta_path's finders (sys.modules
    is not consulted), or None."""
    parts = module.split(".")
    path, spec = None, None
    for i in range(len(parts)):
        spec = _find_spec(".".join(parts[: i + 1]), path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
        if path is None and i < len(parts) - 1:
            return None  # a module, not a package: it has no submodules
    return spec


def _find_spec(name: str, path):
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except (ImportError, ValueError):
            return None
        if spec is not None:
            return spec
    return None


def package_dir(package: str) -> str | None:
    """The folder of an installed package (for pkg:<package>/<subdir> paths), or None."""
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    return list(found.submodule_search_locations)[0] if found is not None and found.submodule_search_locations else None


def lookup(kind: str, name: str, folders: list[Path]) -> str | None:
    """What a recorded lookup finds now: kind "module" (module_file) or "package" (package_dir)."""
    return module_file(name, folders) if kind == "module" else package_dir(name)


class on_sys_path:
    """Put folders first on sys.path for a moment (in order), so a factory module is found there."""

    def __init__(self, *folders: Path):
        self.folders = [str(f) for f in folders]

    def __enter__(self):
        self.added = [f for f in dict.fromkeys(self.folders) if f not in sys.path]
        sys.path[:0] = self.added

    def __exit__(self, *exc):
        for folder in self.added:
            if folder in sys.path:
                sys.path.remove(folder)
