"""doit's console output, plus kiln's end of a run: per manifest, the report (kiln.state.report),
the lockfile and provenance (kiln.state.lockfile), and what kiln.state.fresh remembers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from kiln.engine.progress import NORMAL, VERBOSE, PlainDisplay, display_for, terminal
from kiln.engine.summary import html_line, html_report_path, target_rows
from kiln.execute.probes import run_deferred
from kiln.execute.resources import lock_workspace
from kiln.runtime.probes import probes_dir
from kiln.state import fresh
from kiln.state.lockfile import provenance_complete, write_lock, write_provenance
from kiln.state.records import read_record
from kiln.base.fsio import read_json, write_json_atomic
from kiln.state.html import write_index_html, write_model_html
from kiln.state.report import FAILED, PREVIOUS_REPORT, RAN, UP_TO_DATE, build_report, noop_report, report_path, write_report

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.state.fresh)
    from kiln.plan.steps import Plan


class KilnReporter(ConsoleReporter):
    """doit makes its reporter from a class; kiln.engine.tasks gives it one with `plans` set to what
    this process planned (reporter_for)."""

    plans: ClassVar[list[Plan]] = []
    verbosity: ClassVar[int] = NORMAL  # kiln.engine.progress: QUIET, NORMAL, VERBOSE

    def __init__(self, outstream, options):
        super().__init__(terminal(outstream), options)  # its own descriptor: steps' native output is captured meanwhile
        self.statuses: dict[str, str] = {}
        self.started = time.monotonic()
        self.display: PlainDisplay | None = None  # made in initialize: doit builds a reporter for `doit list` too

    def initialize(self, tasks, selected_tasks):
        """Before any task runs: take the workspace's build lock (kiln.execute.resources.lock_workspace),
        so two builds started at once run one after the other instead of racing on the same steps."""
        super().initialize(tasks, selected_tasks)
        self._workspace_lock = lock_workspace(self.plans[0].root) if self.plans else None
        self.display = display_for(self.outstream, self.verbosity, self.plans[0].root if self.plans else None)

    def write(self, text):
        """Everything kiln and doit print goes through the display (between its live lines)."""
        if self.display is None:
            super().write(text)
        else:
            for line in text.rstrip("\n").split("\n"):
                self.display.write(line)

    def execute_task(self, task):
        """A step starts (doit prints `.  name` here; kiln prints a line when it finishes, with its time)."""
        if self.display is not None and task.actions:
            self.display.started(_step_name(task))

    def add_success(self, task):
        """A step ran when it finished (execute_task is called when it starts: a build interrupted
        there must not report it as ran)."""
        super().add_success(task)
        self.statuses[_step_name(task)] = RAN
        if self.display is not None and task.actions:  # not doit's group task "build"
            self.display.finished(_step_name(task), self._why(_step_name(task)))

    def skip_uptodate(self, task):
        self.statuses[_step_name(task)] = UP_TO_DATE
        if self.display is not None:
            self.display.up_to_date(_step_name(task))

    def add_failure(self, task, fail):
        """A step that failed prints the one line kiln.execute.step made of it ("<step>: <cause> (log:
        <path>)"): the traceback and the rule's output are in that log, not on the terminal. A step
        not run because one it needs failed says so on one line too. Anything else (a failure of
        kiln itself outside a rule) keeps doit's report with its traceback."""
        self.statuses[_step_name(task)] = FAILED
        line = getattr(fail, "kiln_line", None)
        if line is None and isinstance(fail, UnmetDependency):
            line = f"{_step_name(task)}: not run: {', '.join(_step_name_of(n) for n in fail.message.split())} failed"
        if line is not None and self.display is not None:
            self.display.failed(_step_name(task), line)
        elif line is not None:
            self.write(line + "\n")
        else:
            super().add_failure(task, fail)

    def complete_run(self):
        try:
            if self.display is not None:
                self.display.close()  # the live lines go before the summary is printed
            self._complete_run()
        finally:
            lock = getattr(self, "_workspace_lock", None)
            if lock is not None:
                lock.close()  # releases the flock

    def _complete_run(self):
        super().complete_run()
        self._deferred_probes()
        seconds = time.monotonic() - self.started
        touched = False
        for plan in self.plans:
            if not any(s.name in self.statuses for s in plan.steps):
                continue  # this run did not touch this manifest (e.g. doit build:<other>)
            touched = True
            report = with_formats(plan, build_report(plan, self.statuses, seconds))
            previous = read_json(report_path(plan.root, plan.model))  # the page shows what changed since
            summary = write_report(plan.root, report)
            lock_changed = report["ok"] and write_lock(plan)
            if lock_changed and previous is not None:  # the build before this one, for `kiln diff` with no arguments
                write_json_atomic(report_path(plan.root, plan.model).with_name(PREVIOUS_REPORT), previous, durable=False)
            if report["ok"] and (lock_changed or report["counts"][RAN] or not provenance_complete(plan)):
                write_provenance(plan)  # only when something changed: a no-op build of a monorepo stays cheap
            if report["counts"][RAN] or report["counts"][FAILED] or not html_report_path(plan.root, plan.model).exists():
                # after the lockfile: the page shows its digests. A build that ran nothing keeps the page
                # of the build that made these artifacts (drawing it costs ~1 s: the no-op stays fast)
                page_written(write_model_html, plan.root / "build", plan.model, previous)
            if report["ok"]:  # the next plain `doit build` may leave this manifest unplanned while it is unchanged
                fresh.remember(plan, report if report["counts"][UP_TO_DATE] == len(plan.steps) else with_formats(plan, noop_report(plan)))
            else:
                fresh.forget(plan)
            for artifact in report["artifacts"]:
                if artifact.get("validation") and self.verbosity >= NORMAL:
                    self.write(f"kiln: {plan.model}/{artifact['target']}: published {artifact['validation']}\n")
            if self.display is not None:
                self.display.table(plan.model, target_rows(report))
            self.write(summary + "\n")
            self.write(html_line(plan.root, plan.model) + "\n")
        if touched:
            page_written(write_index_html, self.plans[0].root / "build")

    def _deferred_probes(self) -> None:
        """The latency probes validate steps left for the end because other steps ran beside them
        (kiln.runtime.probes): measured now, one at a time, before the reports read them."""
        roots = {plan.root for plan in self.plans}
        for root in sorted(roots):
            if not any(probes_dir(root).glob("*.json")):
                continue
            steps = {s.name: s for plan in self.plans if plan.root == root for s in plan.steps}
            if self.verbosity >= VERBOSE:
                self.write("kiln: measuring latency of the artifacts validated while other steps ran\n")
            run_deferred(root, steps)

    def _why(self, step_name: str) -> str | None:
        """Why a step that just ran ran (its record's reason), for -v; None when not verbose."""
        if self.verbosity < VERBOSE:
            return None
        for plan in self.plans:
            for step in plan.steps:
                if step.name == step_name:
                    record = read_record(plan.root, step)
                    return record.reason if record is not None else None
        return None


def page_written(write, *args) -> bool:
    """Write an HTML page; a failure there is said in one line and does not fail a build whose
    artifacts, lockfile and report.json are written (the page is a view of them)."""
    try:
        write(*args)
        return True
    except Exception as err:  # noqa: BLE001 - any bug in the view
        import sys

        print(f"kiln: warning: the HTML report was not written: {type(err).__name__}: {' '.join(str(err).split())[:300]}", file=sys.stderr)
        return False


def with_formats(plan: Plan, report: dict) -> dict:
    """The report with each artifact's format and precision (from its publishing step's params), so
    the summary table of a no-op build, made from the report alone, can show them."""
    publishing = {s.targets[0]: s.params for s in plan.steps if s.publishes}
    for artifact in report["artifacts"]:
        params = publishing.get(artifact["target"], {})
        artifact.setdefault("format", params.get("format"))
        artifact.setdefault("precision", params.get("precision"))
    return report


def reporter_for(plans: list[Plan], verbosity: int = NORMAL) -> type[KilnReporter]:
    """A reporter class that knows this process's plans and how much to say (doit instantiates it)."""
    return type("KilnReporter", (KilnReporter,), {"plans": plans, "verbosity": verbosity})


def _step_name(task) -> str:
    return _step_name_of(task.name)


def _step_name_of(task_name: str) -> str:
    return task_name.split(":", 1)[1] if ":" in task_name else task_name
