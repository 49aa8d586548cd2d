"""What a user may type to name a manifest on the command line: its path, its file name in
manifests/ (with or without .toml), or the model name its [model] table gives (`kiln check bert_trt`
for manifests/bert_tensorrt.toml): the name the build folder and the reports use."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kiln.errors import ManifestError
from kiln.schema.manifest import all_manifests, find_manifest


def manifest_for(name: str, root: Path) -> Path:
    """The manifest `name` means: a path or file name first (find_manifest), else the one manifest
    under manifests/ whose [model] name is `name`. Unknown names fail listing the model names there."""
    try:
        return find_manifest(name, root)
    except ManifestError as not_a_file:
        named = models_by_name(root)
        if name in named:
            return named[name]
        known = ", ".join(sorted(named)) or "none"
        raise ManifestError(name, "", f"{not_a_file.problem}; no manifest under manifests/ has [model] name = {name!r} (model names: {known})") from None


def models_by_name(root: Path) -> dict[str, Path]:
    """[model] name -> manifest, for the manifests under manifests/ that parse and name their model.
    A manifest that does not parse is left out here: `kiln check` reports it with its own error."""
    found: dict[str, Path] = {}
    for path in all_manifests(root) if (root / "manifests").is_dir() else []:
        try:
            model = tomllib.loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            found.setdefault(model["name"], path)
    return found
