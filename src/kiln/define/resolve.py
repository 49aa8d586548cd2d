"""Where a manifest's names lead on disk: the disk-touching stage between spec and plan.

resolve() finds the source's files (through its kind, kiln.sources; `pkg:<package>/<subdir>` inside
an installed package included), checks that data files exist and that the source can read them
(text needs a tokenizer), that optional extras are installed, and records what kiln.fresh must
re-check later (a listed folder, symlinks, sys.path lookups). Every problem is a ManifestError
naming the manifest key.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.base.cuda import probe_source
from kiln.base.locate import module_file, package_dir
from kiln.define.spec import Spec
from kiln.errors import ManifestError
from kiln.formats import target_format
from kiln.schema.manifest import RawManifest
from kiln.sources import SOURCES, source_kind


@dataclass(frozen=True)
class Resolved:
    """The absolute files a manifest's source and data resolve to."""

    source_files: tuple[Path, ...]  # every file whose bytes define the source model
    data_file: Path
    calibration_file: Path | None = None  # [calibration].data, when the manifest has one
    # (the Hugging Face model folder whose listing gave source_files, its mtime_ns when planned)
    listed_folder: tuple[Path, int] | None = None
    aliases: tuple[tuple[Path, Path], ...] = ()  # (path as the manifest names it, the file it resolved to) where they differ: symlinks
    lookups: tuple[tuple[str, str, tuple[Path, ...], str], ...] = ()  # (kind, name, folders first on sys.path, what was found): kiln.base.locate
    text_positions: int | None = None  # how many tokens the source model has positions for (text data is cut to fit)
    source_bytes: int = 0  # the source files' total size: decides options.external_data = "auto" at plan time


class ManifestResolver:
    """Paths as one manifest names them (kiln.sources.base.Resolver): relative to the manifest's
    folder, absolute, or pkg:<package>/<subdir>; confined to the workspace unless the manifest
    allows otherwise."""

    def __init__(self, spec: Spec, raw: RawManifest, root: Path):
        self.spec, self.raw, self.root = spec, raw, root

    def error(self, key: str, problem: str) -> ManifestError:
        return ManifestError(self.raw.path, key, problem)

    def path(self, text: str, key: str) -> Path:
        if text.startswith("pkg:"):
            package, _, subdir = text[4:].partition("/")
            found = package_dir(package)
            if found is None:
                raise self.error(key, f"{text!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
            return Path(found) / subdir
        resolved = named_path(text, self.raw).resolve()  # symlinks and .. resolved: what would really be read
        if not resolved.is_relative_to(self.root.resolve()) and not self.spec.model.allow_outside_workspace:
            raise self.error(key, f"{text!r} resolves to {str(resolved)!r}, outside the workspace {str(self.root)!r}; refused unless the manifest sets model.allow_outside_workspace = true")
        return resolved

    def file(self, text: str, key: str) -> Path:
        path = self.path(text, key)
        if not path.is_file():
            raise self.error(key, f"{str(path)!r} does not exist or is not a file")
        return path

    def factory_file(self, factory: str) -> Path:
        module = factory.split(":")[0]
        found = module_file(module, [self.raw.folder, self.root])
        if found is None:
            raise self.error("source.factory", f"{factory!r}: module {module!r} not found (looked beside the manifest in {self.raw.folder}, in {self.root} and on sys.path)")
        return Path(found)


def resolve(spec: Spec, raw: RawManifest, root: Path) -> Resolved:
    resolver = ManifestResolver(spec, raw, root)
    _check_extras(spec, raw)
    calibration = _data_file(spec, resolver, "calibration") if spec.calibration else None
    lookups = _lookups(spec, raw, root)
    kind = source_kind(spec.source.kind)
    files = kind.files(spec.source, resolver)
    data = _data_file(spec, resolver, "validation")
    positions = kind.text_positions(files)
    for table, path in (("validation", data), ("calibration", calibration)):
        if path is not None:
            kind.check_data(path, files, resolver, f"{table}.data")  # e.g. text data needs a real tokenizer in the folder
            _check_max_length(getattr(spec, table), table, path, positions, resolver)
    folder = kind.listed_folder(files)
    listed = (folder, os.stat(folder).st_mtime_ns) if folder is not None else None  # at planning, not at the end
    source_bytes = sum(os.stat(path).st_size for path in files)
    return Resolved(files, data, calibration, listed, _aliases(spec, raw), lookups, text_positions=positions, source_bytes=source_bytes)


def _check_max_length(table, name: str, data: Path, positions: int | None, resolver: ManifestResolver) -> None:
    """A max_length the manifest sets above the model's positions would crash the model on a long
    text; the default is cut to fit instead (kiln.plan.chains.Planner.max_length)."""
    if data.suffix == ".txt" and positions is not None and "max_length" in table.model_fields_set and table.max_length > positions:
        raise resolver.error(f"{name}.max_length", f"{table.max_length} tokens is more than the source model has positions for ({positions}, from its config.json); set {name}.max_length = {positions} or less")


def _path_texts(spec: Spec) -> list[str]:
    """Every file or folder path the manifest gives, as written (pkg: ones included)."""
    texts = [*source_kind(spec.source.kind).path_texts(spec.source), spec.validation.data]
    texts.append(spec.calibration.data if spec.calibration else None)
    return [text for text in texts if text]


def _lookups(spec: Spec, raw: RawManifest, root: Path) -> tuple[tuple[str, str, tuple[Path, ...], str], ...]:
    """The sys.path lookups this manifest's names need (a factory's module, pkg: packages) and what
    they find, so kiln.fresh can tell when the same names would find other files."""
    found = []
    factory = source_kind(spec.source.kind).factory(spec.source)
    if factory:
        module, folders = factory.split(":")[0], (raw.folder, root)
        found.append(("module", module, folders, module_file(module, list(folders))))
    for text in _path_texts(spec):
        if text.startswith("pkg:"):
            package = text[4:].partition("/")[0]
            found.append(("package", package, (), package_dir(package)))
    return tuple(item for item in found if item[3] is not None)  # a failed lookup fails resolve() below


def _aliases(spec: Spec, raw: RawManifest) -> tuple[tuple[Path, Path], ...]:
    """Manifest paths that are (or pass through) symlinks, with what they resolve to: re-pointing
    one changes what the build reads without changing any file the plan names (kiln.fresh)."""
    named = [named_path(text, raw) for text in _path_texts(spec) if not text.startswith("pkg:")]
    return tuple((path, path.resolve()) for path in named if path.resolve() != path)


def _check_extras(spec: Spec, raw: RawManifest) -> None:
    """A source or target whose converter is an optional extra fails here, before any step runs."""
    kind = source_kind(spec.source.kind)
    if kind.extra is not None:
        modules, extra = kind.extra
        _require_modules(modules, extra, f"source kind {kind.kind!r}", raw, "source.kind")
    for name, target in spec.targets.items():
        fmt = target_format(target.format)
        if fmt.extra is not None:
            module, extra = fmt.extra
            if module == "tensorrt" and probe_source() is not None:
                continue  # TensorRT steps run on other machines (the Ray executor's GPU nodes), whose workers check their own tensorrt
            _require_modules((module,), extra, repr(target.format), raw, f"targets.{name}.format", getattr(fmt, "install", None))


def _require_modules(modules: tuple[str, ...], extra: str, what: str, raw: RawManifest, key: str, install: str | None = None) -> None:
    """install: the format's own advice where one extra does not fit all (TensorRT: one per CUDA major)."""
    install = install or f"pip install 'kiln[{extra}]'"
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ManifestError(raw.path, key, f"{what} needs the {module!r} package, which is not installed; install it with: {install}")


def _data_file(spec: Spec, resolver: ManifestResolver, table: str) -> Path:
    """[validation].data or [calibration].data: an existing .txt (tokenized), .npz/.npy or .csv file."""
    text, key = getattr(spec, table).data, f"{table}.data"
    data = resolver.file(text, key)
    if data.suffix not in (".txt", ".npz", ".npy", ".csv"):
        raise resolver.error(key, f"{text!r} is not allowed; expected a .txt, .npz, .npy or .csv file")
    if data.suffix == ".txt" and not source_kind(spec.source.kind).tokenizes_text:
        tokenizing = " or ".join(kind.kind for kind in SOURCES if kind.tokenizes_text)
        raise resolver.error(key, f"{text!r}: text data needs a tokenizer, which only a {tokenizing} source has; give .npz arrays named after the inputs")
    return data


def named_path(text: str, raw: RawManifest) -> Path:
    """A manifest path as written, made absolute against the manifest's folder (not resolved)."""
    path = Path(text)
    return path if path.is_absolute() else raw.folder / path
