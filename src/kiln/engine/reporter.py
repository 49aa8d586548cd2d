"""doit's console output, plus kiln's end of a run: per manifest, the report (kiln.state.report),
the lockfile and provenance (kiln.state.lockfile), and what kiln.state.fresh remembers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from kiln.execute.resources import lock_workspace
from kiln.state import fresh
from kiln.state.lockfile import provenance_complete, write_lock, write_provenance
from kiln.state.report import FAILED, RAN, UP_TO_DATE, build_report, noop_report, write_report

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.state.fresh)
    from kiln.plan.steps import Plan


class KilnReporter(ConsoleReporter):
    """doit makes its reporter from a class; kiln.engine.tasks gives it one with `plans` set to what
    this process planned (reporter_for)."""

    plans: ClassVar[list[Plan]] = []

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.statuses: dict[str, str] = {}
        self.started = time.monotonic()

    def initialize(self, tasks, selected_tasks):
        """Before any task runs: take the workspace's build lock (kiln.execute.resources.lock_workspace),
        so two builds started at once run one after the other instead of racing on the same steps."""
        super().initialize(tasks, selected_tasks)
        self._workspace_lock = lock_workspace(self.plans[0].root) if self.plans else None

    def add_success(self, task):
        """A step ran when it finished (execute_task is called when it starts: a build interrupted
        there must not report it as ran)."""
        super().add_success(task)
        self.statuses[_step_name(task)] = RAN

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        self.statuses[_step_name(task)] = UP_TO_DATE

    def add_failure(self, task, fail):
        """A step that failed prints the one line kiln.execute.step made of it ("<step>: <cause> (log:
        <path>)"): the traceback and the rule's output are in that log, not on the terminal. A step
        not run because one it needs failed says so on one line too. Anything else (a failure of
        kiln itself outside a rule) keeps doit's report with its traceback."""
        self.statuses[_step_name(task)] = FAILED
        line = getattr(fail, "kiln_line", None)
        if line is not None:
            self.write(line + "\n")
        elif isinstance(fail, UnmetDependency):
            self.write(f"{_step_name(task)}: not run: {', '.join(_step_name_of(n) for n in fail.message.split())} failed\n")
        else:
            super().add_failure(task, fail)

    def complete_run(self):
        try:
            self._complete_run()
        finally:
            lock = getattr(self, "_workspace_lock", None)
            if lock is not None:
                lock.close()  # releases the flock

    def _complete_run(self):
        super().complete_run()
        seconds = time.monotonic() - self.started
        for plan in self.plans:
            if not any(s.name in self.statuses for s in plan.steps):
                continue  # this run did not touch this manifest (e.g. doit build:<other>)
            report = build_report(plan, self.statuses, seconds)
            summary = write_report(plan.root, report)
            if report["ok"] and (write_lock(plan) or report["counts"][RAN] or not provenance_complete(plan)):
                write_provenance(plan)  # only when something changed: a no-op build of a monorepo stays cheap
            if report["ok"]:  # the next plain `doit build` may leave this manifest unplanned while it is unchanged
                fresh.remember(plan, report if report["counts"][UP_TO_DATE] == len(plan.steps) else noop_report(plan))
            else:
                fresh.forget(plan)
            for artifact in report["artifacts"]:
                if artifact.get("validation"):
                    self.write(f"kiln: {plan.model}/{artifact['target']}: published {artifact['validation']}\n")
            self.write(summary + "\n")


def reporter_for(plans: list[Plan]) -> type[KilnReporter]:
    """A reporter class that knows this process's plans (doit instantiates it)."""
    return type("KilnReporter", (KilnReporter,), {"plans": plans})


def _step_name(task) -> str:
    return _step_name_of(task.name)


def _step_name_of(task_name: str) -> str:
    return task_name.split(":", 1)[1] if ":" in task_name else task_name
