"""Builds that are killed (SIGKILL to the whole process group, as a crash or a cancelled CI job) or
that race each other: the artifacts that end up published are always a clean build's bytes, a
rebuild finishes the work, and nothing partial or stale is left under build/. A rule that crashes
(a plain exception, not a StepError) fails its step on one line that names the step's log, which
holds the traceback and everything the rule printed, logged and warned; the terminal shows none of it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _env
from workspaces import tiny_workspace


def torch_workspace(root: Path, targets: str):
    """The tiny torch factory of test_sources with these targets."""
    ws = tiny_workspace(root, 'kind = "torch"\nfactory = "tinynet:build"')
    text = ws.manifest("tiny").read_text()
    ws.manifest("tiny").write_text(text[: text.index("[targets.onnx_a]")] + targets + text[text.index("[validation]"):])
    return ws

TARGETS = '''
[targets.onnx_a]
format = "onnx"

[targets.raw]
format = "onnx"
options = { simplify = false }

[targets.fp16]
format = "onnx"
precision = "fp16"

[targets.int8]
format = "onnx"
precision = "int8"
# The 6-16-3 MLP's 3 outputs make a row's cosine fragile under int8 activations (0.68 at worst with
# onnxruntime 1.31-1.32); this test is about crashes, not accuracy.
thresholds = { min_cosine = 0.5 }

[targets.traced]
format = "torchscript"

[targets.weights]
format = "safetensors"
precision = "fp16"
'''
KILLS = 20  # trials that really were killed mid-build
MAX_STARTS = 100  # builds that finish before their kill are not trials; this bounds the retries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published(root: Path) -> dict[str, str]:
    """Every visible file under build/tiny/<target>/ -> its sha256."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted((root / "build/tiny").glob("*/*")) if not p.name.startswith(".")}


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in (root / "build").rglob("*.tmp")]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    ws = torch_workspace(tmp_path_factory.mktemp("clean") / "ws", TARGETS)
    ws.doit("build")
    return published(ws.root)


def _start(root: Path, cache: bool) -> subprocess.Popen:
    env = _env() | ({} if cache else {"KILN_CACHE": "off"})
    return subprocess.Popen([sys.executable, "-m", "doit", "build"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _timed_build(root: Path, cache: bool) -> float:
    began = time.monotonic()
    proc = _start(root, cache)
    assert proc.wait(timeout=600) == 0
    return time.monotonic() - began


def test_killed_builds_never_publish_a_partial_artifact_and_a_rebuild_finishes(tmp_path: Path, clean):
    ws = torch_workspace(tmp_path / "ws", TARGETS)
    # How long a whole build takes here, running the rules or restoring from the cache: the kill moments are
    # drawn within those, so kills land mid-build on a slow machine and on a fast one alike.
    whole = {False: _timed_build(ws.root, cache=True)}  # cache on but empty: runs every rule, fills the cache
    shutil.rmtree(ws.root / "build")
    whole[True] = _timed_build(ws.root, cache=True)
    shutil.rmtree(ws.root / "build")
    rng = random.Random(7)
    kills = starts = 0
    while kills < KILLS and starts < MAX_STARTS:
        starts += 1
        if kills % 4 == 0 and (ws.root / "build").exists():
            shutil.rmtree(ws.root / "build")  # from scratch again, so kills land in every kind of step
        cache = kills % 2 == 0  # half the trials restore from the cache instead of running rules
        proc = _start(ws.root, cache)
        time.sleep(rng.uniform(0.05, 0.9 * whole[cache]))
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for name, digest in published(ws.root).items():  # whatever is visible is complete and right
            assert clean.get(name) == digest, f"start {starts}: {name} is not the clean build's"
        if finished:
            shutil.rmtree(ws.root / "build")  # it finished first: the next start has work to be killed in
    assert kills == KILLS, f"only {kills} of {starts} builds were still running at their kill moment"
    ws.doit("build")
    assert published(ws.root) == clean
    assert leftovers(ws.root) == []
    assert [line for line in ws.doit("build").stdout.splitlines() if line.startswith(".  ")] == []
    assert ws.kiln("verify", "tiny").returncode == 0


def test_two_builds_started_at_once_take_turns(tmp_path: Path, clean):
    ws = torch_workspace(tmp_path / "ws", TARGETS)
    procs = [subprocess.Popen([sys.executable, "-m", "doit", "build"], cwd=ws.root, env=_env() | {"KILN_CACHE": "off"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0, 0], results
    assert any("kiln: waiting for another build of this workspace to finish (pid " in err for _, err, _ in results)
    ran = [sum(line.startswith(".  ") for line in out.splitlines()) for out, _, _ in results]
    assert sorted(ran)[0] == 0 and sorted(ran)[1] > 0  # the second found everything built by the first
    assert published(ws.root) == clean
    assert [line for line in ws.doit("build").stdout.splitlines() if line.startswith(".  ")] == []  # databases intact


NOISY_BUG = """
import logging
import os
import sys
import warnings


def build():
    print("factory says hello")
    warnings.warn("factory warning")
    logging.getLogger("factory").warning("factory log record")
    print("factory stderr", file=sys.stderr)
    os.write(2, b"native noise\\n")
    raise ValueError("the factory has a bug")
"""


def test_a_crashing_rule_prints_one_line_and_its_traceback_and_noise_go_to_the_log(tmp_path: Path):
    ws = torch_workspace(tmp_path / "ws", '\n[targets.onnx_a]\nformat = "onnx"\n')
    (ws.root / "tinynet.py").write_text(NOISY_BUG)
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a failed step, not a crash of kiln (2)
    terminal = proc.stdout + proc.stderr
    for noise in ("Traceback", "factory says hello", "factory warning", "factory log record", "factory stderr", "native noise"):
        assert noise not in terminal, noise
    # steps run side by side by default: the export may have started beside the reference and failed
    # the same way; each failure is its own one line naming its own log
    failures = [line for line in terminal.splitlines() if "the factory has a bug" in line]
    assert {f.split(":")[0] for f in failures} <= {"tiny/onnx_a/reference_outputs", "tiny/onnx_a/export_onnx"}, failures
    (line,) = [f for f in failures if f.startswith("tiny/onnx_a/reference_outputs:")]
    log = line[line.index("(log: ") + len("(log: "):-1]
    assert line == f"tiny/onnx_a/reference_outputs: ValueError: the factory has a bug (at tinynet.py:14) (log: {log})"
    assert log.startswith("build/.kiln/logs/reference_outputs-") and log.endswith(".log")
    text = (ws.root / log).read_text()
    assert "Traceback (most recent call last)" in text and 'raise ValueError("the factory has a bug")' in text
    for noise in ("factory says hello", "WARNING factory: factory log record", "factory stderr", "native noise"):
        assert noise in text, noise
    # Python shows a warning once per place: whichever of the two steps ran the factory first has it
    logs = [text] + [(ws.root / f[f.index("(log: ") + len("(log: "):-1]).read_text() for f in failures if f is not line]
    assert any("UserWarning: factory warning" in one for one in logs)
    (failed,) = [s for s in ws.report("tiny")["steps"] if s["status"] == "failed" and s["rule"] == "reference_outputs"]
    assert failed["log"] == log and failed["error"] == line.removesuffix(f" (log: {log})")
    records = [json.loads(p.read_text()) for p in (ws.root / "build/.kiln/steps").glob("*.failed.json")]
    assert log in [r["log"] for r in records] and len(records) == len(failures)
    assert leftovers(ws.root) == []
