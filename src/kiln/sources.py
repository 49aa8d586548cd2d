"""Where a manifest's files are, and how a source model is loaded.

resolve() is the disk-touching stage between spec and plan: it finds the source files (including
`pkg:<package>/<subdir>` inside an installed package), enforces the pickle policy, and checks that
data files exist, naming the manifest key on any problem. load_torch_model() is used by rules at
run time (heavy imports inside).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ManifestError, StepError
from kiln.locate import module_file, on_sys_path, package_dir
from kiln.manifest import RawManifest
from kiln.spec import Spec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# Files of a Hugging Face folder that do not change the model: documentation and git plumbing.
IGNORED_IN_MODEL_FOLDER = (".md", ".gitattributes", ".gitignore")


@dataclass(frozen=True)
class Resolved:
    """The absolute files a manifest's source and data resolve to."""

    source_files: tuple[Path, ...]  # every file whose bytes define the source model
    data_file: Path
    calibration_file: Path | None = None  # [calibration].data, when the manifest has one
    # (the Hugging Face model folder whose listing gave source_files, its mtime_ns when planned)
    listed_folder: tuple[Path, int] | None = None
    aliases: tuple[tuple[Path, Path], ...] = ()  # (path as the manifest names it, the file it resolved to) where they differ: symlinks
    lookups: tuple[tuple[str, str, tuple[Path, ...], str], ...] = ()  # (kind, name, folders first on sys.path, what was found): kiln.locate


def resolve(spec: Spec, raw: RawManifest, root: Path) -> Resolved:
    _check_extras(spec, raw)
    calibration = _data_file(spec, raw, root, "calibration") if spec.calibration else None
    lookups = _lookups(spec, raw, root)
    files = _source_files(spec, raw, root)
    folder = files[0].parent
    listed = (folder, os.stat(folder).st_mtime_ns) if spec.source.kind == "huggingface" else None  # at planning, not at the end
    return Resolved(files, _data_file(spec, raw, root, "validation"), calibration, listed, _aliases(spec, raw), lookups)


def _path_texts(spec: Spec) -> list[str]:
    """Every file or folder path the manifest gives, as written (pkg: ones included)."""
    texts = [getattr(spec.source, "path", None), getattr(spec.source, "weights", None), spec.validation.data]
    texts.append(spec.calibration.data if spec.calibration else None)
    return [text for text in texts if text]


def _lookups(spec: Spec, raw: RawManifest, root: Path) -> tuple[tuple[str, str, tuple[Path, ...], str], ...]:
    """The sys.path lookups this manifest's names need (a factory's module, pkg: packages) and what
    they find, so kiln.fresh can tell when the same names would find other files."""
    found = []
    factory = getattr(spec.source, "factory", None)
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
    named = [_named_path(text, raw) for text in _path_texts(spec) if not text.startswith("pkg:")]
    return tuple((path, path.resolve()) for path in named if path.resolve() != path)


def _check_extras(spec: Spec, raw: RawManifest) -> None:
    """A source or target whose converter is an optional extra fails here, before any step runs."""
    from kiln.spec import FORMAT_EXTRAS, SOURCE_EXTRAS

    if spec.source.kind in SOURCE_EXTRAS:
        modules, extra = SOURCE_EXTRAS[spec.source.kind]
        _require_modules(modules, extra, f"source kind {spec.source.kind!r}", raw, "source.kind")
    for name, target in spec.targets.items():
        if target.format in FORMAT_EXTRAS:
            module, extra = FORMAT_EXTRAS[target.format]
            _require_modules((module,), extra, repr(target.format), raw, f"targets.{name}.format")


def _require_modules(modules: tuple[str, ...], extra: str, what: str, raw: RawManifest, key: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ManifestError(raw.path, key, f"{what} needs the {module!r} package, which is not installed; install it with: pip install 'kiln[{extra}]'")


def _source_files(spec: Spec, raw: RawManifest, root: Path) -> tuple[Path, ...]:
    source = spec.source
    if source.kind == "huggingface":
        return _model_folder_files(resolve_path(source.path, raw, "source.path", root, spec), source.allow_pickle, raw)
    if source.kind == "sklearn":
        if source.factory:
            return (_factory_file(source.factory, raw, root),)
        path = resolve_path(source.path, raw, "source.path", root, spec)
        _require_file(path, raw, "source.path")
        if not source.allow_pickle:
            raise ManifestError(raw.path, "source.allow_pickle", f"{path.name!r} is a pickled estimator, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true (or give source.factory = \"module:function\")")
        return (path,)
    if source.kind == "torch":
        files = [_factory_file(source.factory, raw, root)]
        if source.weights:
            weights = resolve_path(source.weights, raw, "source.weights", root, spec)
            _require_file(weights, raw, "source.weights")
            _check_pickle(weights, source.allow_pickle, raw, "source.weights")
            files.append(weights)
        return tuple(files)
    path = resolve_path(source.path, raw, "source.path", root, spec)
    _require_file(path, raw, "source.path")
    return (path,)


def _data_file(spec: Spec, raw: RawManifest, root: Path, table: str) -> Path:
    """[validation].data or [calibration].data: an existing .txt (tokenized) or .npz/.npy file."""
    text, key = getattr(spec, table).data, f"{table}.data"
    data = resolve_path(text, raw, key, root, spec)
    _require_file(data, raw, key)
    if data.suffix not in (".txt", ".npz", ".npy"):
        raise ManifestError(raw.path, key, f"{text!r} is not allowed; expected a .txt, .npz or .npy file")
    if data.suffix == ".txt" and spec.source.kind != "huggingface":
        raise ManifestError(raw.path, key, f"{text!r}: text data needs a tokenizer, which only a huggingface source has; give .npz arrays named after the inputs")
    return data


def resolve_path(text: str, raw: RawManifest, key: str, root: Path, spec: Spec) -> Path:
    """A manifest path: relative to the manifest's folder, absolute, or pkg:<package>/<subdir>."""
    if text.startswith("pkg:"):
        package, _, subdir = text[4:].partition("/")
        found = package_dir(package)
        if found is None:
            raise ManifestError(raw.path, key, f"{text!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})")
        return Path(found) / subdir
    resolved = _named_path(text, raw).resolve()  # symlinks and .. resolved: what would really be read
    if not resolved.is_relative_to(root.resolve()) and not spec.model.allow_outside_workspace:
        raise ManifestError(raw.path, key, f"{text!r} resolves to {str(resolved)!r}, outside the workspace {str(root)!r}; refused unless the manifest sets model.allow_outside_workspace = true")
    return resolved


def _named_path(text: str, raw: RawManifest) -> Path:
    """A manifest path as written, made absolute against the manifest's folder (not resolved)."""
    path = Path(text)
    return path if path.is_absolute() else raw.folder / path


def _require_file(path: Path, raw: RawManifest, key: str) -> None:
    if not path.is_file():
        raise ManifestError(raw.path, key, f"{str(path)!r} does not exist or is not a file")


def _check_pickle(path: Path, allowed: bool, raw: RawManifest, key: str) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allowed:
        raise ManifestError(raw.path, key, f"{path.name!r} is a pickle file, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true (or convert it to .safetensors)")


def _model_folder_files(folder: Path, allow_pickle: bool, raw: RawManifest) -> tuple[Path, ...]:
    if not (folder / "config.json").is_file():
        raise ManifestError(raw.path, "source.path", f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix not in IGNORED_IN_MODEL_FOLDER)
    safe = [p for p in files if p.suffix == ".safetensors"]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not safe and pickled:
        _check_pickle(pickled[0], allow_pickle, raw, "source.allow_pickle")
    if not safe and not pickled:
        raise ManifestError(raw.path, "source.path", f"{str(folder)!r} holds no weights (*.safetensors, or *.bin with allow_pickle)")
    if not allow_pickle:  # pickle files are never read then, so they do not define the model
        files = [p for p in files if p.suffix not in PICKLE_SUFFIXES]
    return tuple(files)


def _factory_file(factory: str, raw: RawManifest, root: Path) -> Path:
    module = factory.split(":")[0]
    found = module_file(module, [raw.folder, root])
    if found is None:
        raise ManifestError(raw.path, "source.factory", f"{factory!r}: module {module!r} not found (looked beside the manifest in {raw.folder}, in {root} and on sys.path)")
    return Path(found)


def import_root(factory: str, module_file: Path) -> Path:
    """The sys.path folder that resolve() found a factory's module under (beside the manifest or the
    workspace root), so a rule imports that same file: its bytes are in the step key."""
    module = factory.split(":")[0]
    folder = module_file.parent
    for _ in range(module.count(".") + (module_file.name == "__init__.py")):
        folder = folder.parent
    return folder


# ---- loading at run time (inside rules) --------------------------------------------------------

def load_torch_model(source: dict[str, Any], files: list[Path], input_names: list[str], output_names: list[str], root: Path):
    """The source as an nn.Module in eval mode whose forward takes the manifest's inputs in order and
    returns a tuple of the manifest's outputs in order."""
    import torch

    if source["kind"] == "huggingface":
        inner = _load_huggingface(source, files[0].parent)
    else:
        inner = _load_factory(source, files, root)
    inner.eval()

    class Named(torch.nn.Module):
        """Positional inputs in, a tuple of named outputs out: one calling convention for every rule."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            if source["kind"] == "huggingface":
                result = self.model(**dict(zip(input_names, args)))
            else:
                result = self.model(*args)
            return pick_outputs(result, output_names)

    return Named(inner).eval()


def model_and_example(source: dict[str, Any], files: list[Path], inputs: list[dict], outputs: list[dict], root: Path):
    """(model, example args) for an exporter: the seeded source in eval mode (see load_torch_model)
    and its example inputs (kiln.data.export_example) as tensors in the manifest's order."""
    import torch

    from kiln.data import export_example

    torch.manual_seed(0)
    names = [t["name"] for t in inputs]
    model = load_torch_model(source, files, names, [t["name"] for t in outputs], root)
    example = export_example(inputs, source, files)
    return model, tuple(torch.from_numpy(example[name]) for name in names)


def pick_outputs(result: Any, names: list[str]) -> tuple:
    if hasattr(result, "keys"):
        missing = [n for n in names if n not in result.keys()]
        if missing:
            raise StepError("source", f"output {missing[0]!r} is not produced by the model; it gives {list(result.keys())}")
        return tuple(result[n] for n in names)
    values = result if isinstance(result, (tuple, list)) else (result,)
    if len(values) != len(names):
        raise StepError("source", f"the model returns {len(values)} outputs but the manifest declares {len(names)}: {names}")
    return tuple(values)


def _load_huggingface(source: dict[str, Any], folder: Path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at build time
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # doit's output is one line per step

    return AutoModel.from_pretrained(
        folder,
        local_files_only=True,
        trust_remote_code=source.get("trust_remote_code", False),
        use_safetensors=None if source.get("allow_pickle") else True,
        attn_implementation="eager",
    )


def _load_factory(source: dict[str, Any], files: list[Path], root: Path):
    import torch

    model = call_factory(source["factory"], files[0], root)
    if not isinstance(model, torch.nn.Module):
        raise StepError("source", f"{source['factory']} returned {type(model).__name__}, not a torch.nn.Module")
    if source.get("weights"):
        weights = files[1]
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def call_factory(factory: str, module_file: Path, root: Path) -> Any:
    """Import `module:function` from where resolve() found it and call it."""
    module_name, function_name = factory.split(":")
    with on_sys_path(import_root(factory, module_file), root):
        module = importlib.import_module(module_name)
    return getattr(module, function_name)()


def load_sklearn_model(source: dict[str, Any], files: list[Path], root: Path):
    """The fitted estimator: made by its factory, or unpickled from the file the manifest allowed."""
    if source.get("factory"):
        model = call_factory(source["factory"], files[0], root)
    else:
        import joblib  # a scikit-learn dependency; reads both joblib and plain pickle files

        model = joblib.load(files[0])
    if not hasattr(model, "predict") and not hasattr(model, "transform"):
        raise StepError("source", f"{source.get('factory') or files[0].name} gave {type(model).__name__}, not a scikit-learn estimator (no predict or transform)")
    return model


def load_tokenizer(folder: Path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
