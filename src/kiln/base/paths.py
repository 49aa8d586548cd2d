"""Where things are in a workspace: kiln's state folder, and paths made workspace-relative."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(root: Path) -> Path:
    """build/.kiln: step records, the digest cache, fresh entries, locks."""
    return root / "build" / ".kiln"


def workspace_path(path: Path | str, root: Path | str, follow_links: bool = False) -> str | None:
    """`path` relative to the workspace root ('/'-separated), or None when it is not inside it.

    follow_links=False compares the paths as written: plan paths are absolute and normal, and the
    no-op check calls this for thousands of files. follow_links=True resolves symlinks and '..' in
    both first: what a file the user named really is (a manifest, a published output)."""
    if follow_links:
        path, root = Path(path).resolve(), Path(root).resolve()
    text, prefix = os.fspath(path), os.fspath(root).rstrip(os.sep) + os.sep
    return text[len(prefix):].replace(os.sep, "/") if text.startswith(prefix) else None


def relative(path: Path | str, root: Path) -> str:
    """For people and records: workspace-relative with links followed, else the path as given."""
    return workspace_path(path, root, follow_links=True) or str(path)
