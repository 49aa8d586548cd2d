"""Stage 4: steps -> doit tasks, and running a step. The only module that knows doit.

Up-to-date checks are kiln's own: a step is up to date when its key (rule, params, input digests,
tool versions) equals the key recorded by its last successful run and its outputs are still the
bytes that run wrote. Digests come from a stat-keyed cache, so a no-op build reads no large file.
Because keys hold input *digests*, a rerun that reproduces the same bytes stops the rebuild from
spreading downstream (ninja's "restat").

Before any of that, a plain `doit build` leaves out the manifests whose whole closure is as their
last complete build left it (kiln.fresh): they are not even planned. So this module imports the
planner, the spec and the rules (pydantic and all) only when some manifest needs planning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import fresh, switched_off
from kiln.errors import KilnError, ManifestError, StepError
from kiln.keys import DigestCache, step_key, tool_versions
from kiln.manifest import all_manifests, find_manifest
from kiln.records import failure_path, last_path, owners, read_json, record_path, relative, state_dir, write_json_atomic
from kiln.temps import sweep_stale_temps, temp_path

if TYPE_CHECKING:
    from kiln.plan import Plan, Step

TASK = "build"  # doit basename: tasks are build:<model>/<targets>/<rule>


# ---- loading -------------------------------------------------------------------------------------

def manifest_paths(root: Path, manifest_arg: str | None) -> list[Path]:
    """manifest=<path or bare name>[,<more>], or every manifest under manifests/ when None."""
    if manifest_arg:
        return [find_manifest(name.strip(), root) for name in manifest_arg.split(",") if name.strip()]
    paths = all_manifests(root)
    if not paths:
        raise ManifestError(root / "manifests", "", "no manifests found (expected manifests/*.toml)")
    return paths


def load_plans(root: Path, manifest_arg: str | None) -> list[Plan]:
    return plan_manifests(root, manifest_paths(root, manifest_arg), wildcard=not manifest_arg)


def plan_manifests(root: Path, paths: list[Path], wildcard: bool, taken: dict[str, Path] | None = None) -> list[Plan]:
    """Read, validate, resolve and plan each manifest; steps shared between them become one.

    A wildcard build (every manifest) leaves out the targets this machine has no hardware for (a
    TensorRT target without a usable NVIDIA GPU), as Bazel skips incompatible targets in a
    wildcard build: a CPU-only CI can build the whole repository. Naming the manifest builds them,
    and fails with what is missing. taken: model name -> manifest of the manifests left unplanned
    because they are unchanged (kiln.fresh), so a new manifest cannot reuse their build/<name>/."""
    if not paths:
        return []  # every manifest is unchanged: the planner is not even imported
    from kiln.manifest import read_manifest
    from kiln.plan import Plan, plan, share_steps
    from kiln.sources import resolve
    from kiln.spec import validate

    plans: list[Plan] = []
    manifest_of: dict[str, Path] = dict(taken or {})  # model name -> its manifest
    for path in paths:
        raw = read_manifest(path)
        spec = validate(raw)
        if spec.model.name in manifest_of and manifest_of[spec.model.name] != path:
            raise ManifestError(path, "model.name", f"{spec.model.name!r} is already used by {manifest_of[spec.model.name]}; model names must be unique (they name build/<name>/)")
        manifest_of[spec.model.name] = path
        skipped = _unbuildable_here(spec) if wildcard else {}
        if skipped:
            spec = spec.model_copy(update={"targets": {k: v for k, v in spec.targets.items() if k not in skipped}})
        resolved = resolve(spec, raw, root) if spec.targets else None
        built = plan(spec, resolved, path, root) if resolved else Plan(spec.model.name, path, root, [])
        built.skipped = skipped
        built.manifest_sha256 = raw.sha256
        plans.append(built)
    share_steps(plans)
    return plans


def _unbuildable_here(spec) -> dict[str, str]:
    """target -> why this machine cannot build it, for targets that need hardware it lacks."""
    from kiln.cuda import unavailable_reason

    reasons = {}
    for name, target in spec.targets.items():
        if target.hardware == "cuda":
            reason = unavailable_reason(target.device)
            if reason:
                reasons[name] = f"hardware = \"cuda\" needs an NVIDIA GPU with TensorRT: {reason}"
    return reasons


# ---- keys and reasons ---------------------------------------------------------------------------

@functools.cache
def _digest_cache(root: Path, pid: int) -> DigestCache:
    return DigestCache(state_dir(root) / "digests.sqlite")


def digest(root: Path, path: Path) -> str:
    return _digest_cache(root, os.getpid()).digest(path)


def components(step: Step, root: Path) -> dict[str, Any]:
    """Everything the step's key is made of. Inputs by role and file name, never absolute path."""
    from kiln.rules import get_rule

    rule = get_rule(step.rule)
    found = {
        "rule": step.rule,
        "version": rule.version,
        "params": step.params,
        "inputs": {role: [[p.name, digest(root, p)] for p in files] for role, files in step.inputs.items()},
        "tools": tool_versions(rule.tools_for(step.params)),
    }
    hardware = rule.hardware_for(step.params)
    if hardware is not None:  # only hardware-specific rules have it, so other keys stay as they were
        found["hardware"] = hardware
    return found


def why(step: Step, root: Path) -> str | None:
    """The reason this step must run, or None when it is up to date."""
    try:
        current = components(step, root)
    except FileNotFoundError as err:
        return f"input {relative(Path(err.filename), root)} is not built yet"
    return _reason(step, root, current)


def _reason(step: Step, root: Path, current: dict[str, Any]) -> str | None:
    """why(), given the step's current components (so a running step hashes its inputs once)."""
    record = read_json(record_path(root, step))
    if record is None:
        return _change_since_last(step, root, current) or "not built yet"
    changed = describe_change(record["components"], current)
    if changed:
        return changed
    for role, out in record["outputs"].items():
        try:
            found = digest(root, root / out["path"])
        except FileNotFoundError:
            return f"output {out['path']} is missing"
        if found != out["sha256"]:
            return f"output {out['path']} is not what this step wrote (changed on disk, or built by another configuration)"
    return None


def _change_since_last(step: Step, root: Path, current: dict[str, Any]) -> str | None:
    """A step never built with these params and inputs: say what differs from the last build of the
    same rule for the same target (a new opset, a new source file...)."""
    for model, target in owners(step):
        last = read_json(last_path(root, step, target, model))
        if last is not None:
            return describe_change(last, current)
    return None


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    if old.get("rule") != new["rule"] or old.get("version") != new["version"]:
        return f"rule {new['rule']} version changed: {old.get('version')} -> {new['version']}"
    param = _first_difference(old.get("params"), new["params"], "params")
    if param:
        return f"parameter changed: {param}"
    for role in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
        before, after = dict(map(tuple, old.get("inputs", {}).get(role, []))), dict(map(tuple, new["inputs"].get(role, [])))
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                return f"input {role}/{name} changed: {_short(before.get(name))} -> {_short(after.get(name))}"
    for tool in sorted(set(old.get("tools", {})) | set(new["tools"])):
        if old.get("tools", {}).get(tool) != new["tools"].get(tool):
            return f"tool {tool} changed: {old.get('tools', {}).get(tool)} -> {new['tools'].get(tool)}"
    hardware = _first_difference(old.get("hardware"), new.get("hardware"), "hardware")
    if hardware:
        return f"hardware changed: {hardware}"
    return None


def _first_difference(old: Any, new: Any, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r} -> {new!r}"


def _short(digest_value: str | None) -> str:
    return "absent" if digest_value is None else f"sha256:{digest_value[:12]}"


# ---- running a step -----------------------------------------------------------------------------

# Under doit -P thread, torch work runs one step at a time: torch.onnx.export flips process-global
# state (torch.onnx.is_in_onnx_export) that a model running in another thread would see, and torch
# already spreads one step over every core. Processes (doit's default) each have their own torch.
_torch_lock = threading.Lock()


def run_step(step: Step, root: Path):
    """doit action: restore the step's outputs from the cache when its key is there, else run the
    rule into temp files and rename them into place; then write the record."""
    from doit.exceptions import TaskFailed

    from kiln.cache import Cache

    started = time.monotonic()
    current = components(step, root)
    key = step_key(current)
    reason = _reason(step, root, current) or "forced (doit -a or an explicit request)"
    cache = Cache.for_root(root)
    entry = cache.restore(key, step.outputs) if cache is not None else None
    if entry is not None:
        info, reason = entry["info"], f"{reason}; restored from the cache"
    else:
        info = _execute(step, root, reason, started)
        if isinstance(info, TaskFailed):
            return info
    if entry is not None:  # restore re-hashed every byte it copied: remember that digest, do not read again
        for role, path in step.outputs.items():
            _digest_cache(root, os.getpid()).remember(path, entry["outputs"][role]["sha256"])
    outputs = {role: {"path": relative(p, root), "sha256": digest(root, p), "bytes": p.stat().st_size} for role, p in step.outputs.items()}
    if cache is not None and entry is None:
        cache.store(key, outputs, root, info)
        for role, path in step.outputs.items():  # a hard link changes the file's ctime: keep its digest fresh
            _digest_cache(root, os.getpid()).remember(path, outputs[role]["sha256"])
    record = {
        "step": step.name, "id": step.id, "key": key, "components": current, "outputs": outputs,
        "reason": reason, "seconds": round(time.monotonic() - started, 3), "info": info, "restored": entry is not None,
    }
    write_json_atomic(record_path(root, step), record)
    for model, target in owners(step):
        write_json_atomic(last_path(root, step, target, model), current)
    failure_path(root, step).unlink(missing_ok=True)
    return {"key": key}


def _execute(step: Step, root: Path, reason: str, started: float):
    """Run the rule into temp files and rename them into place. Returns the rule's facts, or
    doit's TaskFailed for a StepError (recorded in the failure file); no temp file survives."""
    from doit.exceptions import TaskFailed

    from kiln.resources import reserve
    from kiln.rules import RunContext, get_rule

    rule = get_rule(step.rule)
    params = rule.Params.model_validate(step.params)
    temps = {role: temp_path(path) for role, path in step.outputs.items()}
    for folder in {p.parent for p in temps.values()}:
        sweep_stale_temps(folder)  # what a killed run of this step left behind
    created = [p.parent for p in temps.values() if not p.parent.exists()]
    for folder in created:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        with reserve(root, step, rule.memory_mib(step.params, _input_bytes(step))), \
                _torch_lock if "torch" in rule.tools_for(step.params) else contextlib.nullcontext():
            info = rule().run({r: list(f) for r, f in step.inputs.items()}, temps, params, RunContext(root, step.name)) or {}
    except BaseException as err:  # no temp output may stay behind, whatever went wrong
        for path in temps.values():
            path.unlink(missing_ok=True)
        for folder in created:  # a failed target leaves no empty build/<model>/<target>/ behind
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        if not isinstance(err, StepError):
            raise
        write_json_atomic(failure_path(root, step), {"step": step.name, "reason": reason, "error": str(err), "facts": err.facts, "seconds": round(time.monotonic() - started, 3)})
        return TaskFailed(str(err))
    missing = [role for role, path in temps.items() if not path.exists()]
    if missing:
        raise RuntimeError(f"rule {step.rule} did not write its output {missing[0]!r}")
    for role, temp in temps.items():
        os.replace(temp, step.outputs[role])
    return info


def _input_bytes(step: Step) -> int:
    return sum(p.stat().st_size for files in step.inputs.values() for p in files if p.exists())


def is_up_to_date(step: Step, root: Path) -> bool:
    return why(step, root) is None


# ---- doit glue ----------------------------------------------------------------------------------

def to_task(step: Step, plan_: Plan, names: dict[str, str]) -> dict[str, Any]:
    """names: step id -> task name of the plan's steps (computed once per plan by the caller)."""
    shared = f" (and {len(step.shared_with)} targets of other manifests)" if step.shared_with else ""
    return {
        "name": step.name,
        "doc": f"{step.rule} for {', '.join(step.targets)} of {plan_.manifest.name}{shared}",
        "actions": [(run_step, [step, plan_.root])],
        "uptodate": [(is_up_to_date, [step, plan_.root])],
        "task_dep": [f"{TASK}:{names[d]}" for d in step.deps],
        "targets": [str(p) for p in step.outputs.values()],
        "clean": True,
    }


PLANS: list[Plan] = []  # what this process loaded; the reporter writes lockfiles and reports for them


# doit options that leave the meaning of `doit build` alone (which dodo file, how many workers, how
# verbose): with only these, unchanged manifests may be left out of the task list. Anything else
# (-a, a task name, another command) gets every manifest's tasks, as doit would list, clean or force them.
_PLAIN_SHORT_WITH_VALUE = ("-n", "-P", "-v", "-f", "-d")  # also glued: -n2
_PLAIN_LONG_WITH_VALUE = ("--process", "--parallel-type", "--verbosity", "--file", "--dir")  # also --process=2
_PLAIN_FLAGS = ("-c", "--continue", "-k", "--seek-file")


def plain_build(argv: list[str]) -> bool:
    """Whether argv is `doit [run] [build] [-n N] [-P thread] [-v N] [-c] [name=value...]`."""
    if not argv or "doit" not in (Path(argv[0]).name, Path(argv[0]).parent.name):
        return False  # not doit's command line (dodo.py imported by something else)
    words, args = [], iter(argv[1:])
    for arg in args:
        if arg in _PLAIN_SHORT_WITH_VALUE or arg in _PLAIN_LONG_WITH_VALUE:
            next(args, None)
        elif arg in _PLAIN_FLAGS or arg.split("=", 1)[0] in _PLAIN_LONG_WITH_VALUE or arg[:2] in _PLAIN_SHORT_WITH_VALUE:
            continue
        elif arg.startswith("-"):
            return False
        elif "=" not in arg:  # name=value is a doit variable (manifest=...)
            words.append(arg)
    return words in ([], [TASK], ["run"], ["run", TASK])


@contextlib.contextmanager
def _unchanged_manifests(root: Path, paths: list[Path], wanted: bool):
    """kiln.fresh's unchanged manifests, with the workspace lock held while they are checked and
    published (the reporter takes it again for the manifests that are planned). While another build
    of the workspace runs, nothing is taken as unchanged: that build may be rewriting what the check
    would read, so every manifest is planned and waits for it as usual."""
    from kiln.resources import lock_workspace

    folder = state_dir(root) / "fresh"
    lock = lock_workspace(root, wait=False) if wanted and folder.is_dir() else None  # no entries: never built here
    if lock is None:
        yield {}
        return
    with lock:
        sweep_stale_temps(folder)  # an entry a killed build was writing
        yield fresh.unchanged(root, paths)


def doit_globals(root: Path | None = None, manifest_arg: str | None = None, skip_unchanged: bool | None = None) -> dict[str, Any]:
    """What dodo.py exposes to doit: DOIT_CONFIG and task_build. Exits with one line on a bad manifest,
    before doit opens its database, so a bad manifest writes nothing.

    skip_unchanged: leave out the manifests kiln.fresh finds unchanged (default: when the command
    line is a plain `doit build`, see plain_build, and KILN_FRESH is not "off"); they get their
    no-op report and summary line."""
    from doit import get_var

    from kiln.report import KilnReporter

    started = time.monotonic()
    root = Path(root or os.getcwd()).resolve()
    manifest_arg = manifest_arg if manifest_arg is not None else get_var("manifest")
    if skip_unchanged is None:
        skip_unchanged = plain_build(sys.argv)
    try:
        paths = manifest_paths(root, manifest_arg)
        with _unchanged_manifests(root, paths, skip_unchanged and not switched_off("KILN_FRESH")) as unchanged:
            taken = {entry["model"]: path for path, entry in unchanged.items()}
            plans = plan_manifests(root, [p for p in paths if p not in unchanged], wildcard=not manifest_arg, taken=taken)
            for line in fresh.publish(root, unchanged, started):
                print(line)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    state_dir(root).mkdir(parents=True, exist_ok=True)
    PLANS[:] = plans
    for plan_ in plans:
        for target, reason in sorted(plan_.skipped.items()):
            print(f"kiln: skipped {plan_.model}/{target}: {reason} (name the manifest to build it anyway)", file=sys.stderr)

    def task_build():
        """Build manifests: doit build [manifest=manifests/bert.toml] (default: every manifest)."""
        yielded: set[str] = set()
        for plan_ in plans:
            names = {s.id: s.name for s in plan_.steps}
            for step in plan_.steps:
                if step.id not in yielded:  # a step shared by several manifests is one task
                    yielded.add(step.id)
                    yield to_task(step, plan_, names)

    config = {
        "dep_file": str(state_dir(root) / "doit.db"),
        "backend": "sqlite3",
        "reporter": KilnReporter,
        "default_tasks": [TASK],
        "action_string_formatting": "new",
    }
    return {"DOIT_CONFIG": config, "task_build": task_build}
