"""What kiln remembers about each step: build/.kiln/steps/<step id>.json (one per step id, whichever
manifests share it), read through StepRecord.

A record is written (atomically) only after a step's outputs are in place, so a crash leaves
either the old record or none, and the step reruns. Failures go to a separate file, so the
record of the last good build, and the artifacts it names, stay valid. What a run printed goes to
its log, build/.kiln/logs/<step id>.log (log_path).

    {"step": name, "id": id, "key": sha256 of the components,
     "components": {"rule", "version", "params", "inputs": {role: [[file name, sha256], ...]}, "tools": {name: version}, ["hardware": {...}]},
     "outputs": {role: {"path": workspace-relative, "sha256", "bytes"}},   a folder output (model.mlpackage) also has
                 "files": [[relative path, sha256, bytes], ...] (an empty folder: [path + "/", "dir", 0]); its sha256 is their tree digest (kiln.base.hashing)
     "reason": why it ran, "seconds", "info": the rule's facts, "restored": from the cache?,
     when it started and what the run cost (kiln.execute.resources.Meter): "started_at" (Unix time),
     "cpu_seconds" (the process's and its waited-for
     children's), "peak_rss_mib" (the process tree's), "used_mib" (the peak minus the tree's RSS at the
     start), "reserved_mib" (what the step reserved; null when restored from the cache), "exclusive"
     (false when other steps ran in the same process meanwhile: the numbers include theirs)}

What a step's rule last used (exclusive runs only) is kept apart, build/.kiln/observed/<step id>.json
(observed_path): {"rule", "used_mib", "peak_rss_mib"}; the next reservation is MEMORY_HEADROOM x used.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from kiln.base.fsio import read_json, write_json_atomic
from kiln.base.paths import state_dir

if TYPE_CHECKING:  # a no-op build never imports the planner (kiln.state.fresh)
    from kiln.plan.steps import Step

# A step reserves this much more than it last used; a run whose use plus this margin exceeds its
# reservation came close to it (the report warns).
MEMORY_HEADROOM = 1.1


class StepRecord:
    """A step record as read (the parsed JSON is shared with read_json's cache: never changed)."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def components(self) -> dict[str, Any]:
        return self.data["components"]

    @property
    def tools(self) -> dict[str, str]:
        return self.data["components"]["tools"]

    @property
    def hardware(self) -> dict[str, Any] | None:
        return self.data["components"].get("hardware")

    def input_digests(self, role: str) -> list[str]:
        """The sha256 of each file of an input role, in the step's order."""
        return [sha256 for _, sha256 in self.data["components"]["inputs"][role]]

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """role -> {"path" (workspace-relative), "sha256", "bytes"} (and "files" for a folder)."""
        return self.data["outputs"]

    @property
    def reason(self) -> str:
        return self.data["reason"]

    @property
    def seconds(self) -> float:
        return self.data["seconds"]

    @property
    def info(self) -> dict[str, Any]:
        return self.data.get("info") or {}

    @property
    def usage(self) -> dict[str, Any]:
        """When the run started and what it cost: {"started_at", "cpu_seconds", "peak_rss_mib", "used_mib",
        "reserved_mib", "exclusive"};
        empty for a record written before kiln measured."""
        return {k: self.data[k] for k in USAGE_KEYS if k in self.data}


USAGE_KEYS = ("started_at", "cpu_seconds", "peak_rss_mib", "used_mib", "reserved_mib", "exclusive")


def read_record(root: Path, step: Step) -> StepRecord | None:
    data = read_json(record_path(root, step))
    return StepRecord(data) if data is not None else None


def write_record(root: Path, step: Step, data: dict[str, Any]) -> None:
    write_json_atomic(record_path(root, step), data)


def tools_of(records: Iterable[StepRecord]) -> dict[str, str]:
    """Every tool version the records' keys hold, sorted by name (lockfile, provenance, fresh)."""
    tools: dict[str, str] = {}
    for record in records:
        tools |= record.tools
    return dict(sorted(tools.items()))


def record_path(root: Path, step: Step) -> Path:
    """One record per step id, whichever manifests share the step."""
    return _record_path(root, step.id)


@functools.lru_cache(maxsize=1 << 16)
def _record_path(root: Path, step_id: str) -> Path:  # asked several times per step in every build
    return state_dir(root) / "steps" / f"{step_id}.json"


def last_path(root: Path, step: Step, target: str, model: str | None = None) -> Path:
    """The components this rule last ran with for this target (of this model; default: the
    step's first), whatever the step id was then: the baseline that explains a change
    ("parameter changed: params.opset: 17 -> 18")."""
    return state_dir(root) / "last" / (model or step.model) / f"{target}.{step.rule}.json"


def failure_path(root: Path, step: Step) -> Path:
    """Why the step's last run failed: {"step", "reason", "error" (the one line), "log", "facts", "seconds"}
    and what it cost (StepRecord.usage's keys)."""
    return record_path(root, step).with_suffix(".failed.json")


def observed_path(root: Path, step: Step) -> Path:
    """What the step's rule used when it last ran alone in its process, for its next reservation."""
    return state_dir(root) / "observed" / f"{step.id}.json"


def read_observed(root: Path, step: Step) -> dict[str, Any] | None:
    data = read_json(observed_path(root, step))
    return data if data is not None and isinstance(data.get("used_mib"), (int, float)) else None


def write_observed(root: Path, step: Step, data: dict[str, Any]) -> None:
    write_json_atomic(observed_path(root, step), data, durable=False)  # a lost one only costs a default reservation


def log_path(root: Path, step: Step) -> Path:
    """What the step's last run printed, logged and warned, and the traceback of a failure
    (kiln.execute.step): one file per step id, replaced by each run."""
    return state_dir(root) / "logs" / f"{step.id}.log"
