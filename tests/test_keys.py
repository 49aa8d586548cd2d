from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import kiln.keys as keys
from kiln.keys import DigestCache, canonical_json, sha256_file, step_key, tool_versions


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    assert step_key({"x": 1, "y": 2}) == step_key({"y": 2, "x": 1})


def test_tool_versions_include_kiln_and_report_missing_tools():
    versions = tool_versions(("numpy", "no-such-dist-xyz"))
    assert versions["kiln"] and versions["numpy"][0].isdigit() and versions["no-such-dist-xyz"] == "not installed"


def test_digest_cache_hashes_a_file_once_per_stat(tmp_path: Path, monkeypatch):
    calls = []
    real = keys.sha256_file
    monkeypatch.setattr(keys, "sha256_file", lambda p: calls.append(p) or real(p))
    data = tmp_path / "w.bin"
    data.write_bytes(os.urandom(1 << 16))
    cache = DigestCache(tmp_path / "state" / "d.sqlite")
    first = cache.digest(data)
    assert first == sha256_file(data) and cache.digest(data) == first and len(calls) == 1

    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))  # touch: same bytes, new stat
    assert cache.digest(data) == first and len(calls) == 2
    assert DigestCache(tmp_path / "state" / "d.sqlite").digest(data) == first and len(calls) == 2  # refreshed entry persists

    data.write_bytes(b"other bytes")
    assert cache.digest(data) == sha256_file(data) != first


@pytest.mark.parametrize("trial", range(5))
def test_digest_cache_is_shared_by_threads(tmp_path: Path, trial: int):
    """doit -n 2 -P thread runs steps in threads that share one cache object (sqlite3 connections
    must not cross threads)."""
    from conftest import run_in_threads

    files = []
    for i in range(4):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 1000)
    cache = DigestCache(tmp_path / "digests.sqlite")
    jobs = {f.name: (lambda f=f: cache.digest(f)) for f in files}
    results = run_in_threads(jobs, copies=3)  # twelve threads open a new database at once
    assert len(results) == 12
    assert all(value == sha256_file(tmp_path / name) for name, value in results)
