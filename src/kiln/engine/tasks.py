"""Steps -> doit tasks: what dodo.py exposes to doit (DOIT_CONFIG and task_build). The only place
that knows doit besides the reporter (kiln.engine.reporter) and the step runner's TaskFailed.

Up-to-date checks are kiln's own (kiln.state.uptodate): doit asks each task's `uptodate`, which
compares the step's key with its record. Before any of that, a plain `doit build` leaves out the
manifests whose whole closure is as their last complete build left it (kiln.state.fresh): they are
not even planned. So this module imports the planner, the spec and the rules (pydantic and all) only
when some manifest needs planning.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit import get_var
from doit.control import TaskDispatcher

from kiln.base.env import switched_off
from kiln.base.fsio import remove_artifact
from kiln.base.paths import state_dir
from kiln.base.temps import sweep_stale_temps
from kiln.engine.argv import TASK, plain_build
from kiln.engine.progress import QUIET, parse_verbosity
from kiln.engine.reporter import page_written, reporter_for
from kiln.engine.summary import html_line, html_report_path, print_table, target_rows
from kiln.state.html import write_model_html
from kiln.errors import KilnError
from kiln.execute import ray_executor
from kiln.execute.resources import default_jobs, lock_workspace
from kiln.plan.steps import critical_first, seconds_after
from kiln.schema.manifest import manifest_paths
from kiln.state import fresh
from kiln.state.records import read_record
from kiln.state.remote_config import remote_config
from kiln.state.report import publish_unchanged
from kiln.state.uptodate import is_up_to_date

if TYPE_CHECKING:
    from kiln.plan.steps import Plan, Step


def to_task(step: Step, plan: Plan, names: dict[str, str]) -> dict[str, Any]:
    """names: step id -> task name of the plan's steps (computed once per plan by the caller)."""
    from kiln.execute.step import run_step  # the rules (pydantic): only when a task exists

    shared = f" (and {len(step.shared_with)} targets of other manifests)" if step.shared_with else ""
    return {
        "name": step.name,
        "doc": f"{step.rule} for {', '.join(step.targets)} of {plan.manifest.name}{shared}",
        "actions": [(run_step, [step, plan.root], {"remote": ray_executor.run_remote})] if ray_executor.active() else [(run_step, [step, plan.root])],
        "uptodate": [(is_up_to_date, [step, plan.root])],
        "task_dep": [f"{TASK}:{names[d]}" for d in step.deps],
        "targets": [str(p) for p in step.outputs.values()],
        "clean": [(clean_outputs, [list(step.outputs.values())])],  # doit's own clean leaves a folder that is not empty
        # The step writes its own output to its log (kiln.execute.step); doit must not swap sys.stdout
        # around it, which under -P thread would undo the per-thread routing of other steps.
        "io": {"capture": False},
        "verbosity": 0,
    }


def expected_seconds(step: Step, root: Path) -> float:
    """How long a step is expected to take, for the order steps start in (kiln.plan.steps.
    critical_first): its last run's time when it ran before, else its rule's guess (Rule.cost)."""
    from kiln.rules import get_rule

    record = read_record(root, step)
    return max(record.seconds, 0.05) if record is not None else get_rule(step.rule).cost


_ORDER: dict[str, int] = {}  # task name -> rank: which ready task doit's dispatcher hands out first


def serve_in_order(names: list[str]) -> None:
    """Make doit start ready tasks in this order. Its dispatcher serves a FIFO queue, and a task
    that waited for its dependencies rejoins at the back: the ONNX export's simplify step, which
    heads the longest chain, would start after every export child and validation queued before it
    (bert: 26 s late under -n 2). Picking the best-ranked ready task instead is all it takes; which
    tasks may run, and when, is still doit's."""
    _ORDER.clear()
    _ORDER.update({name: rank for rank, name in enumerate(names)})
    if getattr(TaskDispatcher._get_next_node, "kiln_ordered", False):
        return
    fifo = TaskDispatcher._get_next_node

    def best_ready_first(self, ready, tasks_to_run):
        if len(ready) > 1 and _ORDER:
            best = min(ready, key=lambda node: _ORDER.get(node.task.name, len(_ORDER)))  # ties: the earliest queued
            ready.remove(best)
            ready.appendleft(best)
        return fifo(self, ready, tasks_to_run)

    best_ready_first.kiln_ordered = True
    TaskDispatcher._get_next_node = best_ready_first


def clean_outputs(paths: list[Path], dryrun: bool = False) -> None:
    """`doit clean`: delete a step's outputs, files or folders (model.mlpackage) alike; with
    `doit clean -n` (dryrun), only say what would go."""
    for path in sorted(paths, reverse=True):
        if os.path.lexists(path):
            print(f"removing {'folder' if path.is_dir() and not path.is_symlink() else 'file'} '{path}'")
            if not dryrun:
                remove_artifact(path)


@contextlib.contextmanager
def _unchanged_manifests(root: Path, paths: list[Path], wanted: bool):
    """kiln.state.fresh's unchanged manifests, with the workspace lock held while they are checked and
    published (the reporter takes it again for the manifests that are planned). While another build
    of the workspace runs, nothing is taken as unchanged: that build may be rewriting what the check
    would read, so every manifest is planned and waits for it as usual."""
    folder = state_dir(root) / "fresh"
    lock = lock_workspace(root, wait=False) if wanted and folder.is_dir() else None  # no entries: never built here
    if lock is None:
        yield {}
        return
    with lock:
        sweep_stale_temps(folder)  # an entry a killed build was writing
        yield fresh.unchanged(root, paths)


def _plan(root: Path, paths: list[Path], wildcard: bool, taken: dict[str, Path]) -> list[Plan]:
    if not paths:
        return []  # every manifest is unchanged: the planner is not even imported
    from kiln.plan.load import plan_manifests

    return plan_manifests(root, paths, wildcard=wildcard, taken=taken)


def doit_globals(root: Path | None = None, manifest_arg: str | None = None, skip_unchanged: bool | None = None,
                 verbosity: int | None = None) -> dict[str, Any]:
    """What dodo.py exposes to doit: DOIT_CONFIG and task_build. Exits with one line on a bad manifest,
    before doit opens its database, so a bad manifest writes nothing.

    skip_unchanged: leave out the manifests kiln.state.fresh finds unchanged (default: when the command
    line is a plain `doit build`, see kiln.engine.argv, and KILN_FRESH is not "off"); they get their
    no-op report, summary table and summary line.

    verbosity: kiln.engine.progress's QUIET, NORMAL or VERBOSE (default: doit's variable
    `verbosity=quiet|normal|verbose`, as in `doit build verbosity=quiet`; `kiln build -q/-v`)."""
    started = time.monotonic()
    root = Path(root or os.getcwd()).resolve()
    manifest_arg = manifest_arg if manifest_arg is not None else get_var("manifest")
    if skip_unchanged is None:
        skip_unchanged = plain_build(sys.argv)
    try:
        # Settings read from the environment and kiln.toml, checked once here: a bad one is one line
        # and exit 2 before anything runs, not the same failure repeated by every step.
        remote_config(root)
        jobs = default_jobs()
        # Under the Ray executor, GPU facts in step keys (and "can this TensorRT target be built") are
        # the cluster's GPU pool's, not this head's: installed before anything computes a key; read lazily
        ray_executor.use_cluster_gpu_facts(ray_executor.executor() == "ray")
        verbosity = parse_verbosity(get_var("verbosity")) if verbosity is None else verbosity
        paths = manifest_paths(root, manifest_arg)
        with _unchanged_manifests(root, paths, skip_unchanged and not switched_off("KILN_FRESH")) as unchanged:
            taken = {entry["model"]: path for path, entry in unchanged.items()}
            plans = _plan(root, [p for p in paths if p not in unchanged], wildcard=not manifest_arg, taken=taken)
            templates = fresh.templates(unchanged)
            for (model, _steps, template), line in zip(templates, publish_unchanged(root, templates, started), strict=True):
                print_table(sys.stdout, model, target_rows(json.loads(template)))
                print(line)
                if not html_report_path(root, model).exists():  # else the page of the build that made these artifacts stands
                    page_written(write_model_html, root / "build", model, None)
                print(html_line(root, model))
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    state_dir(root).mkdir(parents=True, exist_ok=True)
    for plan in plans if verbosity > QUIET else []:
        for target, reason in sorted(plan.skipped.items()):
            print(f"kiln: skipped {plan.model}/{target}: {reason} (name the manifest to build it anyway)", file=sys.stderr)

    def task_build():
        """Build manifests: doit build [manifest=bert] [verbosity=quiet|verbose]; its steps: doit list --all build"""
        # numpy first, here in the main thread: steps run side by side in threads, and two threads
        # importing numpy-based packages for the first time at once met a half-initialized numpy
        # ("cannot import name '__cpu_features__' from partially initialized module"). Only when
        # something was planned: a no-op build of unchanged manifests imports no numpy.
        if plans:
            import numpy  # noqa: F401
        first: dict[str, tuple[Plan, Step]] = {}
        for plan in plans:
            for step in plan.steps:
                first.setdefault(step.id, (plan, step))  # a step shared by several manifests is one task
        names = {step_id: step.name for step_id, (_, step) in first.items()}
        owner = {step_id: plan for step_id, (plan, _) in first.items()}
        steps = [step for _, step in first.values()]
        expected = {step.id: expected_seconds(step, owner[step.id].root) for step in steps}
        ordered = critical_first(steps, lambda s: expected[s.id])
        serve_in_order([f"{TASK}:{step.name}" for step in ordered])
        if ordered:
            from kiln.execute.step import set_step_order  # the rules (pydantic): only when a task exists

            after = seconds_after(steps, lambda s: expected[s.id])
            set_step_order([step.name for step in sorted(ordered, key=lambda s: -after[s.id])])  # torch steps: longest chain after first
        for step in ordered:
            yield to_task(step, owner[step.id], names)

    config = {
        "dep_file": str(state_dir(root) / "doit.db"),
        "backend": "sqlite3",
        "reporter": reporter_for(plans, verbosity),
        "default_tasks": [TASK],
        "action_string_formatting": "new",
        # Steps side by side by default, in threads of this process (one torch, one set of imports;
        # kiln.execute.step serializes what must not overlap); `doit build -n 1` for one at a time.
        "num_process": jobs,
        "par_type": "thread",
    }
    return {"DOIT_CONFIG": config, "task_build": task_build}
