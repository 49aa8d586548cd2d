"""Run part of a rule inside a tool environment (kiln.base.toolenv): a fresh child process of the
environment's Python, which sees the tool's pinned packages first and kiln's environment (torch,
kiln itself) after them.

The protocol is kiln.runtime.child's: the child calls `module:function`, which reads the JSON job
from stdin (read_job), reports a tool failure with fail() and writes its results to files the job
names; what it prints goes to this process's stdout/stderr, i.e. the step's log; a failure is one
StepError line (the step runner adds the log's path). The child also gets PYTHONHASHSEED=0 (bytes
that do not depend on the process) and every "offline" switch of the libraries a tool may pull in
(Hugging Face); the child's function calls no_downloads() first, which also makes kagglehub (a
litert-torch dependency with no offline switch) unimportable and refuses network connections: a
tool environment installs packages, a conversion never downloads models or data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from kiln.base.toolenv import ToolEnv, ensure
from kiln.errors import StepError
from kiln.runtime.child import child_error

OFFLINE = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0", "PYTHONNOUSERSITE": "1",
}


def run_in_toolenv(step: str, env: ToolEnv, target: str, job: dict[str, Any], failure: str, timeout: float = 1800, hint: str = "") -> None:
    """Call `module:function` (a kiln module, reading `job` with kiln.runtime.child.read_job) in the
    tool environment's Python, the environment created first if needed. Raises StepError on
    failure: "<failure>: <error><hint>" when the tool failed, the error alone when something else
    did, and "... timed out after N s" when it ran past `timeout` seconds."""
    python = ensure(env, step)
    module, function = target.split(":")
    code = f"from kiln.runtime.child import report_errors; report_errors(); from {module} import {function}; {function}()"
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | OFFLINE
    try:
        proc = subprocess.run([str(python), "-c", code], input=json.dumps(job), capture_output=True, text=True, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        _pass_on(err.stdout, err.stderr)
        raise StepError(step, f"{failure}: timed out after {timeout:g} s in tool environment {env.name!r}") from None
    _pass_on(proc.stdout, proc.stderr)
    if proc.returncode != 0:
        raise StepError(step, child_error(proc.returncode, proc.stderr, failure, hint))


def _pass_on(stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    """The child's output into this process's (the step's log)."""
    for text, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
        if text:
            stream.write(text.decode(errors="replace") if isinstance(text, bytes) else text)


def no_downloads(blocked: tuple[str, ...] = ("kagglehub",)) -> None:
    """In a tool child, first: the model hubs' clients cannot be imported (ImportError) and no
    socket can connect anywhere, so a tool that would download fails, saying so, instead of
    fetching something that changes the artifact."""
    import socket

    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # `import kagglehub` now raises ImportError

    def refuse(*args, **kwargs):
        raise OSError("kiln: network access is off while a tool converts (it tried to download something)")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
