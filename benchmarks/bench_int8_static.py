"""An int8-static build end to end: `doit build` of a one-target manifest vs a plain quantize_static script.

    python benchmarks/bench_int8_static.py [--model build/bert/onnx_fp32/model.onnx]

kiln: a fresh workspace whose manifest is manifests/bert.toml cut down to onnx_int8_static; the
timed `doit build` runs everything: the reference outputs, export, onnxsim, calibration on the 256
lines of manifests/data/calibration.txt, QDQ quantization and validation on 240 sentences.
The script: what teams write today, onnxruntime.quantization.quantize_static on the already exported
fp32 model with a CalibrationDataReader over the same 256 lines (padded to 128 tokens: its histogram
calibrators need equal shapes), QDQ, per-channel weights, once with the default MinMax calibrator
and once with Percentile (the method the kiln target uses). The script does not export, simplify
or validate; kiln does all three. Each side runs in its own process; wall time includes the start.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
sys.path.insert(0, {bench!r})
from bench_calibration import feeds

class Reader(CalibrationDataReader):
    def __init__(self):
        self.it = iter(feeds(256, 8))
    def get_next(self):
        return next(self.it, None)

quantize_static({model!r}, {out!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                calibrate_method=CalibrationMethod.{method}, extra_options={{"CalibPercentile": 99.999}})
"""


def one_target_manifest() -> str:
    """manifests/bert.toml with every [targets.*] table but onnx_int8_static removed."""
    text = (REPO / "manifests/bert.toml").read_text()
    tables = re.split(r"(?m)^(?=\[)", text)
    kept = [t for t in tables if not t.startswith("[targets.") or t.startswith("[targets.onnx_int8_static]")]
    return "".join(kept)


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "build/bert/onnx_fp32/model.onnx", help="the fp32 ONNX the script quantizes")
    args = parser.parse_args()
    if not args.model.exists():
        subprocess.run([sys.executable, "-m", "doit", "build", "manifest=manifests/bert.toml"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "manifests").mkdir()
        shutil.copy(REPO / "dodo.py", work)
        shutil.copytree(REPO / "manifests/data", work / "manifests/data")
        (work / "manifests/bert.toml").write_text(one_target_manifest())
        kiln = timed([sys.executable, "-m", "doit", "build"], work)
        steps = {s["step"].rsplit("/", 1)[-1]: s["seconds"] for s in json.loads((work / "build/bert/report.json").read_text())["steps"]}
        shutil.rmtree(work / "build")
        parallel = timed([sys.executable, "-m", "doit", "-n", "2", "-P", "thread", "build"], work)  # = kiln build -n 2
        results = {}
        for method in ("MinMax", "Percentile"):
            code = SCRIPT.format(bench=str(REPO / "benchmarks"), model=str(args.model), out=str(work / f"{method}.onnx"), method=method)
            results[method] = timed([sys.executable, "-c", code], work)
    print(f"kiln doit build (export, simplify, reference, calibrate, quantize, validate): {kiln:.1f} s; steps: "
          + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    print(f"kiln doit -n 2 build (the reference run beside the export chain): {parallel:.1f} s")
    quantizing = steps.get("calibrate", 0.0) + steps.get("quantize_static", 0.0)
    for method, seconds in results.items():
        print(f"plain quantize_static script, {method}: {seconds:.1f} s; script / kiln end to end = {seconds / kiln:.2f} "
              f"(-n 2: {seconds / parallel:.2f}; > 1: kiln faster); script / kiln's calibrate + quantize_static ({quantizing:.1f} s) = {seconds / quantizing:.2f}")


if __name__ == "__main__":
    main()
