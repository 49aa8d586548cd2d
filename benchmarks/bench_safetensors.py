"""SafeTensors I/O: kiln.native.safetensors vs the safetensors package, on 512 MiB and 1 GiB state dicts.

    python benchmarks/bench_safetensors.py [--mib N] [--repeat 7]

Both sides run in the same process, interleaved (package, kiln, then kiln, package in the next
round) so that a neighbour's load or the page allocator's state hits both alike. Every save writes a
fresh destination (the previous file is deleted before the clock starts); loads read the package's
file with the page cache warm. Prints the median, the spread [min-max] and kiln's ratio of medians;
memcpy of the same bytes (into a fresh buffer, as a load must; into a preallocated one) is the ceiling.

Saves run twice: back to back (the pages the deleted file freed are reused at once), and "settled":
--settle seconds of pause before each save, as when a build step writes after other work. On a VM
whose hypervisor takes back free guest memory (free page reporting, as on the 2-core development
machine), the settled save first-touches pages the host must fault in again, and is then dominated
by that: 3-10x slower than back to back for either writer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.numpy as reference

from kiln.native import safetensors as kiln_st

SIZES_MIB = (512, 1024)


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


def interleaved(contenders: dict[str, Callable[[], object]], repeat: int, before: Callable[[str], None] = lambda _: None) -> dict[str, list[float]]:
    """Seconds per call of each contender, `repeat` rounds after one untimed warm-up round; the
    order flips every round. `before(name)` runs untimed ahead of each call."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeat + 1):
        for name in names if round_ % 2 else names[::-1]:
            before(name)
            start = time.perf_counter()
            result = contenders[name]()
            elapsed = time.perf_counter() - start
            del result
            if round_:
                times[name].append(elapsed)
    return times


def rows(mib: int, repeat: int, settle: float, folder: Path) -> list[tuple[str, list[float], float | None, str]]:
    tensors = state_dict(mib)
    ref_file, kiln_file = folder / "ref.safetensors", folder / "kiln.safetensors"
    files = {"package": ref_file, "kiln": kiln_file}

    saves = interleaved(
        {"package": lambda: reference.save_file(tensors, ref_file), "kiln": lambda: kiln_st.save_file(tensors, kiln_file)},
        repeat, before=lambda name: files[name].unlink(missing_ok=True),
    )
    assert ref_file.read_bytes() == kiln_file.read_bytes(), "kiln's file differs from the package's"

    def settled(name: str) -> None:
        files[name].unlink(missing_ok=True)
        time.sleep(settle)

    settled_saves = interleaved(
        {"package": lambda: reference.save_file(tensors, ref_file), "kiln": lambda: kiln_st.save_file(tensors, kiln_file)},
        repeat, before=settled,
    ) if settle > 0 else None
    kiln_file.unlink()
    ref_file.read_bytes()  # warm page cache
    loads = interleaved({
        "package": lambda: reference.load_file(ref_file),
        "kiln": lambda: kiln_st.load_file(ref_file),
        "kiln mmap": lambda: kiln_st.load_file(ref_file, copy=False),
    }, repeat)
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in tensors.values()])
    into = np.empty_like(flat)
    copies = interleaved({"fresh": lambda: np.copyto(np.empty_like(flat), flat), "preallocated": lambda: np.copyto(into, flat)}, repeat)

    med = statistics.median
    return [
        ("load   safetensors.numpy.load_file", loads["package"], None, ""),
        ("load   kiln load_file (copy)", loads["kiln"], med(loads["package"]) / med(loads["kiln"]),
         f"speed vs memcpy: {med(copies['fresh']) / med(loads['kiln']):.2f}x fresh, {med(copies['preallocated']) / med(loads['kiln']):.2f}x preallocated"),
        ("load   kiln load_file(copy=False) (mmap views)", loads["kiln mmap"], med(loads["package"]) / med(loads["kiln mmap"]), "zero copy"),
        ("save   safetensors.numpy.save_file", saves["package"], None, "fresh destination each time"),
        ("save   kiln save_file", saves["kiln"], med(saves["package"]) / med(saves["kiln"]), "same bytes as the package (checked)"),
        *([
            (f"save   safetensors.numpy.save_file, settled {settle:g} s", settled_saves["package"], None, "pause before each save"),
            (f"save   kiln save_file, settled {settle:g} s", settled_saves["kiln"], med(settled_saves["package"]) / med(settled_saves["kiln"]), ""),
        ] if settled_saves else []),
        ("memcpy into a fresh buffer (load ceiling)", copies["fresh"], None, ""),
        ("memcpy into a preallocated buffer", copies["preallocated"], None, ""),
    ]


def print_rows(title: str, table: list[tuple[str, list[float], float | None, str]]) -> None:
    print(f"\n{title}")
    print(f"{'what':48s} {'ms median':>10s} {'[min-max]':>15s} {'x package':>10s}  note")
    for name, seconds, ratio, note in table:
        spread = f"[{min(seconds) * 1e3:.0f}-{max(seconds) * 1e3:.0f}]"
        print(f"{name:48s} {statistics.median(seconds) * 1e3:10.1f} {spread:>15s} {'' if ratio is None else f'{ratio:9.2f}x':>10s}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=None, help=f"one size (default: each of {SIZES_MIB})")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of pause before each settled save (0: skip them)")
    args = parser.parse_args()
    for mib in (args.mib,) if args.mib else SIZES_MIB:
        with tempfile.TemporaryDirectory(dir=os.environ.get("KILN_BENCH_DIR")) as folder:
            print_rows(f"SafeTensors I/O, {mib} MiB float32 state dict ({mib << 20 >> 24} x 16 MiB + vectors), "
                       f"median of {args.repeat}, interleaved, {os.cpu_count()} cores",
                       rows(mib, args.repeat, args.settle, Path(folder)))


if __name__ == "__main__":
    main()
