"""kind = "onnx": an existing ONNX file. It is its own fp32 ONNX (onnxsim still runs when the
target asks), and its reference outputs come from onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field

from kiln.runtime.onnxrt import session
from kiln.schema.fields import Strict
from kiln.sources.base import Resolver, SourceKind

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext


class OnnxSource(Strict):
    """An existing ONNX file; targets are validated against it in onnxruntime."""

    kind: Literal["onnx"]
    path: str = Field(min_length=1)


class Onnx(SourceKind):
    kind = "onnx"
    Source = OnnxSource

    def files(self, source: OnnxSource, resolver: Resolver) -> tuple[Path, ...]:
        return (resolver.file(source.path, "source.path"),)

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        return planner.resolved.source_files[0], None

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        output_names = [t["name"] for t in outputs]
        sess = session(files[0], optimize=False)
        for feed in feeds:
            yield feed, dict(zip(output_names, sess.run(output_names, feed)))
