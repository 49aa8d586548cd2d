"""Core ML packages of manifests/tinycnn.toml's convnet for the coreml tests (tests/formats/test_coreml.py,
tests/build_rules/test_export_coreml.py): a workspace whose manifest has only coreml targets, its
plan, and the export_coreml rule run on one of its steps."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, Workspace, new_workspace

TARGETS = '''
[targets.coreml_fp32]
format = "coreml"

[targets.coreml_fp16]
format = "coreml"
precision = "fp16"
via = "torch_export"
'''


def tinycnn_manifest(targets: str = TARGETS) -> str:
    """manifests/tinycnn.toml with `targets` instead of its own."""
    text = (REPO / "manifests/tinycnn.toml").read_text()
    return text[: text.index("[targets.")] + targets.strip() + "\n\n" + text[text.index("[validation]"):]


def coreml_workspace(root: Path, targets: str = TARGETS) -> Workspace:
    return new_workspace(root, {"tinycnn": tinycnn_manifest(targets)})


def planned(ws: Workspace, name: str = "tinycnn"):
    from kiln.define.resolve import resolve
    from kiln.define.spec import validate
    from kiln.plan.chains import plan
    from kiln.schema.manifest import read_manifest

    raw = read_manifest(ws.manifest(name))
    spec = validate(raw)
    return plan(spec, resolve(spec, raw, ws.root), ws.manifest(name), ws.root)


def step_for(ws: Workspace, target: str, rule: str, name: str = "tinycnn"):
    (step,) = [s for s in planned(ws, name).steps if s.rule == rule and target in s.targets]
    return step


def export(ws: Workspace, target: str, out: Path, name: str = "tinycnn") -> Path:
    """Run the target's export_coreml step (of manifests/<name>.toml) into `out` (a folder it creates); returns `out`."""
    from kiln.rules import RunContext, get_rule

    step = step_for(ws, target, "export_coreml", name)
    rule = get_rule("export_coreml")
    rule().run({role: list(files) for role, files in step.inputs.items()}, {"model": out}, rule.Params(**step.params), RunContext(ws.root, step.name))
    return out


def package_files(package: Path) -> dict[str, bytes]:
    return {p.relative_to(package).as_posix(): p.read_bytes() for p in sorted(package.rglob("*")) if p.is_file()}
