"""export_torchscript / export_torch_export on a tiny torch factory: the artifacts reload with torch
alone, reproduce the source, validate, and are byte-identical across workspaces."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from workspaces import tiny_workspace

TARGETS = '''
[targets.traced]
format = "torchscript"

[targets.scripted]
format = "torchscript"
mode = "script"

[targets.exported]
format = "torch_export"
'''

NOT_SCRIPTABLE = '''
import torch

class VarArgs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, *xs):  # TorchScript cannot compile *args
        return self.fc(xs[0])

def build():
    torch.manual_seed(0)
    return VarArgs()
'''


def torch_workspace(root: Path, targets: str = TARGETS):
    ws = tiny_workspace(root, 'kind = "torch"\nfactory = "tinynet:build"')
    manifest = ws.manifest("tiny")
    text = manifest.read_text()
    manifest.write_text(text[: text.index("[targets.onnx_a]")] + targets + text[text.index("[validation]"):])
    return ws


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_torchscript_and_torch_export_reload_and_match_the_source(tmp_path: Path):
    ws = torch_workspace(tmp_path / "a")
    ws.doit("build")
    report = ws.report("tiny")
    assert report["ok"] and {a["target"] for a in report["artifacts"]} == {"traced", "scripted", "exported"}
    for artifact in report["artifacts"]:
        assert artifact["metrics"]["scores"]["max_abs_diff"] <= 1e-6, artifact["target"]
    import sys

    sys.path.insert(0, str(ws.root))
    from tinynet import build

    x = torch.from_numpy(np.random.default_rng(5).standard_normal((7, 6)).astype(np.float32))  # a batch size never seen
    with torch.no_grad():
        want = build().eval()(x)
        # traced and exported: forward(*inputs in manifest order) -> tuple of the manifest's outputs;
        # scripted: the source module itself, with its own forward
        (traced,) = torch.jit.load(str(ws.root / "build/tiny/traced/model.pt"))(x)
        scripted = torch.jit.load(str(ws.root / "build/tiny/scripted/model.pt"))(x)
        (exported,) = torch.export.load(str(ws.root / "build/tiny/exported/model.pt2")).module()(x)
        assert torch.equal(traced, want) and torch.equal(scripted, want) and torch.equal(exported, want)


def test_artifacts_are_byte_identical_across_workspaces(tmp_path: Path):
    a, b = torch_workspace(tmp_path / "a"), torch_workspace(tmp_path / "elsewhere")
    a.doit("build")
    b.doit("build")
    for rel in ("traced/model.pt", "scripted/model.pt", "exported/model.pt2"):
        assert sha256(a.root / "build/tiny" / rel) == sha256(b.root / "build/tiny" / rel), rel


def test_traced_and_exported_archives_name_no_absolute_path(tmp_path: Path):
    """Every file name in their debug records is workspace-relative or site-packages/..., python/...:
    kiln's own frames included, whether kiln runs installed, editable or from a checkout, so the
    bytes do not depend on where the workspace, the virtualenv or kiln is."""
    import re
    import sys
    import zipfile

    ws = torch_workspace(tmp_path / "a", TARGETS.replace('[targets.scripted]\nformat = "torchscript"\nmode = "script"\n', ""))
    ws.doit("build")
    places = [str(tmp_path), sys.prefix, str(Path(__file__).resolve().parents[2]), str(Path(torch.__file__).resolve().parents[1])]
    for rel in ("traced/model.pt", "exported/model.pt2"):
        archive = zipfile.ZipFile(ws.root / "build/tiny" / rel)
        text = b"".join(archive.read(name) for name in archive.namelist())
        assert re.search(rb"site-packages/kiln/[\w/]+\.py", text), rel  # kiln's frames are recorded, portably
        for place in places:
            assert place.encode() not in text, (rel, place)


def test_script_mode_failure_names_the_fix(tmp_path: Path):
    ws = torch_workspace(tmp_path / "ws", '\n[targets.scripted]\nformat = "torchscript"\nmode = "script"\n')
    (ws.root / "tinynet.py").write_text(NOT_SCRIPTABLE)
    proc = ws.doit("build", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "torch.jit.script failed:" in out and 'mode = "trace" records one run instead' in out
    assert not (ws.root / "build/tiny/scripted").exists()


BROKEN_FACTORY = '''
def build():
    raise ValueError("the tokenizer has no pad token")
'''


def test_a_source_that_fails_to_load_in_the_export_child_is_not_blamed_on_the_tracer(tmp_path: Path):
    ws = torch_workspace(tmp_path / "ws", '\n[targets.traced]\nformat = "torchscript"\n')
    (ws.root / "tinynet.py").write_text(BROKEN_FACTORY)
    proc = ws.doit("build:tiny/traced/export_torchscript", check=False)  # the export alone: the reference would fail first
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    (line,) = [line for line in out.splitlines() if "the tokenizer has no pad token" in line]
    assert line.startswith("tiny/traced/export_torchscript: ValueError: the tokenizer has no pad token (at tinynet.py:3) (log: build/.kiln/logs/")
    assert "torch.jit" not in line and "Traceback" not in out
    log = ws.root / line[line.index("(log: ") + 6:-1]
    assert "Traceback (most recent call last)" in log.read_text()  # the child's, passed on into the step's log


def test_traced_and_exported_bytes_match_the_golden(tmp_path: Path):
    """Same inputs and tool versions, same bytes, whatever was edited around the exporters: traced
    TorchScript records the file names and line numbers of the frames it traces under (kiln's
    `_trace` and `in_fresh_stack` included), so a line added above them without a rule version bump
    would give other bytes under an unchanged step key (a cache or a lockfile would then disagree
    with a rebuild). They also record the standard library's threading.py frames, so the golden is
    per torch and Python version (both are in the step's key). Regenerate only with a rule version
    bump or a new torch or Python: KILN_UPDATE_GOLDEN=1 pytest tests/build_rules/test_export_torch.py -k golden."""
    import json
    import os
    import platform

    golden = Path(__file__).resolve().parents[1] / "golden" / "torch_artifacts.json"
    ws = torch_workspace(tmp_path / "a", TARGETS.replace('[targets.scripted]\nformat = "torchscript"\nmode = "script"\n', ""))
    ws.doit("build")
    found = {rel: sha256(ws.root / "build/tiny" / rel) for rel in ("traced/model.pt", "exported/model.pt2")}
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    known = json.loads(golden.read_text()) if golden.exists() else {}
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(known | {versions: found}, indent=1, sort_keys=True) + "\n")
        known[versions] = found
    if versions not in known:
        import pytest

        pytest.skip(f"no golden bytes for {versions} (tests/golden/torch_artifacts.json)")
    assert found == known[versions]
