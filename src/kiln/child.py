"""Run part of a rule in a fresh Python process, for tools whose output depends on process history.

torch.jit names the types it creates from process-wide counters (___torch_mangle_6), OpenVINO numbers
new nodes from one (Constant_8369), and torch.jit.script orders constants by a Python set of strings
(hash-randomized per process). A doit worker runs many steps in one process, so those bytes would
depend on which steps ran before; a child with PYTHONHASHSEED=0 starts from the same state every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from kiln.errors import StepError, one_line


def run_in_child(step: str, target: str, job: dict[str, Any], failure: str, hint: str = "") -> None:
    """Call `module:function` (which reads `job` with read_job) in a fresh interpreter; on a non-zero
    exit raise StepError "<failure>: <the child's last stderr line><hint>"."""
    module, function = target.split(":")
    code = f"from {module} import {function}; {function}()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                          env=os.environ | {"PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StepError(step, f"{failure}: {last[:400]}{hint}")


def read_job() -> dict[str, Any]:
    return json.loads(sys.stdin.read())


def fail(err: BaseException) -> None:
    """In the child: exit 1 with the error on one line (the parent quotes it)."""
    sys.exit(f"{type(err).__name__}: {one_line(err)}")


def source_job(params, inputs: dict, out, root) -> dict[str, Any]:
    """The job of an exporter child that loads the source model: the rule's params, the source's
    files, the workspace root and the output path."""
    return {"params": params.model_dump(), "files": [str(p) for p in inputs["source"]], "root": str(root), "out": str(out)}


def read_source_job(params_type):
    """In an exporter child: (params, model, example args, output path), the model and its example
    inputs as every exporter uses them (kiln.sources.model_and_example)."""
    from pathlib import Path

    from kiln.sources import model_and_example

    job = read_job()
    params = params_type(**job["params"])
    model, args = model_and_example(params.source, [Path(f) for f in job["files"]], params.inputs, params.outputs, Path(job["root"]))
    return params, model, args, Path(job["out"])
