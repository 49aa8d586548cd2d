"""convert_openvino: an fp32 ONNX model -> OpenVINO IR (model.xml + model.bin) with the openvino
package (ov.convert_model, ov.save_model); precision fp16 compresses the weights to fp16.

Runs in a fresh child (kiln.runtime.child): OpenVINO names the nodes it creates from a process-wide counter
(Constant_8369), so a conversion after other work in the same process would write different bytes. ov.save_model finds model.bin by model.xml's name,
so the child saves into a temporary folder and moves both files to kiln's output paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.child import fail, read_job, run_in_child


class ConvertOpenvinoParams(Params):
    compress_to_fp16: bool = False


@register
class ConvertOpenvino(Rule):
    name = "convert_openvino"
    version = 1
    tools = ("openvino",)
    Params = ConvertOpenvinoParams
    cost = 1.5

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertOpenvinoParams, ctx: RunContext) -> dict[str, Any]:
        job = {"onnx": str(inputs["model"][0]), "xml": str(outputs["model"]), "bin": str(outputs["weights"]), "fp16": params.compress_to_fp16}
        run_in_child(ctx.step, "kiln.build_rules.convert_openvino:child_main", job, "OpenVINO conversion failed")
        return {"compress_to_fp16": params.compress_to_fp16, "weights_bytes": outputs["weights"].stat().st_size}


def child_main() -> None:
    """Convert, save into a temporary folder, move model.xml / model.bin into place."""
    import os
    import tempfile

    import openvino as ov

    job = read_job()
    try:
        model = ov.convert_model(job["onnx"])
    except Exception as err:  # openvino raises OpConversionFailure, RuntimeError...
        fail(err)
    with tempfile.TemporaryDirectory(dir=Path(job["xml"]).parent) as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=job["fp16"])
        os.replace(Path(tmp) / "model.xml", job["xml"])
        os.replace(Path(tmp) / "model.bin", job["bin"])
