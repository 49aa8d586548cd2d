"""What a source kind is: the verbs every module of kiln.sources gives, and the helpers they share.

A source kind says
- definition: its [source] table (`Source`, a pydantic model), the optional extra it needs, which
  targets it can give (`check_target`) and what else it demands of the manifest (`check_spec`);
- resolving: the files whose bytes define the model (`files`, through a Resolver that knows the
  manifest and the workspace), the paths and factory the manifest names, and whether those files
  can read the data files (`check_data`);
- planning: the step that makes its fp32 ONNX (`onnx_step`);
- running: its reference outputs on the validation data, in its own framework (`run_reference`),
  which tools key that step (`reference_tools`).
Torch-based kinds (kiln.sources.torch_kind) also load an nn.Module and its export example.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol

from kiln.base.locate import on_sys_path
from kiln.schema.fields import Strict

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# The tools of every reference_outputs step, whatever the source (a kind adds its own to these).
REFERENCE_TOOLS = ("torch", "transformers", "tokenizers", "onnxruntime", "numpy")


class Resolver(Protocol):
    """Paths as one manifest names them (kiln.define.resolve gives it to SourceKind.files)."""

    def path(self, text: str, key: str) -> Path: ...  # relative to the manifest, absolute, or pkg:
    def file(self, text: str, key: str) -> Path: ...  # path(), which must be an existing file
    def factory_file(self, factory: str) -> Path: ...  # the module file a module:function names
    def error(self, key: str, problem: str) -> Exception: ...  # a ManifestError naming the manifest and key


class SourceKind(ABC):
    kind: ClassVar[str]
    Source: ClassVar[type[Strict]]
    extra: ClassVar[tuple[tuple[str, ...], str] | None] = None  # (modules it imports, pip extra that installs them)
    framework: ClassVar[str | None] = None  # the model's own framework ("torch": an nn.Module, which gives weights and torch programs)
    tokenizes_text: ClassVar[bool] = False  # has a tokenizer, so .txt data can feed it
    simplify_onnx: ClassVar[bool] = True  # onnxsim may run on its ONNX (not on ai.onnx.ml graphs)
    reference_tools: ClassVar[tuple[str, ...]] = REFERENCE_TOOLS

    # ---- definition ---------------------------------------------------------------------------

    def check_target(self, name: str, target: Any) -> None:
        """Raise CrossError for a target this source cannot give (beyond what its framework says)."""

    def check_spec(self, spec: Any) -> None:
        """Raise CrossError for what else this source demands of the manifest."""

    # ---- resolving ----------------------------------------------------------------------------

    def path_texts(self, source: Any) -> list[str]:
        """Every file or folder path of the [source] table, as written."""
        return [text for text in (getattr(source, "path", None), getattr(source, "weights", None)) if text]

    def factory(self, source: Any) -> str | None:
        return getattr(source, "factory", None)

    @abstractmethod
    def files(self, source: Any, resolver: Resolver) -> tuple[Path, ...]:
        """Every file whose bytes define the source model, checked (exists, pickle policy)."""

    def listed_folder(self, files: tuple[Path, ...]) -> Path | None:
        """A folder whose listing gave the files (a new file there changes the model), or None."""
        return None

    def check_data(self, data: Path, files: tuple[Path, ...], resolver: Resolver, key: str) -> None:
        """Raise resolver.error(key, ...) for a data file (validation or calibration) this source's
        files cannot read: text data for a folder without a tokenizer. Any data by default."""
        return None

    def text_positions(self, files: tuple[Path, ...]) -> int | None:
        """How many tokens of text the model has positions for (None: no fixed limit, or no text)."""
        return None

    # ---- planning -----------------------------------------------------------------------------

    @abstractmethod
    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        """The fp32 ONNX this source gives (before onnxsim), and the step making it (None: a file)."""

    # ---- running ------------------------------------------------------------------------------

    @abstractmethod
    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        """Yield (feed, outputs by name) per batch, from the original model in its own framework."""


def check_pickle(path: Path, allowed: bool, resolver: Resolver, key: str) -> None:
    if path.suffix in PICKLE_SUFFIXES and not allowed:
        raise resolver.error(key, f"{path.name!r} is a pickle file, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true (or convert it to .safetensors)")


def import_root(factory: str, module_file: Path) -> Path:
    """The sys.path folder that resolving found a factory's module under (beside the manifest or the
    workspace root), so a rule imports that same file: its bytes are in the step key."""
    module = factory.split(":")[0]
    folder = module_file.parent
    for _ in range(module.count(".") + (module_file.name == "__init__.py")):
        folder = folder.parent
    return folder


def call_factory(factory: str, module_file: Path, root: Path) -> Any:
    """Import `module:function` from where resolving found it and call it."""
    module_name, function_name = factory.split(":")
    with on_sys_path(import_root(factory, module_file), root):
        module = importlib.import_module(module_name)
    return getattr(module, function_name)()
