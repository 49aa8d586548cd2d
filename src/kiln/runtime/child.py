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
from pathlib import Path
from typing import Any, NoReturn

import kiln
from kiln.base.paths import relative
from kiln.errors import StepError, one_line

# How a child tells its parent why it failed: one line on stderr, after its traceback. The parent
# takes the last such line, so whatever else the child printed (warnings, progress bars, a
# library's own messages after the error) never becomes the step's error.
_REPORT = "kiln-child-error: "


def run_in_child(step: str, target: str, job: dict[str, Any], failure: str, hint: str = "") -> None:
    """Call `module:function` (which reads `job` with read_job) in a fresh interpreter. What the child
    prints is passed on to this process's stdout/stderr (the step's log: kiln.execute.step). On
    failure raise StepError with the child's own error: "<failure>: <error><hint>" when the tool
    failed (the function called fail()), the error alone when something else did (loading the source,
    reading the data: a tokenizer problem is not a "torch.jit.trace failed"), and how the child died
    when it reported nothing (a signal, a crash in native code)."""
    module, function = target.split(":")
    code = f"from kiln.runtime.child import report_errors; report_errors(); from {module} import {function}; {function}()\n{_EXIT}"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                          env=os.environ | {"PYTHONHASHSEED": "0"})
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise StepError(step, child_error(proc.returncode, proc.stderr, failure, hint))


def child_error(returncode: int, stderr: str, failure: str, hint: str = "") -> str:
    """The one-line cause of a failed child, from its last report (see run_in_child)."""
    reports = [line[len(_REPORT):] for line in stderr.splitlines() if line.startswith(_REPORT)]
    if reports:
        report = json.loads(reports[-1])
        return f"{failure}: {report['error']}{hint}" if report["tool"] else report["error"]
    if returncode < 0:
        import signal

        died = f"was killed by {signal.Signals(-returncode).name}"
    else:
        died = f"exited with code {returncode}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"{failure}: the child process {died}" + (f"; its last output: {one_line(lines[-1])[:300]}" if lines else "")


def report_errors() -> None:
    """In the child, first: an exception the job lets out is reported as the step's error (its
    traceback printed first, for the step's log); fail() reports the tool's own failures. A hook,
    not a wrapper around the job: a wrapper's frame would enter the Python stacks that traced
    TorchScript records, changing its bytes."""
    sys.excepthook = lambda kind, err, tb: _report(err, tool=False)  # the interpreter then exits with 1


def read_job() -> dict[str, Any]:
    return json.loads(sys.stdin.read())


def fail(err: BaseException) -> NoReturn:
    """In the child, where the tool itself (the tracer, the exporter, the converter) raised: exit 1,
    and the parent's error reads "<failure>: <this error>"."""
    _report(err, tool=True)
    sys.exit(1)


def _report(err: BaseException, tool: bool) -> None:
    import traceback

    traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, StepError):
        error = one_line(err)
    else:
        where = raised_at(err, Path.cwd())
        error = f"{type(err).__name__}: {one_line(err)[:400] or 'no message'}" + (f" (at {where})" if where and not tool else "")
    print(_REPORT + json.dumps({"tool": tool, "error": error}), file=sys.stderr, flush=True)


def raised_at(err: BaseException, root: Path) -> str | None:
    """file:line of the innermost frame of err's traceback that is neither the standard library nor an
    installed package (the user's factory, a kiln rule): where to look, on one line. Workspace-relative
    when the file is in the workspace."""
    import sysconfig
    import traceback

    library = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith((*library, "<"))]
    return f"{relative(frames[-1].filename, root)}:{frames[-1].lineno}" if frames else None


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

    from importlib.util import find_spec

    # kiln's own files read as they do when kiln is installed (site-packages/kiln/...), wherever it
    # runs from: an editable install or a checkout would otherwise write its absolute path. (The
    # rules' folder by name: it is a layer above this one, and an editable install maps it apart.)
    rules = find_spec("kiln.build_rules")
    own = {(str(Path(kiln.__file__).resolve().parent) + "/", "site-packages/kiln/")}
    if rules is not None and rules.origin:
        own.add((str(Path(rules.origin).resolve().parent) + "/", "site-packages/kiln/build_rules/"))
    prefixes = sorted({(str(Path(root).resolve()) + "/", "")} | {(p.rstrip("/") + "/", "site-packages/") for p in site.getsitepackages()}
                      | {(sysconfig.get_paths()["stdlib"].rstrip("/") + "/", "python/")} | own, key=lambda pair: -len(pair[0]))

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


def in_fresh_stack(function, *args):
    """function(*args) run on a new thread, its result returned or its exception raised here. The
    frames already running when portable_code_paths renamed the code (this child's main function,
    with kiln's absolute install path) stay on the calling thread's stack; a new thread's stack holds
    only renamed code, so a tracer that records each op's Python stack (torch.jit.trace) writes the
    same bytes wherever kiln is installed."""
    import threading

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as err:  # handed to the caller, which reports it as the child's error
            outcome["error"] = err

    thread = threading.Thread(target=target, name="kiln-export")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# Line 2 of a child's `python -c`: a job that returned ends without the interpreter's teardown (~1 s
# with torch loaded; kiln.base.exiting); one that raised never gets here. Defined at the end of the
# file because traced TorchScript records the Python stack it traces under, this file's line in
# in_fresh_stack included: a line added above it changes the bytes of every TorchScript artifact.
_EXIT = "from kiln.base.exiting import exit_without_teardown; exit_without_teardown(0)"
