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


def portable_code_paths(root, model) -> None:
    """In an exporter child, before tracing: rename the file every loaded function says it comes
    from (co_filename) to a name that does not depend on where the workspace or the virtualenv is:
    workspace-relative, or site-packages/... and python/... for installed and standard-library
    code. Traced TorchScript keeps each op's Python stack (file names) in its debug records and
    torch.export keeps stack traces in node metadata, so without this the same model exported from
    two checkouts gives two different files. Not for torch.jit.script, which reads the source back
    through these file names."""
    import site
    import sys
    import sysconfig
    import types
    from pathlib import Path

    prefixes = sorted({(str(Path(root).resolve()) + "/", "")} | {(p.rstrip("/") + "/", "site-packages/") for p in site.getsitepackages()}
                      | {(sysconfig.get_paths()["stdlib"].rstrip("/") + "/", "python/")}, key=lambda pair: -len(pair[0]))

    def portable(name: str) -> str:
        for prefix, replacement in prefixes:
            if name.startswith(prefix):
                return replacement + name[len(prefix):]
        return name

    def rename(code: types.CodeType) -> types.CodeType:
        consts = tuple(rename(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        return code.replace(co_filename=portable(code.co_filename), co_consts=consts)

    def fix(function) -> None:
        if isinstance(function, types.FunctionType) and function.__code__.co_filename != portable(function.__code__.co_filename):
            function.__code__ = rename(function.__code__)

    seen: set[int] = set()

    def fix_class(cls: type) -> None:
        if id(cls) in seen:
            return
        seen.add(id(cls))
        for value in vars(cls).values():
            fix(getattr(value, "__func__", value))
            if isinstance(value, property):
                for accessor in (value.fget, value.fset, value.fdel):
                    fix(accessor)

    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            fix_class(value) if isinstance(value, type) else fix(value)
    for layer in model.modules():  # classes defined inside a factory function are in no module's namespace
        for cls in type(layer).__mro__:
            fix_class(cls)
