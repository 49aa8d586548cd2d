"""Running one step (ninja's Builder): restore its outputs from the cache when its key is there, else
run its rule into temp files and rename them into place; then write the record. Called by doit,
one task per step (kiln.engine.tasks)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from doit.exceptions import TaskFailed

from kiln.base.digests import digest, remember
from kiln.base.fsio import write_json_atomic
from kiln.base.paths import relative
from kiln.base.temps import sweep_stale_temps, temp_path
from kiln.errors import StepError
from kiln.execute.resources import reserve
from kiln.rules import RunContext, get_rule
from kiln.state.cache import Cache
from kiln.state.records import failure_path, last_path, write_record
from kiln.state.uptodate import components, reason, step_key

if TYPE_CHECKING:
    from kiln.plan.steps import Step

# Under doit -P thread, torch work runs one step at a time: torch.onnx.export flips process-global
# state (torch.onnx.is_in_onnx_export) that a model running in another thread would see, and torch
# already spreads one step over every core. Processes (doit's default) each have their own torch.
_torch_lock = threading.Lock()


def run_step(step: Step, root: Path):
    """doit action: restore the step's outputs from the cache when its key is there, else run the
    rule into temp files and rename them into place; then write the record."""
    started = time.monotonic()
    current = components(step, root)
    key = step_key(current)
    why = reason(step, root, current) or "forced (doit -a or an explicit request)"
    cache = Cache.for_root(root)
    entry = cache.restore(key, step.outputs) if cache is not None else None
    if entry is not None:
        info, why = entry["info"], f"{why}; restored from the cache"
        for role, path in step.outputs.items():  # restore re-hashed every byte it copied: remember that digest, do not read again
            remember(root, path, entry["outputs"][role]["sha256"])
    else:
        info = _execute(step, root, why, started)
        if isinstance(info, TaskFailed):
            return info
    outputs = {role: {"path": relative(p, root), "sha256": digest(root, p), "bytes": p.stat().st_size} for role, p in step.outputs.items()}
    if cache is not None and entry is None:
        cache.store(key, outputs, root, info)
        for role, path in step.outputs.items():  # a hard link changes the file's ctime: keep its digest fresh
            remember(root, path, outputs[role]["sha256"])
    write_record(root, step, {
        "step": step.name, "id": step.id, "key": key, "components": current, "outputs": outputs,
        "reason": why, "seconds": round(time.monotonic() - started, 3), "info": info, "restored": entry is not None,
    })
    for model, target in step.owners():
        write_json_atomic(last_path(root, step, target, model), current)
    failure_path(root, step).unlink(missing_ok=True)
    return {"key": key}


def _execute(step: Step, root: Path, why: str, started: float):
    """Run the rule into temp files and rename them into place. Returns the rule's facts, or
    doit's TaskFailed for a StepError (recorded in the failure file); no temp file survives."""
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
        missing = [role for role, path in temps.items() if not path.exists()]
        if missing:
            raise RuntimeError(f"rule {step.rule} did not write its output {missing[0]!r}")
    except BaseException as err:  # no temp output may stay behind, whatever went wrong
        for path in temps.values():
            path.unlink(missing_ok=True)
        for folder in created:  # a failed target leaves no empty build/<model>/<target>/ behind
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        if not isinstance(err, StepError):
            raise
        write_json_atomic(failure_path(root, step), {"step": step.name, "reason": why, "error": str(err), "facts": err.facts, "seconds": round(time.monotonic() - started, 3)})
        return TaskFailed(str(err))
    for role, temp in temps.items():
        os.replace(temp, step.outputs[role])
    return info


def _input_bytes(step: Step) -> int:
    return sum(p.stat().st_size for files in step.inputs.values() for p in files if p.exists())
