"""Stage 1 of the data flow: read a manifest's TOML text into a raw dict, remembering its file."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ManifestError


@dataclass(frozen=True)
class RawManifest:
    path: Path  # absolute path of the TOML file
    data: dict[str, Any]
    sha256: str | None = None  # of the bytes parsed (the lockfile and kiln.fresh name these, not a later read)

    @property
    def folder(self) -> Path:
        return self.path.parent


def find_manifest(name: str, root: Path) -> Path:
    """Resolve what the user typed: a path, or a bare name looked up in <root>/manifests/."""
    typed = Path(name)
    candidates = [typed if typed.is_absolute() else Path.cwd() / typed, root / typed]
    if len(typed.parts) == 1:
        candidates.append(root / "manifests" / typed)
        if typed.suffix != ".toml":
            candidates.append(root / "manifests" / f"{name}.toml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ManifestError(name, "", f"manifest not found (looked for {tried})")


def all_manifests(root: Path) -> list[Path]:
    """Every manifest under <root>/manifests/ (not data/ subfolders' non-TOML files), sorted."""
    folder = root / "manifests"
    return sorted(p.resolve() for p in folder.rglob("*.toml") if p.is_file())


def read_manifest(path: Path) -> RawManifest:
    path = Path(path).resolve()
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as err:
        raise ManifestError(path, "", f"cannot read file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ManifestError(path, "", f"not UTF-8 text (byte {err.start}); a manifest is TOML") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ManifestError(path, "", f"TOML syntax error: {err}") from None
    return RawManifest(path=path, data=parsed, sha256=hashlib.sha256(data).hexdigest())


def manifest_paths(root: Path, manifest_arg: str | None) -> list[Path]:
    """manifest=<path or bare name>[,<more>], or every manifest under manifests/ when None."""
    if manifest_arg:
        return [find_manifest(name.strip(), root) for name in manifest_arg.split(",") if name.strip()]
    paths = all_manifests(root)
    if not paths:
        raise ManifestError(root / "manifests", "", "no manifests found (expected manifests/*.toml)")
    return paths
