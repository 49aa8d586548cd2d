"""Structured mutation loop for the SafeTensors reader, for sanitizer builds (where libFuzzer's
coverage feedback is not available): rewrites numbers, dtypes and names inside valid headers and
flips bytes, so the native offset arithmetic sees overflowing and inconsistent values.

    python tests/fuzz/mutate_headers.py --seconds 600        (see docs/fuzzing.md for ASan)

Every input must load within bounds or raise SafetensorError; prints the counts at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time

import numpy as np

from kiln.native import safetensors as st

NUMBERS = [0, 1, 2, 7, 8, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1]
DTYPES = list(st.DTYPES) + ["F31", "", "f32"]


def seeds() -> list[dict]:
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(4, dtype=np.int64), "c": np.zeros((0, 2), np.float16), "d": np.ones(3, np.bool_)}
    data = st.save(tensors)
    n = struct.unpack("<Q", data[:8])[0]
    return [(json.loads(data[8 : 8 + n]), data[8 + n :])]


def mutate(header: dict, body: bytes, rnd: random.Random) -> bytes:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    for _ in range(rnd.randint(1, 3)):
        entry = h[rnd.choice(names)]
        what = rnd.random()
        if what < 0.4:
            entry["data_offsets"][rnd.randint(0, 1)] = rnd.choice(NUMBERS) if rnd.random() < 0.7 else rnd.randint(0, len(body) + 8)
        elif what < 0.7 and entry["shape"]:
            entry["shape"][rnd.randrange(len(entry["shape"]))] = rnd.choice(NUMBERS)
        elif what < 0.8:
            entry["shape"] = [rnd.choice(NUMBERS) for _ in range(rnd.randint(0, 5))]
        elif what < 0.9:
            entry["dtype"] = rnd.choice(DTYPES)
        else:
            h[rnd.choice(names) + rnd.choice(["", "\x00", "x"])] = entry
    text = json.dumps(h).encode()
    cut = len(body) if rnd.random() < 0.7 else rnd.randint(0, len(body) * 2)
    tail = (body * 2)[:cut]
    length = len(text) if rnd.random() < 0.9 else rnd.choice(NUMBERS[:-1])
    raw = bytearray(struct.pack("<Q", length % 2**64) + text + tail)
    if rnd.random() < 0.2:
        raw[rnd.randrange(len(raw))] ^= 1 << rnd.randrange(8)
    return bytes(raw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    pool = seeds()
    end = time.monotonic() + args.seconds
    counts = {"loaded": 0, "refused": 0}
    while time.monotonic() < end:
        for _ in range(1000):
            header, body = rnd.choice(pool)
            data = mutate(header, body, rnd)
            try:
                loaded = st.load(data)
            except st.SafetensorError:
                counts["refused"] += 1
                continue
            assert sum(a.nbytes for a in loaded.values()) <= len(data), data[:200]
            counts["loaded"] += 1
    print(f"{sum(counts.values())} inputs: {counts['loaded']} loaded within bounds, {counts['refused']} refused with SafetensorError, 0 crashes")
    sys.exit(0)


if __name__ == "__main__":
    main()
