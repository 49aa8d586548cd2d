"""Errors a user can act on. Each prints as one line. Any other exception inside a rule also fails
its step with one line (the traceback goes to the step's log: kiln.execute.step); elsewhere it is a
bug and keeps its traceback.

Exit codes follow doit's split between user errors and crashes: 2 for a bad manifest or bad input
(nothing was run), 1 for a step that failed (see kiln.execute.step).
"""

from __future__ import annotations

from pathlib import Path


class KilnError(Exception):
    """Base of all expected errors: str(err) is a complete one-line message."""

    exit_code = 2


class ManifestError(KilnError):
    """A manifest that cannot be built: names the file, the dotted key, the value and what is allowed."""

    def __init__(self, file: Path | str, key: str, problem: str):
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {problem}")


class UsageError(KilnError):
    """A bad command line or environment setting (not a manifest): names the option and what is wrong."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class StepError(KilnError):
    """A step that ran and failed for a reason the user can fix (bad data, failed validation gate)."""

    exit_code = 1

    def __init__(self, step: str, problem: str, facts: dict | None = None):
        # A child process's StepError comes back as "<step>: <problem>" and is raised again for the
        # same step: say the step once.
        problem = problem.removeprefix(f"{step}: ")
        self.step = step
        self.problem = problem
        self.facts = facts or {}  # what the report should still show (e.g. the failed metrics)
        super().__init__(f"{step}: {problem}")


def one_line(text: str) -> str:
    """Collapse whitespace so a message from a library stays on one line."""
    return " ".join(str(text).split())
