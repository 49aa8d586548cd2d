"""SafeTensors I/O: kiln.native.safetensors vs the safetensors package, on a 1 GiB state dict.

    python benchmarks/bench_safetensors.py [--mib 1024] [--repeat 3]

One run, warm page cache (the file is read once before timing), best of --repeat. Prints GB/s of
tensor bytes and kiln's ratio to the reference measured in the same run; memcpy of the same bytes
(into a fresh buffer, as a load must; and into a preallocated one) is the ceiling.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy as reference

from kiln.native import safetensors as kiln_st


def state_dict(mib: int) -> dict[str, np.ndarray]:
    """Transformer-like: 16 MiB matrices plus small vectors, float32."""
    rng = np.random.default_rng(0)
    tensors, total, i = {}, 0, 0
    while total < mib << 20:
        tensors[f"layers.{i}.weight"] = rng.standard_normal((2048, 2048), dtype=np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal(2048, dtype=np.float32)
        total += tensors[f"layers.{i}.weight"].nbytes + tensors[f"layers.{i}.bias"].nbytes
        i += 1
    return tensors


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return min(times)


def rows(mib: int, repeat: int, folder: Path) -> list[tuple[str, float, float | None, str]]:
    tensors = state_dict(mib)
    nbytes = sum(a.nbytes for a in tensors.values())
    ref_file, kiln_file = folder / "ref.safetensors", folder / "kiln.native.safetensors"

    save_ref = best(lambda: reference.save_file(tensors, ref_file), repeat)
    save_kiln = best(lambda: kiln_st.save_file(tensors, kiln_file), repeat)
    for path in (ref_file, kiln_file):
        path.read_bytes()  # warm page cache
    load_ref = best(lambda: reference.load_file(ref_file), repeat)
    load_kiln = best(lambda: kiln_st.load_file(ref_file), repeat)
    map_kiln = best(lambda: kiln_st.load_file(ref_file, copy=False), repeat)
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in tensors.values()])
    into = np.empty_like(flat)
    memcpy_fresh = best(lambda: np.copyto(np.empty_like(flat), flat), repeat)
    memcpy_pre = best(lambda: np.copyto(into, flat), repeat)

    gbs = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
    return [
        ("load   safetensors.numpy.load_file", gbs(load_ref), None, ""),
        ("load   kiln load_file (copy)", gbs(load_kiln), load_ref / load_kiln, f"speed vs memcpy: {memcpy_fresh / load_kiln:.2f}x fresh, {memcpy_pre / load_kiln:.2f}x preallocated"),
        ("load   kiln load_file(copy=False) (mmap views)", gbs(map_kiln), load_ref / map_kiln, "zero copy"),
        ("save   safetensors.numpy.save_file", gbs(save_ref), None, ""),
        ("save   kiln save_file", gbs(save_kiln), save_ref / save_kiln, ""),
        ("memcpy into a fresh buffer (load ceiling)", gbs(memcpy_fresh), None, ""),
        ("memcpy into a preallocated buffer", gbs(memcpy_pre), None, ""),
    ]


def print_rows(title: str, table: list[tuple[str, float, float | None, str]]) -> None:
    print(f"\n{title}")
    print(f"{'what':48s} {'GB/s':>8s} {'x reference':>12s}  note")
    for name, rate, ratio, note in table:
        print(f"{name:48s} {rate:8.2f} {'' if ratio is None else f'{ratio:11.2f}x':>12s}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KILN_BENCH_DIR")) as folder:
        print_rows(f"SafeTensors I/O, {args.mib} MiB float32 state dict, best of {args.repeat}", rows(args.mib, args.repeat, Path(folder)))


if __name__ == "__main__":
    main()
