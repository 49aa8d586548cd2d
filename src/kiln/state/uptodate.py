"""Is a step up to date, and if not, why? (ninja's DependencyScan, Bazel's ActionCacheChecker.)

A step's key is sha256 over its components: rule name and version, canonical params, the digests of
its inputs (by role and file name, never by absolute path, so a moved venv or clone keeps its keys),
the versions of the tools the rule uses, and the machine facts of hardware-specific rules. Same key,
same bytes.

The decision compares keys: a step is up to date when its current key equals the key its record
holds and every output still has the digest the record holds. Only then is the change explained
(describe_change), and a component it does not know is still named ("key component X changed"), so
a new kind of change can never leave a step looking up to date. kiln.state.fresh answers the same
question for a whole manifest at once, from the digests of the files these keys are made of.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.base.digests import digest, listing
from kiln.base.fsio import read_json
from kiln.base.hashing import UnsafeFolderEntry, canonical_json, sha256_text
from kiln.base.paths import relative
from kiln.base.tools import tool_versions
from kiln.state.records import last_path, read_record

if TYPE_CHECKING:
    from kiln.plan.steps import Step

# The components describe_change explains by name; any other that differs is named generically.
KNOWN_COMPONENTS = ("rule", "version", "params", "inputs", "tools", "hardware")


def step_key(components: dict[str, Any]) -> str:
    return sha256_text(canonical_json(components))


def components(step: Step, root: Path) -> dict[str, Any]:
    """Everything the step's key is made of. Inputs by role and file name, never absolute path."""
    from kiln.rules import get_rule  # the rules (pydantic) only when a step is checked

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
    except UnsafeFolderEntry as err:  # the step fails with this when it runs
        return f"input {err.naming(relative(err.folder, root))}"
    return reason(step, root, current)


def is_up_to_date(step: Step, root: Path) -> bool:
    return why(step, root) is None


def reason(step: Step, root: Path, current: dict[str, Any]) -> str | None:
    """why(), given the step's current components (so a running step hashes its inputs once)."""
    record = read_record(root, step)
    if record is None:
        return _change_since_last(step, root, current) or "not built yet"
    if record.key != step_key(current):
        return describe_change(record.components, current) or "key changed (the record's components do not say how)"
    for out in record.outputs.values():
        try:
            found = digest(root, root / out["path"])
        except FileNotFoundError:
            return f"output {out['path']} is missing"
        except UnsafeFolderEntry as err:
            return f"output {out['path']} is not what this step wrote: {err.naming(relative(err.folder, root))}"
        if found != out["sha256"]:
            return f"output {out['path']} is not what this step wrote ({_what_changed(root, out)}changed on disk, or built by another configuration)"
    return None


def _what_changed(root: Path, out: dict[str, Any]) -> str:
    """For a folder output, the first file in it that differs from what the record lists, as
    "<file> changed|added|removed; " (empty for a file output, or a folder that became a file)."""
    path = root / out["path"]
    if "files" not in out or not path.is_dir():
        return ""
    before = {rel: sha256 for rel, sha256, _ in out["files"]}
    after = {rel: sha256 for rel, sha256, _ in listing(root, path)}
    for rel in sorted(before.keys() | after.keys()):
        if before.get(rel) != after.get(rel):
            change = "added" if rel not in before else "removed" if rel not in after else "changed"
            return f"{out['path']}/{rel} {change}; "
    return ""


def _change_since_last(step: Step, root: Path, current: dict[str, Any]) -> str | None:
    """A step never built with these params and inputs: say what differs from the last build of the
    same rule for the same target (a new opset, a new source file...)."""
    for model, target in step.owners():
        last = read_json(last_path(root, step, target, model))
        if last is not None:
            return describe_change(last, current)
    return None


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first difference between two sets of components, in words; None when they are equal."""
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
    for component in sorted((set(old) | set(new)) - set(KNOWN_COMPONENTS)):
        if old.get(component) != new.get(component):
            return f"key component {component} changed"
    if old.get("inputs") != new.get("inputs"):  # same files and digests, another order
        return "inputs changed order"
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
