"""The hostile SafeTensors corpus: one malformed file per rule of the format, plus truncations and
seeded bit flips. `python tests/hostile_safetensors.py OUT_DIR` writes it; the tests build it in a
temp folder. Each case: (file name, bytes, text the SafetensorError must contain or None when a
random mutation may happen to stay valid)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np


def good_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((4, 8)).astype(np.float32), "b": np.arange(8, dtype=np.int16), "m": np.array([True, False, True])}


def file_with(header: object, data: bytes, raw_header: bytes | None = None, length: int | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _good_header() -> tuple[dict, bytes]:
    return {"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]}, "b": {"dtype": "I16", "shape": [8], "data_offsets": [128, 144]}}, bytes(144)


def rule_cases() -> list[tuple[str, bytes, str]]:
    h, data = _good_header()

    def with_entry(name: str, **changes) -> dict:
        copy = json.loads(json.dumps(h))
        copy[name].update(changes)
        return copy

    dup = b'{"w":{"dtype":"F32","shape":[4,8],"data_offsets":[0,128]},"w":{"dtype":"I16","shape":[8],"data_offsets":[128,144]}}'
    return [
        ("empty.safetensors", b"", "fewer than the 8-byte header length"),
        ("short_length.safetensors", b"\x05\x00\x00", "fewer than the 8-byte header length"),
        ("header_too_large.safetensors", struct.pack("<Q", 100_000_001) + b"{}", "header too large"),
        ("header_past_eof.safetensors", struct.pack("<Q", 1000) + b"{}", "1000 bytes claimed"),
        ("huge_length.safetensors", struct.pack("<Q", 2**64 - 1) + b"{}", "header too large"),
        ("not_utf8.safetensors", file_with(None, b"", raw_header=b'{"\xff":1}'), "not UTF-8"),
        ("no_brace.safetensors", file_with(None, b"", raw_header=b'[1, 2]  '), "must start with '{'"),
        ("leading_space.safetensors", file_with(None, b"", raw_header=b' {}     '), "must start with '{'"),
        ("bad_json.safetensors", file_with(None, b"", raw_header=b'{"w": '), "not valid JSON"),
        ("deep_nesting.safetensors", file_with(None, b"", raw_header=b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "nested too deeply"),
        ("nan_constant.safetensors", file_with(None, b"", raw_header=b'{"w": NaN}'), "NaN"),
        ("duplicate_name.safetensors", file_with(None, data, raw_header=dup), "duplicate name: 'w'"),
        ("nul_in_name.safetensors", file_with({"a\x00b": h["w"]}, bytes(128)), "name contains NUL"),
        ("unknown_dtype.safetensors", file_with(with_entry("w", dtype="F31"), data), "unknown dtype 'F31'"),
        ("dtype_not_string.safetensors", file_with(with_entry("w", dtype=4), data), "unknown dtype 4"),
        ("extra_field.safetensors", file_with(with_entry("w", device="cpu"), data), "exactly dtype, shape, data_offsets"),
        ("missing_shape.safetensors", file_with({"w": {"dtype": "F32", "data_offsets": [0, 128]}}, bytes(128)), "exactly dtype, shape, data_offsets"),
        ("negative_dim.safetensors", file_with(with_entry("w", shape=[-4, 8]), data), "shape must be a list of non-negative"),
        ("float_dim.safetensors", file_with(with_entry("w", shape=[4.0, 8]), data), "shape must be a list of non-negative"),
        ("three_offsets.safetensors", file_with(with_entry("w", data_offsets=[0, 64, 128]), data), "data_offsets must be [begin, end]"),
        ("entry_not_object.safetensors", file_with({"w": [1, 2]}, data), "exactly dtype, shape, data_offsets"),
        ("metadata_not_strings.safetensors", file_with({"__metadata__": {"a": 1}, **h}, data), "__metadata__ must map strings to strings"),
        ("header_is_list_after_brace.safetensors", file_with(None, b"", raw_header=b'{} []'), "not valid JSON"),
        ("shape_overflow.safetensors", file_with(with_entry("w", shape=[2**32, 2**32]), data), "shape overflow"),
        ("zero_hides_overflow.safetensors", file_with(with_entry("w", shape=[2**62, 4, 0], data_offsets=[0, 0]) | {"b": {"dtype": "I16", "shape": [8], "data_offsets": [0, 16]}}, bytes(16)), "shape overflow"),
        ("size_overflow.safetensors", file_with(with_entry("w", shape=[2**62]), data), "size overflow"),
        ("size_mismatch.safetensors", file_with(with_entry("w", shape=[4, 7]), data), "size mismatch: tensor 'w'"),
        ("reversed_offsets.safetensors", file_with(with_entry("b", data_offsets=[144, 128]), data), "offsets reversed: tensor 'b'"),
        ("not_at_start.safetensors", file_with(with_entry("w", data_offsets=[16, 144]) | {"b": {"dtype": "I16", "shape": [8], "data_offsets": [144, 160]}}, bytes(160)), "not at start"),
        ("hole.safetensors", file_with(with_entry("b", data_offsets=[130, 146]), bytes(146)), "hole: tensor 'b'"),
        ("overlap.safetensors", file_with(with_entry("b", data_offsets=[120, 136]), bytes(136)), "overlap"),
        ("past_end.safetensors", file_with(h, bytes(100)), "out of bounds"),
        ("trailing_bytes.safetensors", file_with(h, bytes(200)), "trailing bytes"),
        ("offsets_beyond_u64.safetensors", file_with(with_entry("w", data_offsets=[0, 2**64]), data), "data_offsets must be [begin, end]"),
    ]


def mutation_cases(seed: int = 0, count: int = 40) -> list[tuple[str, bytes, str | None]]:
    from kiln.native.safetensors import save

    good = save(good_tensors(), {"format": "np"})
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, bytes, str | None]] = []
    for cut in sorted(set(rng.integers(1, len(good), count // 2).tolist())):
        cases.append((f"truncated_{cut}.safetensors", good[:cut], None))
    for i in range(count // 2):
        flipped = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            flipped[int(rng.integers(0, len(good)))] ^= 1 << int(rng.integers(0, 8))
        cases.append((f"bitflip_{i}.safetensors", bytes(flipped), None))
    return cases


def write_corpus(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    cases = rule_cases() + mutation_cases()
    for name, data, _ in cases:
        (folder / name).write_bytes(data)
    return len(cases)


if __name__ == "__main__":
    print(write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_corpus")), "files written")
