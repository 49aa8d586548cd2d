"""Monorepo behaviour on tiny models: steps shared across manifests run once, the content-addressed
cache restores outputs instead of rerunning, `kiln cache gc` bounds it, `doit -n 2` with worker
processes builds the same bytes, and heavy steps wait for memory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


from workspaces import two_manifests


def executed(proc) -> list[str]:
    return [line[3:].split("  ")[0] for line in proc.stdout.splitlines() if line.startswith(".  ")]  # ".  build:<step>  <seconds> s"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_steps_of_two_manifests_run_once(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    ran = executed(ws.doit("build"))
    assert ran.count("build:a/onnx_a+onnx_b/export_onnx") == 1 and not any(r.startswith("build:b/") and "export" in r for r in ran)
    assert len(ran) == 7  # reference, export, simplify: once; validate: 2 per manifest
    for model in ("a", "b"):
        report = ws.report(model)
        assert report["ok"] and f"{model}/onnx_a+onnx_b/export_onnx" in [s["step"] for s in report["steps"]]  # named by its own targets
        lock = json.loads((ws.root / f"build/{model}/kiln.lock.json").read_text())
        assert {a["target"] for a in lock["artifacts"]} == {"onnx_a", "onnx_b"}
    assert sha256(ws.root / "build/a/onnx_a/model.onnx") == sha256(ws.root / "build/b/onnx_a/model.onnx")
    ws.edit('options = { simplify = false }', 'options = { simplify = false, constant_folding = false }', name="b")
    ran = executed(ws.doit("build"))
    assert ran and all(name.startswith("build:b/") for name in ran)  # only b's own steps


def test_the_cache_restores_an_earlier_configuration_without_running_rules(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    ws.doit("build", "manifest=a")
    ws.edit("opset = 17", "opset = 18", name="a")
    ws.doit("build", "manifest=a")
    import shutil

    shutil.rmtree(ws.root / "build")  # a clean checkout of the earlier branch
    ws.edit("opset = 18", "opset = 17", name="a")
    ws.doit("build", "manifest=a")
    report = ws.report("a")
    ran = [s for s in report["steps"] if s["status"] == "ran"]
    assert ran and all(s["why"].endswith("restored from the cache") for s in ran), [s["why"] for s in ran]
    assert report["ok"] and report["artifacts"][0]["metrics"]["scores"]["min_cosine"] > 0.9999
    records = [json.loads(p.read_text()) for p in (ws.root / "build/.kiln/steps").glob("*.json")]
    assert records and all(r["restored"] for r in records)


def test_a_corrupted_cache_object_is_never_restored(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    ws.doit("build", "manifest=a")
    for obj in (ws.root / ".kiln/cache/objects").glob("*/*"):
        os.unlink(obj)  # break the hard link first: the build's own files stay intact
        obj.write_bytes(b"tampered")
    import shutil

    shutil.rmtree(ws.root / "build")
    ws.doit("build", "manifest=a")
    report = ws.report("a")
    assert report["ok"] and not any("restored" in (s.get("why") or "") for s in report["steps"])


def test_cache_gc_keeps_it_within_the_limit(tmp_path: Path):
    ws = two_manifests(tmp_path / "ws")
    ws.doit("build", "manifest=a")
    info = ws.kiln("cache", "info")
    assert info.returncode == 0 and " 0 step entries" not in info.stdout
    gc = ws.kiln("cache", "gc", "--max-size", "0")
    assert gc.returncode == 0 and "0.0 MiB kept" in gc.stdout
    assert "0 step entries, 0 objects" in ws.kiln("cache", "info").stdout
    bad = ws.kiln("cache", "gc", "--max-size", "lots")
    assert bad.returncode == 2 and "'lots' is not a size" in bad.stderr
    assert (ws.root / "build/a/onnx_a/model.onnx").exists()  # the build keeps its outputs


def test_parallel_worker_processes_build_the_same_bytes(tmp_path: Path):
    serial, parallel = two_manifests(tmp_path / "serial"), two_manifests(tmp_path / "parallel")
    serial.doit("build")
    parallel.doit("-n", "2", "build")  # doit's default: worker processes
    for model in ("a", "b"):
        assert parallel.report(model)["ok"]
        for target in ("onnx_a", "onnx_b"):
            assert sha256(serial.root / f"build/{model}/{target}/model.onnx") == sha256(parallel.root / f"build/{model}/{target}/model.onnx")
    assert executed(parallel.doit("-n", "2", "build")) == []
