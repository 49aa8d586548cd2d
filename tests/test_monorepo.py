"""Monorepo behaviour on tiny models: steps shared across manifests run once, the content-addressed
cache restores outputs instead of rerunning, `kiln cache gc` bounds it, `doit -n 2` with worker
processes builds the same bytes, and heavy steps wait for memory."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from conftest import Workspace, new_workspace
from test_sources import TINY_MANIFEST, TINYNET

TORCH_SOURCE = 'kind = "torch"\nfactory = "tinynet:build"'


def two_manifests(root: Path) -> Workspace:
    """a.toml and b.toml: the same torch source and data, the same two targets."""
    ws = new_workspace(root, {name: TINY_MANIFEST.format(name=name, source=TORCH_SOURCE) for name in ("a", "b")})
    (ws.root / "tinynet.py").write_text(TINYNET)
    np.savez(ws.root / "manifests/data/tiny.npz", features=np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32))
    return ws


def executed(proc) -> list[str]:
    return [line[3:] for line in proc.stdout.splitlines() if line.startswith(".  ")]


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


def test_gc_drops_least_recently_used_first(tmp_path: Path):
    from kiln.state.cache import Cache

    cache = Cache(tmp_path / "cache")
    for index, size in enumerate((100, 200, 300)):
        out = tmp_path / f"out{index}"
        out.write_bytes(bytes([index]) * size)
        cache.store(f"{index:064d}", {"model": {"path": out.name, "sha256": sha256(out), "bytes": size}}, tmp_path, {})
        os.utime(cache.entry_path(f"{index:064d}"), (1000 + index, 1000 + index))
    os.utime(cache.entry_path(f"{0:064d}"), (2000, 2000))  # the first one was used last
    done = cache.gc(450)
    # newest first: entry 0 (100 B, used last) and entry 2 (300 B) fit in 450; entry 1 (200 B) would not
    assert done["entries_removed"] == 1 and done["objects_removed"] == 1 and done["bytes_kept"] == 400
    assert cache.lookup(f"{0:064d}") is not None and cache.lookup(f"{2:064d}") is not None and cache.lookup(f"{1:064d}") is None


def test_parallel_worker_processes_build_the_same_bytes(tmp_path: Path):
    serial, parallel = two_manifests(tmp_path / "serial"), two_manifests(tmp_path / "parallel")
    serial.doit("build")
    parallel.doit("-n", "2", "build")  # doit's default: worker processes
    for model in ("a", "b"):
        assert parallel.report(model)["ok"]
        for target in ("onnx_a", "onnx_b"):
            assert sha256(serial.root / f"build/{model}/{target}/model.onnx") == sha256(parallel.root / f"build/{model}/{target}/model.onnx")
    assert executed(parallel.doit("-n", "2", "build")) == []


def test_a_step_waits_while_running_steps_hold_the_memory_budget(tmp_path: Path, monkeypatch, capsys):
    from kiln.execute.resources import reserve

    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")

    class Step:
        def __init__(self, name):
            self.name = name

    order: list[str] = []
    first_in = threading.Event()

    def first():
        with reserve(tmp_path, Step("m/a/export_onnx"), 600):
            order.append("first starts")
            first_in.set()
            time.sleep(0.5)
            order.append("first ends")

    def second():
        first_in.wait()
        with reserve(tmp_path, Step("m/b/export_onnx"), 600, poll_s=0.02):
            order.append("second starts")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first starts", "first ends", "second starts"]
    assert "m/b/export_onnx waits for memory: needs 600 MiB, 600 of 1000 MiB reserved by m/a/export_onnx" in capsys.readouterr().err
    with reserve(tmp_path, Step("alone"), 5000):  # more than the budget, but nothing else runs: it goes
        pass


def test_reservations_of_dead_processes_are_dropped(tmp_path: Path, monkeypatch):
    from kiln.execute.resources import reserve

    monkeypatch.setenv("KILN_MEMORY_MIB", "1000")
    state = tmp_path / "build/.kiln"
    state.mkdir(parents=True)
    (state / "memory.json").write_text(json.dumps({"gone": {"pid": 2 ** 22 + 12345, "mib": 900, "step": "crashed"}}))

    class Step:
        name = "m/a/validate"

    started = time.monotonic()
    with reserve(tmp_path, Step(), 600):
        pass
    assert time.monotonic() - started < 1.0


def test_every_kind_of_change_has_its_reason():
    from kiln.state.uptodate import describe_change

    base = {"rule": "r", "version": 1, "params": {"opset": 17}, "inputs": {"model": [["m.onnx", "a" * 64]]},
            "tools": {"onnx": "1.0"}, "hardware": {"gpu": "H100", "tensorrt": "10.0"}}
    def changed(**diff):
        return describe_change(base, base | diff)
    assert changed() is None
    assert changed(version=2) == "rule r version changed: 1 -> 2"
    assert changed(params={"opset": 18}) == "parameter changed: params.opset: 17 -> 18"
    assert changed(inputs={"model": [["m.onnx", "b" * 64]]}) == "input model/m.onnx changed: sha256:aaaaaaaaaaaa -> sha256:bbbbbbbbbbbb"
    assert changed(tools={"onnx": "1.1"}) == "tool onnx changed: 1.0 -> 1.1"
    assert changed(hardware={"gpu": "H200", "tensorrt": "10.0"}) == "hardware changed: hardware.gpu: 'H100' -> 'H200'"
