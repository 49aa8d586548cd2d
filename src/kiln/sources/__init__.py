"""Every source kind, in the order of the manifest's [source] union (`kiln schema` lists them so).

Adding a kind: a module here with a SourceKind subclass (kiln.sources.base says what it gives), one
line in SOURCES, its rule(s) in build_rules/, tests.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from kiln.sources.base import SourceKind
from kiln.sources.huggingface import HuggingFace
from kiln.sources.onnx import Onnx
from kiln.sources.sklearn import Sklearn
from kiln.sources.tensorflow import Tensorflow
from kiln.sources.torch import Torch
from kiln.sources.torch_model import TorchKind
from kiln.sources.xgboost import Xgboost
from kiln.sources.lightgbm import Lightgbm

SOURCES: tuple[SourceKind, ...] = (HuggingFace(), Torch(), Onnx(), Sklearn(), Tensorflow(), Xgboost(), Lightgbm())
_BY_KIND = {source.kind: source for source in SOURCES}


def _check_registry() -> None:
    """A kind listed twice, or whose [source] table is tagged with another name, is a bug: fail on import."""
    if len(_BY_KIND) != len(SOURCES):
        raise RuntimeError(f"two source kinds share a name: {[s.kind for s in SOURCES]}")
    for source in SOURCES:
        if typing.get_args(source.Source.model_fields["kind"].annotation) != (source.kind,):
            raise RuntimeError(f"{type(source).__name__}.Source is not tagged kind = {source.kind!r}")


_check_registry()


def source_kind(kind: str) -> SourceKind:
    return _BY_KIND[kind]


def torch_kind(source: dict[str, Any]) -> TorchKind:
    """The kind of a source that is an nn.Module (the spec lets only those reach torch rules)."""
    found = _BY_KIND[source["kind"]]
    if not isinstance(found, TorchKind):
        raise TypeError(f"source kind {source['kind']!r} is not a torch.nn.Module")
    return found


def load_torch_model(source: dict[str, Any], files: list[Path], input_names: list[str], output_names: list[str], root: Path):
    """The source as an nn.Module in eval mode: the manifest's inputs in order, a tuple of its outputs."""
    return torch_kind(source).load_torch_model(source, files, input_names, output_names, root)


def model_and_example(source: dict[str, Any], files: list[Path], inputs: list[dict], outputs: list[dict], root: Path):
    """(model, example args) for an exporter (TorchKind.model_and_example)."""
    return torch_kind(source).model_and_example(source, files, inputs, outputs, root)
