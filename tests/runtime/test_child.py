"""kiln.runtime.child.run_in_child: a rule's work in a fresh interpreter, with the child's own error as
the step's one line: "<failure>: <error><hint>" only when the tool itself failed (the child called
fail()), the error alone when something before it did (loading the model, reading data), how the
child died when it could not say; its output is passed on to the parent's streams (the step's log)
and never taken for the error."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

from kiln.errors import StepError
from kiln.runtime.child import child_error, run_in_child

JOBS = '''
import os
import signal
import sys
import warnings

from kiln.errors import StepError
from kiln.runtime.child import fail, read_job


def load_the_model():
    raise ValueError("the tokenizer has no pad token")


def tool_fails():
    job = read_job()
    try:
        raise RuntimeError(f"cannot trace {job['name']}")
    except RuntimeError as err:
        print("noise after the error", file=sys.stderr)
        fail(err)


def before_the_tool():
    read_job()
    print("progress 100%", file=sys.stderr)
    load_the_model()


def step_error():
    read_job()
    raise StepError("data.npz", "input 'x' is missing")


def killed():
    read_job()
    print("last words", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def works():
    job = read_job()
    warnings.warn("a library warning")
    print(f"wrote {job['name']}")
'''


@pytest.fixture()
def jobs(tmp_path: Path, monkeypatch) -> str:
    """A module the child can import (through PYTHONPATH, which the child inherits)."""
    (tmp_path / "child_jobs.py").write_text(textwrap.dedent(JOBS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "child_jobs"


def run(jobs: str, function: str) -> str:
    with pytest.raises(StepError) as caught:
        run_in_child("m/t/export", f"{jobs}:{function}", {"name": "model"}, "torch.jit.trace failed", "; try mode = \"script\"")
    return str(caught.value)


def test_a_tool_failure_names_the_tool_and_its_error_not_the_last_output_line(jobs, capsys):
    assert run(jobs, "tool_fails") == 'm/t/export: torch.jit.trace failed: RuntimeError: cannot trace model; try mode = "script"'
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "noise after the error" in err  # for the step's log


def test_a_failure_before_the_tool_is_not_blamed_on_it(jobs, capsys):
    message = run(jobs, "before_the_tool")
    assert message.startswith("m/t/export: ValueError: the tokenizer has no pad token (at ")
    assert "child_jobs.py:" in message and "torch.jit.trace" not in message and "script" not in message
    assert "progress 100%" in capsys.readouterr().err


def test_a_step_error_in_the_child_keeps_its_words(jobs):
    assert run(jobs, "step_error") == "m/t/export: data.npz: input 'x' is missing"


def test_a_child_that_dies_without_a_word_says_how(jobs):
    assert run(jobs, "killed") == "m/t/export: torch.jit.trace failed: the child process was killed by SIGKILL; its last output: last words"


def test_a_working_child_passes_its_output_on(jobs, capsys):
    run_in_child("m/t/export", f"{jobs}:works", {"name": "model"}, "torch.jit.trace failed")
    out, err = capsys.readouterr()
    assert "wrote model" in out and "a library warning" in err


def test_child_error_reads_the_last_report_and_falls_back_to_the_exit_code():
    stderr = 'kiln-child-error: {"tool": true, "error": "A: first"}\nkiln-child-error: {"tool": false, "error": "B: second"}\ntrailing\n'
    assert child_error(1, stderr, "export failed") == "B: second"
    assert child_error(3, "", "export failed") == "export failed: the child process exited with code 3"
    assert child_error(-signal.SIGSEGV, "Fatal Python error: Segmentation fault\n", "x failed") == \
        "x failed: the child process was killed by SIGSEGV; its last output: Fatal Python error: Segmentation fault"
