"""kiln.base.fsio: files written whole or not at all, and JSON read once per stat.

write_json_atomic (no write when unchanged, no temp left behind, durable and by-line forms),
read_json (cached while the stat is unchanged, sees a replaced file, None for missing or torn
JSON), write_bytes_atomic, and dumps_by_line (valid JSON equal to the data, one key per line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.base.fsio import dumps_by_line, read_json, write_bytes_atomic, write_json_atomic

RECORD = {"step": "m/t/validate", "inputs": {"model": ["build/a.onnx"]}, "passed": True, "samples": 40, "metrics": [0.5, 1e-7]}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_json_atomic_creates_the_folder_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "state" / "records" / "r.json"
    assert write_json_atomic(path, RECORD) is True
    assert json.loads(path.read_text()) == RECORD
    assert path.read_text() == json.dumps(RECORD, indent=2, sort_keys=True) + "\n"
    assert _listing(path.parent) == ["r.json"]


def test_unchanged_data_is_not_written_again(tmp_path: Path):
    path = tmp_path / "r.json"
    write_json_atomic(path, RECORD)
    before = os.stat(path)
    assert write_json_atomic(path, json.loads(json.dumps(RECORD))) is False  # equal, not the same object
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _listing(tmp_path) == ["r.json"]


def test_changed_data_replaces_the_file(tmp_path: Path):
    path = tmp_path / "r.json"
    write_json_atomic(path, RECORD)
    assert read_json(path) == RECORD  # now cached
    assert write_json_atomic(path, RECORD | {"samples": 41}) is True
    assert read_json(path)["samples"] == 41 and json.loads(path.read_text())["samples"] == 41
    assert _listing(tmp_path) == ["r.json"]


def test_a_torn_file_is_rewritten_even_with_the_same_data(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RECORD)[:-5])
    assert write_json_atomic(path, RECORD) is True and json.loads(path.read_text()) == RECORD


def test_a_non_durable_write_is_by_line_json(tmp_path: Path):
    path = tmp_path / "fresh.json"
    assert write_json_atomic(path, RECORD, durable=False) is True
    assert path.read_text() == dumps_by_line(RECORD) and json.loads(path.read_text()) == RECORD
    assert write_json_atomic(path, RECORD, durable=False) is False


def test_read_json_parses_a_file_once_while_its_stat_is_unchanged(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RECORD))
    first = read_json(path)
    assert first == RECORD and read_json(path) is first


def test_read_json_sees_a_file_replaced_by_another_writer(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text('{"n": 1}')
    assert read_json(path) == {"n": 1}
    other = tmp_path / "other.json"
    other.write_text('{"n": 2}')  # same size: only the inode tells
    os.replace(other, path)
    assert read_json(path) == {"n": 2}


def test_read_json_is_none_for_missing_torn_or_undecodable_files(tmp_path: Path):
    assert read_json(tmp_path / "missing.json") is None
    torn = tmp_path / "torn.json"
    torn.write_text('{"step": "m/t/val')
    assert read_json(torn) is None
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"a": "\xff\xfe"}')
    assert read_json(binary) is None
    assert read_json(tmp_path) is None  # a folder


def test_write_bytes_atomic_writes_and_replaces_whole_files(tmp_path: Path):
    path = tmp_path / "out" / "model.bin"
    write_bytes_atomic(path, b"\x00first")
    assert path.read_bytes() == b"\x00first"
    write_bytes_atomic(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    write_bytes_atomic(path, b"")
    assert path.read_bytes() == b"" and _listing(path.parent) == ["model.bin"]


def test_dumps_by_line_is_json_equal_to_the_data():
    data = {
        "steps": [{"step": "b", "status": "ran"}, {"step": "a", "status": "cached", "nested": {"z": 1, "a": [1, 2]}}],
        "empty": [], "none": None, "text": "line\nbreak \"quoted\" caf\u00e9 \u2713", "number": 1.5e-9,
        "flag": False, "table": {"b": 2, "a": {"c": []}},
    }
    text = dumps_by_line(data)
    assert json.loads(text) == data
    assert text.endswith("}\n") and text == dumps_by_line(dict(reversed(list(data.items()))))  # key order does not matter
    lines = text.splitlines()
    assert lines[1].startswith(' "empty": []')  # sorted keys, one per line
    assert '  {"status": "ran", "step": "b"},' in lines  # one list item per line, keys sorted
    assert json.loads(dumps_by_line({})) == {}
