"""build/<model>/report.json, written at the end of every `doit build` by KilnReporter: per step,
whether it ran or was up to date and why, its seconds and output sizes; per artifact, its size and
validation metrics. Also prints a short summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit.reporter import ConsoleReporter

from kiln import fresh
from kiln.lockfile import provenance_complete, write_lock, write_provenance
from kiln.records import failure_path, read_json, record_path, write_json_atomic

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.fresh)
    from kiln.plan import Plan

RAN, UP_TO_DATE, FAILED, NOT_RUN = "ran", "up to date", "failed", "not run"


def report_path(plan: Plan) -> Path:
    return plan.root / "build" / plan.model / "report.json"


def step_entry(plan: Plan, step, status: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": plan.step_name(step), "rule": step.rule, "targets": plan.targets_of(step), "status": status}
    if status == FAILED:
        failure = read_json(failure_path(plan.root, step)) or {}
        entry |= {"why": failure.get("reason"), "error": failure.get("error", "see doit's output"), "seconds": failure.get("seconds"), "facts": failure.get("facts")}
        return entry
    record = read_json(record_path(plan.root, step))
    if record is None:
        return entry | {"why": "not built yet"}
    entry["why"] = record["reason"] if status == RAN else "key unchanged and outputs intact"
    entry["seconds"] = record["seconds"] if status == RAN else 0.0
    entry["last_run_seconds"] = record["seconds"]
    entry["key"] = record["key"]
    entry["outputs"] = [{"path": o["path"], "bytes": o["bytes"]} for o in record["outputs"].values()]
    if record.get("info"):
        entry["info"] = record["info"]
    return entry


def build_report(plan: Plan, statuses: dict[str, str], seconds: float) -> dict[str, Any]:
    steps = [step_entry(plan, s, statuses.get(s.name, NOT_RUN)) for s in plan.steps]
    artifacts = []
    for step, entry in zip(plan.steps, steps):
        if step.rule == "validate":
            info = entry.get("info") or entry.get("facts") or {}
            artifact = {"target": step.targets[0], "status": entry["status"], "metrics": info.get("metrics"), "thresholds": info.get("thresholds"), "passed": info.get("passed")}
            if info.get("latency"):
                artifact["latency"] = info["latency"]  # measured when the artifact was last validated
            if info.get("not_validated"):
                artifact["validation"] = f"not validated: {info['not_validated']}"
            files = [o for o in entry.get("outputs", []) if not o["path"].endswith("validation.json")]
            if files:  # the artifact's path; bytes of all its files (OpenVINO: .xml + .bin)
                artifact |= {"path": files[0]["path"], "bytes": sum(o["bytes"] for o in files)}
            artifacts.append(artifact)
    return {
        "model": plan.model,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "ok": all(e["status"] in (RAN, UP_TO_DATE) for e in steps),
        "counts": {s: sum(e["status"] == s for e in steps) for s in (RAN, UP_TO_DATE, FAILED, NOT_RUN)},
        "steps": steps,
        "artifacts": artifacts,
        # targets left out of this build because this machine cannot build them (hardware)
        "skipped": [{"target": target, "why": why} for target, why in sorted(plan.skipped.items())],
    }


class KilnReporter(ConsoleReporter):
    """doit's console output, plus kiln's lockfile and report at the end of the run."""

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.statuses: dict[str, str] = {}
        self.started = time.monotonic()

    def initialize(self, tasks, selected_tasks):
        """Before any task runs: take the workspace's build lock (kiln.resources.lock_workspace), so
        two builds started at once run one after the other instead of racing on the same steps."""
        super().initialize(tasks, selected_tasks)
        from kiln.engine import PLANS
        from kiln.resources import lock_workspace

        self._workspace_lock = lock_workspace(PLANS[0].root) if PLANS else None

    def execute_task(self, task):
        super().execute_task(task)
        self.statuses[_step_name(task)] = RAN

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        self.statuses[_step_name(task)] = UP_TO_DATE

    def add_failure(self, task, fail):
        super().add_failure(task, fail)
        self.statuses[_step_name(task)] = FAILED

    def complete_run(self):
        try:
            self._complete_run()
        finally:
            lock = getattr(self, "_workspace_lock", None)
            if lock is not None:
                lock.close()  # releases the flock

    def _complete_run(self):
        super().complete_run()
        from kiln.engine import PLANS

        seconds = time.monotonic() - self.started
        for plan in PLANS:
            if not any(s.name in self.statuses for s in plan.steps):
                continue  # this run did not touch this manifest (e.g. doit build:<other>)
            report = build_report(plan, self.statuses, seconds)
            write_json_atomic(report_path(plan), report, durable=False)  # informative; the lockfile is the durable record
            if report["ok"] and (write_lock(plan) or report["counts"][RAN] or not provenance_complete(plan)):
                write_provenance(plan)  # only when something changed: a no-op build of a monorepo stays cheap
            if report["ok"]:  # the next plain `doit build` may leave this manifest unplanned while it is unchanged
                noop = report if report["counts"][UP_TO_DATE] == len(plan.steps) else build_report(plan, dict.fromkeys((s.name for s in plan.steps), UP_TO_DATE), 0.0)
                fresh.remember(plan, noop)
            else:
                fresh.forget(plan)
            counts = report["counts"]
            for artifact in report["artifacts"]:
                if artifact.get("validation"):
                    self.write(f"kiln: {plan.model}/{artifact['target']}: published {artifact['validation']}\n")
            self.write(f"kiln: {plan.model}: {counts[RAN]} ran, {counts[UP_TO_DATE]} up to date, {counts[FAILED]} failed"
                       f"{', ' + str(counts[NOT_RUN]) + ' not run' if counts[NOT_RUN] else ''} -> {report_path(plan).relative_to(plan.root)}\n")


def _step_name(task) -> str:
    return task.name.split(":", 1)[1] if ":" in task.name else task.name
