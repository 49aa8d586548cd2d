"""kind = "onnx": an existing ONNX file. It is its own fp32 ONNX (onnxsim still runs when the
target asks), and its reference outputs come from onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field

from kiln.errors import one_line
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
        """The ONNX file, then the external data files its tensors are stored in (a model over 2 GB,
        or one saved with save_as_external_data): their bytes are the weights, so they key every
        step and are published beside an artifact that is the source file itself."""
        model = resolver.file(source.path, "source.path")
        return (model, *external_data_files(model, resolver))

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        return planner.resolved.source_files[0], None

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        output_names = [t["name"] for t in outputs]
        sess = session(files[0], optimize=False)
        for feed in feeds:
            yield feed, dict(zip(output_names, sess.run(output_names, feed)))


def external_data_files(model: Path, resolver: Resolver) -> list[Path]:
    """The files beside `model` that its external tensors name, in name order. Only plain file names
    beside the model are accepted: kiln publishes them next to the artifact under the same names."""
    import onnx  # at planning, only for an ONNX source: the graph is read, not the weights

    from kiln.runtime.onnx_graph import beside_the_model, external_locations

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as err:  # a damaged file: protobuf's DecodeError and friends
        raise resolver.error("source.path", f"{model.name!r} is not a readable ONNX model: {one_line(err)[:200]}") from None
    files = []
    for name in external_locations(proto):
        if not beside_the_model(name):
            raise resolver.error("source.path", f"{model.name!r} keeps tensors in {name!r}; kiln takes external data files only beside the model, by plain file name")
        path = model.parent / name
        if not path.is_file():
            raise resolver.error("source.path", f"{model.name!r} keeps tensors in {name!r}, which is not beside it ({path} does not exist)")
        files.append(path)
    return files
