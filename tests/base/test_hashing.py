"""kiln.base.hashing: canonical JSON, sha256 of text and files (also while copying), BLAKE3 of files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from kiln.base import hashing
from kiln.base.hashing import blake3_file, canonical_json, copy_hashing, sha256_file, sha256_text


def test_canonical_json_is_one_text_per_value_at_every_depth():
    one = {"outer": {"b": [{"y": 1, "x": 2}], "a": None}, "name": "caf\u00e9"}
    other = {"name": "caf\u00e9", "outer": {"a": None, "b": [{"x": 2, "y": 1}]}}
    assert canonical_json(one) == canonical_json(other) == '{"name":"caf\u00e9","outer":{"a":null,"b":[{"x":2,"y":1}]}}'
    assert canonical_json([2, 1]) != canonical_json([1, 2])  # list order is meaning, not layout
    assert canonical_json({"f": 0.1}) == '{"f":0.1}'


def test_sha256_text_hashes_utf8():
    assert sha256_text("caf\u00e9") == hashlib.sha256("caf\u00e9".encode("utf-8")).hexdigest()


@pytest.mark.parametrize("size", [0, 1, hashing.CHUNK, 2 * hashing.CHUNK + 17])
def test_sha256_file_and_copy_hashing_agree_with_hashlib(tmp_path: Path, size: int):
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(source) == expected
    dest = tmp_path / "copy.bin"
    assert copy_hashing(source, dest) == expected
    assert dest.read_bytes() == data


def test_copy_hashing_overwrites_an_existing_destination(tmp_path: Path):
    source, dest = tmp_path / "s", tmp_path / "d"
    source.write_bytes(b"short")
    dest.write_bytes(b"a much longer old file")
    copy_hashing(source, dest)
    assert dest.read_bytes() == b"short"


def test_blake3_of_an_empty_file(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert blake3_file(empty) == blake3.blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_blake3_of_a_file_is_blake3_of_its_bytes(tmp_path: Path):
    data = os.urandom(3 * (1 << 16) + 5)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert blake3_file(path) == blake3.blake3(data).hexdigest()
