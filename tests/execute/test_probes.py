"""kiln.execute.probes + kiln.runtime.probes: a latency probe that could not run alone (other steps
were running) is left as a request and measured at the end of the build, into the step's record
(what the report reads) and its local cache entry (what a restore brings back). A request whose
step has since been rebuilt is dropped unmeasured; no request outlives the end of a build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import new_workspace
from kiln.execute.probes import run_deferred
from kiln.plan.load import plan_manifests
from kiln.runtime import probes
from kiln.state.cache import Cache
from kiln.state.records import read_record, record_path
from workspaces import MANIFEST, mlp


def two_onnx_targets(tmp_path: Path):
    """A tiny ONNX model with an fp32 and an fp16 target: two validate steps with latency probes."""
    ws = new_workspace(tmp_path / "ws", {"m": MANIFEST.format(name="m") + '\n[targets.fp16]\nformat = "onnx"\nprecision = "fp16"\n'})
    mlp(ws.root / "manifests/models/m.onnx", seed=0)
    np.savez(ws.root / "manifests/data/x.npz", x=np.random.default_rng(7).standard_normal((32, 8)).astype(np.float32))
    return ws


def build(ws, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", "build", "m", *args], cwd=ws.root, capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


@pytest.fixture
def built(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    ws = two_onnx_targets(tmp_path)
    proc = build(ws, "-n", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = plan_manifests(ws.root, [ws.manifest("m")], wildcard=True)[0]
    validate = next(s for s in plan.steps if s.rule == "validate" and s.targets == ["fp32"])
    return ws, validate


def _defer(ws, step) -> str:
    """What validate leaves when it could not probe alone: a request, and the placeholder in its facts
    (record and cache entry)."""
    record = read_record(ws.root, step)
    artifact = Path(step.inputs["model"][0])
    placeholder = probes.defer(ws.root, step.name, "onnx", artifact, {"x": np.ones((1, 8), np.float32)})
    info = {k: v for k, v in record.info.items() if k != "latency"} | {"latency": placeholder}
    (record_path(ws.root, step)).write_text(json.dumps({**record.data, "info": info}))
    cache = Cache.for_root(ws.root)
    cache.put_entry(record.key, {**cache.get_entry(record.key), "info": info})
    return placeholder["deferred"]


def test_a_deferred_probe_is_measured_into_the_record_and_the_cache_entry(built):
    ws, step = built
    token = _defer(ws, step)
    assert read_record(ws.root, step).info["latency"]["deferred"] == token
    assert run_deferred(ws.root, {step.name: step}) == 1
    latency = read_record(ws.root, step).info["latency"]
    assert latency["median_ms"] > 0 and latency["shape"] == {"x": [1, 8]} and "deferred" not in latency
    entry = Cache.for_root(ws.root).get_entry(read_record(ws.root, step).key)
    assert entry["info"]["latency"] == latency
    assert list(probes.probes_dir(ws.root).iterdir()) == []


def test_a_request_for_a_step_rebuilt_since_is_dropped_unmeasured(built):
    ws, step = built
    _defer(ws, step)
    rebuilt = read_record(ws.root, step)
    info = rebuilt.info | {"latency": {"median_ms": 1.5}}  # the step ran again and measured alone
    record_path(ws.root, step).write_text(json.dumps({**rebuilt.data, "info": info}))
    assert run_deferred(ws.root, {step.name: step}) == 0
    assert read_record(ws.root, step).info["latency"] == {"median_ms": 1.5}
    assert list(probes.probes_dir(ws.root).iterdir()) == []


def test_a_torn_request_is_dropped(built):
    ws, step = built
    folder = probes.probes_dir(ws.root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "abc.json").write_text("{not json")
    assert run_deferred(ws.root, {step.name: step}) == 0
    assert list(folder.iterdir()) == []


def test_a_parallel_build_leaves_every_latency_measured_and_no_request(tmp_path: Path, monkeypatch):
    """Two validate steps side by side (-n 2): whichever probe met the other step was deferred and
    measured at the end; the report holds real numbers for both, never the placeholder."""
    monkeypatch.setenv("KILN_CACHE", "off")
    ws = two_onnx_targets(tmp_path)
    proc = build(ws, "-n", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    artifacts = {a["target"]: a for a in ws.report("m")["artifacts"]}
    assert all(artifacts[t]["latency"]["median_ms"] > 0 for t in ("fp32", "fp16")), artifacts
    assert not any(probes.probes_dir(ws.root).glob("*"))


def test_probes_that_meet_another_step_are_measured_at_the_end(tmp_path: Path, monkeypatch):
    """This test holds a step's share of the quiet lock for the whole build, as a neighbour step
    would: no probe is alone, every one is deferred, and the end of the build measures them."""
    from kiln.base.quiet import running

    monkeypatch.setenv("KILN_CACHE", "off")
    ws = two_onnx_targets(tmp_path)
    with running(ws.root):
        proc = build(ws, "-n", "1", "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kiln: measuring latency of the artifacts validated while other steps ran" in proc.stdout
    artifacts = {a["target"]: a for a in ws.report("m")["artifacts"]}
    assert all(artifacts[t]["latency"]["median_ms"] > 0 for t in ("fp32", "fp16")), artifacts
    assert not any(probes.probes_dir(ws.root).glob("*"))
