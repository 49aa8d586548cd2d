"""Every target format, in the order of the manifest's target union (`kiln schema` lists them so).

Adding a format: a module here with a TargetFormat subclass (kiln.formats.base says what it gives),
one line in FORMATS, its rule(s) in build_rules/, tests. docs/design.md walks through it.
"""

from __future__ import annotations

import typing

from kiln.formats.base import TargetFormat
from kiln.formats.coreml import Coreml
from kiln.formats.onnx import Onnx
from kiln.formats.openvino import Openvino
from kiln.formats.pmml import Pmml
from kiln.formats.pytorch import Pytorch
from kiln.formats.safetensors import Safetensors
from kiln.formats.savedmodel import Savedmodel
from kiln.formats.tensorrt import Tensorrt
from kiln.formats.tflite import Tflite
from kiln.formats.torch_program import TorchExport, Torchscript

FORMATS: tuple[TargetFormat, ...] = (Onnx(), Safetensors(), Torchscript(), TorchExport(), Openvino(), Tensorrt(), Pytorch(), Coreml(), Tflite(), Savedmodel(), Pmml())
_BY_NAME = {fmt.format: fmt for fmt in FORMATS}


def target_format(name: str) -> TargetFormat:
    return _BY_NAME[name]


def _check_registry() -> None:
    """A format listed twice, tagged with another name, or without validation tools is a bug: fail on import."""
    if len(_BY_NAME) != len(FORMATS):
        raise RuntimeError(f"two target formats share a name: {[f.format for f in FORMATS]}")
    for fmt in FORMATS:
        if typing.get_args(fmt.Target.model_fields["format"].annotation) != (fmt.format,):
            raise RuntimeError(f"{type(fmt).__name__}.Target is not tagged format = {fmt.format!r}")
        if not getattr(fmt, "validation_tools", None):
            raise RuntimeError(f"{type(fmt).__name__} does not say which tools validate it (validation_tools)")


_check_registry()
