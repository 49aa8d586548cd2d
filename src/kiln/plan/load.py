"""Manifests -> plans: find them, read, validate, resolve and plan each; steps shared between
manifests become one. Imported only when some manifest needs planning (pydantic and the registries
come with it): a no-op build of unchanged manifests never imports this module."""

from __future__ import annotations

from pathlib import Path

from kiln.define.resolve import resolve
from kiln.define.spec import Spec, validate
from kiln.errors import ManifestError
from kiln.formats import target_format
from kiln.plan.chains import plan
from kiln.plan.steps import Plan, share_steps
from kiln.schema.manifest import manifest_paths, read_manifest


def load_plans(root: Path, manifest_arg: str | None) -> list[Plan]:
    return plan_manifests(root, manifest_paths(root, manifest_arg), wildcard=not manifest_arg)


def plan_manifests(root: Path, paths: list[Path], wildcard: bool, taken: dict[str, Path] | None = None) -> list[Plan]:
    """Read, validate, resolve and plan each manifest; steps shared between them become one.

    A wildcard build (every manifest) leaves out the targets this machine has no hardware for (a
    TensorRT target without a usable NVIDIA GPU), as Bazel skips incompatible targets in a
    wildcard build: a CPU-only CI can build the whole repository. Naming the manifest builds them,
    and fails with what is missing. taken: model name -> manifest of the manifests left unplanned
    because they are unchanged (kiln.state.fresh), so a new manifest cannot reuse their build/<name>/."""
    plans: list[Plan] = []
    manifest_of: dict[str, Path] = dict(taken or {})  # model name -> its manifest
    for path in paths:
        raw = read_manifest(path)
        spec = validate(raw)
        if spec.model.name in manifest_of and manifest_of[spec.model.name] != path:
            raise ManifestError(path, "model.name", f"{spec.model.name!r} is already used by {manifest_of[spec.model.name]}; model names must be unique (they name build/<name>/)")
        manifest_of[spec.model.name] = path
        skipped = unbuildable_here(spec) if wildcard else {}
        if skipped:
            spec = spec.model_copy(update={"targets": {k: v for k, v in spec.targets.items() if k not in skipped}})
        resolved = resolve(spec, raw, root) if spec.targets else None
        built = plan(spec, resolved, path, root) if resolved else Plan(spec.model.name, path, root, [])
        built.skipped = skipped
        built.manifest_sha256 = raw.sha256
        plans.append(built)
    share_steps(plans)
    return plans


def unbuildable_here(spec: Spec) -> dict[str, str]:
    """target -> why this machine cannot build it, for targets that need hardware it lacks."""
    reasons = {}
    for name, target in spec.targets.items():
        reason = target_format(target.format).unavailable_reason(target)
        if reason:
            reasons[name] = reason
    return reasons
