"""convert_openvino: an fp32 ONNX model -> OpenVINO IR (model.xml + model.bin) with the openvino
package (ov.convert_model, ov.save_model); precision fp16 compresses the weights to fp16.

Runs in a child process: OpenVINO names the nodes it creates from a process-wide counter
(Constant_8369), so a conversion after other work in the same process writes different bytes; a
fresh process writes the same bytes every time. ov.save_model finds model.bin by model.xml's name,
so the child saves into a temporary folder and moves both files to kiln's output paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ConvertOpenvinoParams(Params):
    compress_to_fp16: bool = False


@register
class ConvertOpenvino(Rule):
    name = "convert_openvino"
    version = 1
    tools = ("openvino",)
    Params = ConvertOpenvinoParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertOpenvinoParams, ctx: RunContext) -> dict[str, Any]:
        import json
        import subprocess
        import sys

        job = {"onnx": str(inputs["model"][0]), "xml": str(outputs["model"]), "bin": str(outputs["weights"]), "fp16": params.compress_to_fp16}
        proc = subprocess.run([sys.executable, "-c", "from kiln.build_rules.convert_openvino import convert_main; convert_main()"],
                              input=json.dumps(job), capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise StepError(ctx.step, f"OpenVINO conversion failed: {last[:400]}")
        return {"compress_to_fp16": params.compress_to_fp16, "weights_bytes": outputs["weights"].stat().st_size}


def convert_main() -> None:
    """The child: convert, save into a temporary folder, move model.xml / model.bin into place."""
    import json
    import os
    import sys
    import tempfile

    import openvino as ov

    job = json.loads(sys.stdin.read())
    try:
        model = ov.convert_model(job["onnx"])
    except Exception as err:  # openvino raises OpConversionFailure, RuntimeError...
        sys.exit(f"{type(err).__name__}: {one_line(err)}")
    with tempfile.TemporaryDirectory(dir=Path(job["xml"]).parent) as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=job["fp16"])
        os.replace(Path(tmp) / "model.xml", job["xml"])
        os.replace(Path(tmp) / "model.bin", job["bin"])
