"""kiln.state.lockfile: build/<model>/kiln.lock.json from the step records of a plan (none while a
step has no record; every published artifact with its companions; the tools of every key), rewritten
only when its content changes; `kiln verify`'s check of the locked files and of the provenance
statements' subjects; provenance_complete. Plans and records are made by hand over small files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from kiln.base.fsio import read_json, write_json_atomic
from kiln.plan.steps import Plan, Step
from kiln.state.lockfile import LOCK_VERSION, lock_data, lock_path, provenance_complete, verify, write_lock, write_provenance
from kiln.state.provenance import FILE
from kiln.state.records import write_record

MANIFEST = b'[model]\nname = "m"\n'
TOOLS = {"export_onnx": {"kiln": "0.1.0", "torch": "2.4.0", "onnx": "1.17.0"},
         "validate": {"kiln": "0.1.0", "onnxruntime": "1.20.0", "numpy": "2.0.0"},
         "convert_openvino": {"kiln": "0.1.0", "openvino": "2024.4"}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_plan(root: Path) -> Plan:
    """m.toml: target onnx (export -> validate) and target ov (export -> convert_openvino -> validate,
    publishing model.xml with its weights model.bin beside it)."""
    steps_dir, out = root / "build" / ".steps", root / "build" / "m"
    export = Step("export_onnx-000000000001", "export_onnx", {"opset": 17}, {"source": (root / "net.py",)},
                  {"model": steps_dir / "export_onnx-000000000001" / "model.onnx"}, "m", ["onnx", "ov"])
    validate_onnx = Step("validate-000000000002", "validate", {"target": "onnx"}, {"model": (export.outputs["model"],)},
                         {"artifact": out / "onnx" / "model.onnx", "validation": out / "onnx" / "validation.json"}, "m", ["onnx"], [export.id])
    convert = Step("convert_openvino-000000000003", "convert_openvino", {}, {"model": (export.outputs["model"],)},
                   {"xml": steps_dir / "convert_openvino-000000000003" / "model.xml", "bin": steps_dir / "convert_openvino-000000000003" / "model.bin"},
                   "m", ["ov"], [export.id])
    validate_ov = Step("validate-000000000004", "validate", {"target": "ov"}, {"model": (convert.outputs["xml"], convert.outputs["bin"])},
                       {"artifact": out / "ov" / "model.xml", "validation": out / "ov" / "validation.json", "weights": out / "ov" / "model.bin"},
                       "m", ["ov"], [convert.id])
    write_file(root / "manifests" / "m.toml", MANIFEST)
    write_file(root / "net.py", b"def build(): ...\n")
    return Plan("m", root / "manifests" / "m.toml", root, [export, validate_onnx, convert, validate_ov])


def run_by_hand(plan: Plan, step: Step, key: str | None = None) -> dict:
    """The step's outputs and record, as if it had run (inputs must exist)."""
    for role, path in step.outputs.items():
        write_file(path, f"{step.id}/{role}".encode())
    inputs = {role: [[p.name, sha256(p.read_bytes())] for p in files] for role, files in step.inputs.items()}
    data = {"step": step.name, "id": step.id, "key": key or sha256(step.id.encode()),
            "components": {"rule": step.rule, "version": 1, "params": step.params, "inputs": inputs, "tools": TOOLS[step.rule]},
            "outputs": {role: {"path": str(p.relative_to(plan.root)), "sha256": sha256(p.read_bytes()), "bytes": p.stat().st_size}
                        for role, p in step.outputs.items()},
            "reason": "not built yet", "seconds": 1.0, "info": {}, "restored": False}
    write_record(plan.root, step, data)
    return data


def built_plan(root: Path) -> Plan:
    plan = make_plan(root)
    for step in plan.steps:
        run_by_hand(plan, step)
    return plan


def locked_and_attested(root: Path) -> Plan:
    plan = built_plan(root)
    assert write_lock(plan)
    write_provenance(plan)
    return plan


# ---- lock_data ---------------------------------------------------------------------------------------

def test_no_lock_while_a_step_has_no_record(tmp_path: Path):
    plan = make_plan(tmp_path)
    for step in plan.steps[:-1]:
        run_by_hand(plan, step)
    assert lock_data(plan) is None
    assert write_lock(plan) is False and not lock_path(plan).exists()


def test_the_lock_names_every_step_by_its_key(tmp_path: Path):
    plan = built_plan(tmp_path)
    lock = lock_data(plan)
    assert lock["lock_version"] == LOCK_VERSION and lock["model"] == "m"
    assert lock["steps"] == [
        {"step": "m/onnx+ov/export_onnx", "rule": "export_onnx", "key": sha256(b"export_onnx-000000000001"), "targets": ["onnx", "ov"]},
        {"step": "m/onnx/validate", "rule": "validate", "key": sha256(b"validate-000000000002"), "targets": ["onnx"]},
        {"step": "m/ov/convert_openvino", "rule": "convert_openvino", "key": sha256(b"convert_openvino-000000000003"), "targets": ["ov"]},
        {"step": "m/ov/validate", "rule": "validate", "key": sha256(b"validate-000000000004"), "targets": ["ov"]},
    ]


def test_the_lock_holds_the_manifest_and_its_digest(tmp_path: Path):
    plan = built_plan(tmp_path)
    lock = lock_data(plan)
    assert lock["manifest"] == "manifests/m.toml" and lock["manifest_sha256"] == sha256(MANIFEST)


def test_the_lock_holds_the_manifest_bytes_the_build_planned_from(tmp_path: Path):
    plan = built_plan(tmp_path)
    plan.manifest_sha256 = "f" * 64  # the bytes parsed; the file was edited while the build ran
    assert lock_data(plan)["manifest_sha256"] == "f" * 64


def test_artifacts_come_from_publishing_steps_with_their_companions(tmp_path: Path):
    plan = make_plan(tmp_path)
    records = {step.id: run_by_hand(plan, step) for step in plan.steps}
    onnx, ov = records["validate-000000000002"]["outputs"], records["validate-000000000004"]["outputs"]
    assert lock_data(plan)["artifacts"] == [
        {"target": "onnx", **onnx["artifact"]},
        {"target": "ov", **ov["artifact"], "weights": ov["weights"]},  # validation.json is not locked
    ]


def test_the_lock_merges_the_tools_of_every_key(tmp_path: Path):
    tools = lock_data(built_plan(tmp_path))["tools"]
    assert tools == {"kiln": "0.1.0", "numpy": "2.0.0", "onnx": "1.17.0", "onnxruntime": "1.20.0", "openvino": "2024.4", "torch": "2.4.0"}
    assert list(tools) == sorted(tools)


def test_a_shared_step_is_named_by_this_manifests_own_targets(tmp_path: Path):
    first = built_plan(tmp_path)
    export = first.steps[0]
    export.shared_with.append(("n", "fp32"))  # manifest n needs the same export for its target fp32
    second = Plan("n", write_file(tmp_path / "manifests" / "n.toml", b"[model]\nname = 'n'\n"), tmp_path, [export])
    assert lock_data(second)["steps"] == [{"step": "n/fp32/export_onnx", "rule": "export_onnx", "key": sha256(export.id.encode()), "targets": ["fp32"]}]
    assert lock_data(first)["steps"][0]["step"] == "m/onnx+ov/export_onnx"


# ---- write_lock --------------------------------------------------------------------------------------

def test_write_lock_writes_once_and_then_only_on_change(tmp_path: Path):
    plan = built_plan(tmp_path)
    assert write_lock(plan) is True
    assert read_json(lock_path(plan)) == lock_data(plan)
    before = lock_path(plan).stat().st_mtime_ns, lock_path(plan).stat().st_ino
    assert write_lock(plan) is False
    assert (lock_path(plan).stat().st_mtime_ns, lock_path(plan).stat().st_ino) == before
    run_by_hand(plan, plan.steps[1], key="e" * 64)  # the onnx target was rebuilt with another key
    assert write_lock(plan) is True
    assert read_json(lock_path(plan))["steps"][1]["key"] == "e" * 64


def test_the_lock_has_no_timestamps(tmp_path: Path):
    one, two = built_plan(tmp_path / "one"), built_plan(tmp_path / "two")
    write_lock(one)
    write_lock(two)
    assert lock_path(one).read_bytes() == lock_path(two).read_bytes()
    assert lock_path(one) == tmp_path / "one" / "build" / "m" / "kiln.lock.json"


# ---- verify and provenance ----------------------------------------------------------------------------

def test_verify_finds_nothing_wrong_with_an_intact_build(tmp_path: Path):
    assert verify(locked_and_attested(tmp_path)) == []


def test_verify_without_a_lockfile_says_so(tmp_path: Path):
    assert verify(built_plan(tmp_path)) == ["build/m/kiln.lock.json: no lockfile (not built yet, or the last build failed)"]


def test_verify_reports_a_missing_artifact(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    locked = read_json(lock_path(plan))["artifacts"][0]["sha256"]
    (tmp_path / "build/m/onnx/model.onnx").unlink()
    assert verify(plan) == [f"build/m/onnx/model.onnx: missing (locked sha256 {locked[:12]})"]


def test_verify_reports_a_changed_byte(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    artifact = tmp_path / "build/m/onnx/model.onnx"
    locked = sha256(artifact.read_bytes())
    data = bytearray(artifact.read_bytes())
    data[0] ^= 1
    artifact.write_bytes(bytes(data))
    assert verify(plan) == [f"build/m/onnx/model.onnx: sha256 {sha256(bytes(data))[:12]} differs from the locked {locked[:12]}"]


def test_verify_checks_the_companions_too(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    (tmp_path / "build/m/ov/model.bin").write_bytes(b"other weights")
    problems = verify(plan)
    assert len(problems) == 1 and problems[0].startswith("build/m/ov/model.bin: sha256 ")


def test_verify_ignores_the_validation_file(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    (tmp_path / "build/m/onnx/validation.json").write_text("{}")
    assert verify(plan) == []


def test_verify_reports_a_statement_whose_subject_does_not_match(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    path = tmp_path / "build/m/ov" / FILE
    statement = read_json(path)
    write_json_atomic(path, statement | {"subject": [{"name": "build/m/ov/model.xml", "digest": {"sha256": "0" * 64}}]})
    assert verify(plan) == [f"build/m/ov/{FILE}: missing or its subject does not match the lockfile"]


def test_verify_reports_a_missing_statement(tmp_path: Path):
    plan = locked_and_attested(tmp_path)
    (tmp_path / "build/m/onnx" / FILE).unlink()
    assert verify(plan) == [f"build/m/onnx/{FILE}: missing or its subject does not match the lockfile"]


def test_provenance_is_complete_once_every_artifact_has_its_statement(tmp_path: Path):
    plan = built_plan(tmp_path)
    assert not provenance_complete(plan)
    write_lock(plan)
    write_provenance(plan)
    assert provenance_complete(plan)
    (tmp_path / "build/m/ov" / FILE).unlink()
    assert not provenance_complete(plan)


def test_no_statements_are_written_without_a_lockfile(tmp_path: Path):
    plan = built_plan(tmp_path)
    write_provenance(plan)
    assert not provenance_complete(plan) and not (tmp_path / "build/m/onnx" / FILE).exists()


def test_a_plan_without_publishing_steps_has_complete_provenance(tmp_path: Path):
    plan = make_plan(tmp_path)
    plan.steps = [plan.steps[0]]
    assert provenance_complete(plan)


def test_verify_reports_a_published_artifact_replaced_by_a_link_in_one_line(tmp_path: Path):
    """A link to a folder used to crash verify (IsADirectoryError); a link to a file with the locked
    bytes is not what the build published either. Each is one line naming the artifact."""
    plan = locked_and_attested(tmp_path)
    artifact = tmp_path / "build/m/onnx/model.onnx"
    locked = sha256(artifact.read_bytes())
    elsewhere = write_file(tmp_path / "elsewhere" / "model.onnx", artifact.read_bytes())
    artifact.unlink()
    artifact.symlink_to(elsewhere.parent, target_is_directory=True)
    assert verify(plan) == [f"build/m/onnx/model.onnx: a symbolic link (to {elsewhere.parent}), not the file or folder the build "
                            f"published (locked sha256 {locked[:12]}); build again to replace it"]
    artifact.unlink()
    artifact.symlink_to(elsewhere)
    assert len(verify(plan)) == 1 and verify(plan)[0].startswith(f"build/m/onnx/model.onnx: a symbolic link (to {elsewhere})")
